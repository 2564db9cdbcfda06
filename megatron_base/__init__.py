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

__all__ = [
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
