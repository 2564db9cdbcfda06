"""The stock side of vpmoe-compile: config, stock Megatron-Core GPT model, process set-up,
compat fixes for megatron-core 0.16.1, tokenizer and dataset builder."""

from megatron_base.config import ConfigError, VpMoEConfig, load_config
from megatron_base.model import (
    ParamCount,
    UnsupportedConfigError,
    build_stock_gpt,
    count_parameters,
    transformer_config_from_vpmoe,
)
from megatron_base.parallel import destroy_process, init_process

_LAZY = {
    # tokenizer and its o200k encoding (import megatron.core: loaded on first use)
    "O200kHarmonyTokenizer": "tokenizer", "O200kHarmonyLibrary": "o200k", "VocabFileError": "o200k",
    "O200K_BASE_SHA256": "o200k", "O200K_HARMONY_VOCAB_SIZE": "o200k", "SPECIAL_TOKEN_IDS": "o200k",
    "HARMONY_STOP_TOKEN_IDS": "o200k", "padded_vocab_size": "o200k",
    "write_tokenizer_metadata": "tokenizer",
    # Harmony rendering
    "HarmonyRenderer": "harmony", "HarmonyRenderConfig": "harmony", "HarmonyFormatError": "harmony",
    "render_harmony": "harmony", "make_system_content": "harmony", "load_harmony_encoding_offline": "harmony",
    # dataset builder
    "build_dataset": "dataset", "DatasetBuildConfig": "dataset", "DatasetBuildError": "dataset",
    "BuildResult": "dataset", "build_demo_dataset": "dataset", "open_dataset": "dataset",
    "LossMaskedGPTDataset": "dataset",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod = importlib.import_module(f"megatron_base.{_LAZY[name]}")
        return getattr(mod, "render" if name == "render_harmony" else name)
    raise AttributeError(f"module 'megatron_base' has no attribute {name!r}")


__all__ = list(_LAZY) + [
    "ConfigError",
    "ParamCount",
    "UnsupportedConfigError",
    "VpMoEConfig",
    "build_stock_gpt",
    "count_parameters",
    "destroy_process",
    "init_process",
    "load_config",
    "transformer_config_from_vpmoe",
]
