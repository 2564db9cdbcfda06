"""vpMoE configuration: the reference fork's TOML format as a typed dataclass.

A config file has the sections and keys of the reference fork's ``configs/vpmoe.toml``
(``[meta] [tokenizer] [model] [attention] [tpa] [grape] [moe] [optimizer]``) plus a few keys
the fork passed on its command line (documented per field below). ``load_config`` accepts a
preset name (``tiny``, ``vpmoe-8l``, ``vpmoe``) or a path, rejects unknown sections and keys
and invalid values with an error that names the key and what is allowed, and returns a
:class:`VpMoEConfig`.

Nothing here imports Megatron: turning the config into a stock ``TransformerConfig`` is
:func:`megatron_base.model.transformer_config_from_vpmoe`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Optional, Union, get_args, get_origin

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

PRESET_DIR = Path(__file__).resolve().parent / "configs"
PRESETS = ("tiny", "vpmoe-8l", "vpmoe")

#: The o200k Harmony vocabulary padded to a multiple of 128 (tokenizer spec §1).
O200K_PADDED_VOCAB = 201088


class ConfigError(ValueError):
    """A config file or value is invalid; the message names the key and what is allowed."""


def _choice(*values):
    return {"choices": tuple(values)}


def _positive():
    return {"min": 1}


# --------------------------------------------------------------------------------------------
# Sections. Field metadata: "choices" (allowed values) or "min"/"max" (numeric bounds).
# --------------------------------------------------------------------------------------------


@dataclass
class MetaSection:
    """Free-text description of the config (the fork keeps comments here)."""

    name: str = ""
    description: str = ""


@dataclass
class TokenizerSection:
    """Tokenizer identity and the padded vocabulary size (locked to 201088 for o200k Harmony)."""

    name: str = field(default="o200k_harmony", metadata=_choice("o200k_harmony"))
    vocab_size: int = field(default=O200K_PADDED_VOCAB, metadata=_positive())


@dataclass
class ModelSection:
    """Transformer geometry and layer options (fork ``[model]``)."""

    num_layers: int = field(default=80, metadata=_positive())
    hidden_size: int = field(default=1024, metadata=_positive())
    num_attention_heads: int = field(default=8, metadata=_positive())
    num_query_groups: int = field(default=2, metadata=_positive())
    head_dim: int = field(default=128, metadata=_positive())
    #: FFN width of the dense first layer and (unless ``[moe] expert_ffn_hidden_size``) of
    #: every routed expert.
    ffn_hidden_size: int = field(default=128, metadata=_positive())
    value_residual: bool = False
    value_residual_init: float = 1.0
    normalization: str = field(default="RMSNorm", metadata=_choice("RMSNorm"))
    qk_layernorm: bool = True
    softmax_type: str = field(default="learnable", metadata=_choice("learnable", "vanilla", "off-by-one"))
    add_bias_linear: bool = False
    add_qkv_bias: bool = True
    gated_linear_unit: bool = False
    activation: str = field(default="squaredrelu", metadata=_choice("squaredrelu", "gelu", "relu", "swiglu"))
    untied_embeddings: bool = True
    # Not in the fork's TOML (Megatron defaults / command-line values).
    init_method_std: float = field(default=0.02, metadata={"min": 0.0})
    layernorm_epsilon: float = field(default=1e-5, metadata={"min": 0.0})
    hidden_dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})


@dataclass
class AttentionSection:
    """Attention options (fork ``[attention]``). ``window_size`` W counts the current token."""

    attention_dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    max_sequence_length: int = field(default=2048, metadata=_positive())
    position_embedding_type: str = field(default="grapem", metadata=_choice("grapem", "rope", "none"))
    window_size: int = field(default=128, metadata=_positive())
    window_attn_skip_freq: int = field(default=4, metadata=_positive())
    rotary_base: float = field(default=10000.0, metadata={"min": 1.0})


@dataclass
class TPASection:
    """Tensor Product Attention on local layers (fork ``[tpa]``)."""

    use_tpa: bool = True
    tpa_rank: int = field(default=2, metadata=_positive())
    tpa_q_rank: int = field(default=4, metadata=_positive())
    #: Factor init: "normal" = Normal(0, init_method_std) (the fork), "xavier" = the paper's 2-D
    #: Xavier uniform.
    tpa_init: str = field(default="normal", metadata=_choice("normal", "xavier"))


@dataclass
class GrapeSection:
    """GRAPE positional encoding (fork ``[grape]``)."""

    grape_a: bool = True
    grapem_learnable_freq: bool = True
    grapem_share_across_heads: bool = True
    grapem_log_freq_scale: float = field(default=16.0, metadata={"min": 1e-6})


@dataclass
class MoESection:
    """Mixture-of-Experts options (fork ``[moe]``)."""

    num_experts: int = field(default=256, metadata=_positive())
    topk: int = field(default=4, metadata=_positive())
    shared_expert: bool = True
    shared_expert_size: int = field(default=512, metadata=_positive())
    first_layer_dense: bool = True
    #: Routed-expert FFN width; 0 means ``[model] ffn_hidden_size`` (the fork's behaviour).
    expert_ffn_hidden_size: int = field(default=0, metadata={"min": 0})
    router_load_balancing_type: str = field(
        default="seq_aux_loss", metadata=_choice("seq_aux_loss", "aux_loss", "global_aux_loss", "none")
    )
    aux_loss_coeff: float = field(default=1e-4, metadata={"min": 0.0})
    router_score_function: str = field(default="sigmoid", metadata=_choice("sigmoid", "softmax"))
    router_topk_scaling_factor: float = field(default=2.5, metadata={"min": 0.0})
    router_num_groups: int = field(default=8, metadata={"min": 0})
    router_group_topk: int = field(default=4, metadata={"min": 0})
    router_enable_expert_bias: bool = True
    router_bias_update_rate: float = field(default=1e-3, metadata={"min": 0.0})
    router_dtype: str = field(default="fp32", metadata=_choice("fp32", "fp64", "none"))
    grouped_gemm: bool = False
    permute_fusion: bool = False
    router_fusion: bool = False


@dataclass
class OptimizerSection:
    """NorMuon + auxiliary AdamW (fork ``[optimizer]`` plus the fork's command-line options)."""

    name: str = field(default="normuon", metadata=_choice("normuon", "adamw"))
    lr: float = field(default=3e-3, metadata={"min": 0.0})
    min_lr: float = field(default=3e-4, metadata={"min": 0.0})
    normuon_aux_lr: Optional[float] = 3e-4
    normuon_aux_min_lr: Optional[float] = None
    weight_decay: float = field(default=0.01, metadata={"min": 0.0})
    adam_beta1: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0})
    adam_beta2: float = field(default=0.95, metadata={"min": 0.0, "max": 1.0})
    adam_eps: float = field(default=1e-8, metadata={"min": 0.0})
    normuon_momentum: float = field(default=0.95, metadata={"min": 0.0, "max": 1.0})
    normuon_beta2: float = field(default=0.95, metadata={"min": 0.0, "max": 1.0})
    normuon_eps: float = field(default=1e-10, metadata={"min": 0.0})
    polar_express_safety_factor: float = field(default=2e-2, metadata={"min": 0.0})
    polar_express_steps: int = field(default=5, metadata=_positive())
    qkv_split: str = field(default="qkv", metadata=_choice("qkv", "fused", "head"))
    router_optimizer: str = field(default="normuon", metadata=_choice("normuon", "adamw"))
    scale_mode: str = field(default="shape", metadata=_choice("shape", "rms0.2"))
    neuron_axis: str = field(default="rows", metadata=_choice("rows", "larger"))
    clip_grad: float = field(default=1.0, metadata={"min": 0.0})
    nan_policy: str = field(default="skip", metadata=_choice("skip", "raise"))
    compile: bool = True
    #: Capture the NorMuon step into CUDA graphs (CUDA only; spec R6).
    cuda_graph: bool = False
    #: Polar Express kernels: "auto" (fused Triton kernel for min(m, n) <= 128 on CUDA),
    #: "torch" (batched bmm only) or "triton".
    pe_backend: str = field(default="auto", metadata=_choice("auto", "torch", "triton"))


_SECTIONS = {
    "meta": MetaSection,
    "tokenizer": TokenizerSection,
    "model": ModelSection,
    "attention": AttentionSection,
    "tpa": TPASection,
    "grape": GrapeSection,
    "moe": MoESection,
    "optimizer": OptimizerSection,
}


@dataclass
class VpMoEConfig:
    """The whole vpMoE config, one attribute per TOML section.

    ``source`` records where it was loaded from (a preset name or a path); it is not a TOML key.
    """

    meta: MetaSection = field(default_factory=MetaSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    model: ModelSection = field(default_factory=ModelSection)
    attention: AttentionSection = field(default_factory=AttentionSection)
    tpa: TPASection = field(default_factory=TPASection)
    grape: GrapeSection = field(default_factory=GrapeSection)
    moe: MoESection = field(default_factory=MoESection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    source: str = ""

    # ---- derived quantities -----------------------------------------------------------
    @property
    def megatron_window_size(self):
        """Megatron's ``(left, right)`` window: W tokens including the current one = (W-1, 0)."""
        return (self.attention.window_size - 1, 0)

    def is_local_layer(self, layer_number: int) -> bool:
        """True for sliding-window layers (1-based ``layer_number``; every Nth layer is global)."""
        return layer_number % self.attention.window_attn_skip_freq != 0

    @property
    def moe_layer_pattern(self):
        """Megatron ``moe_layer_freq`` list: 0 = dense, 1 = MoE."""
        n = self.model.num_layers
        if self.moe.first_layer_dense:
            return [0] + [1] * (n - 1)
        return [1] * n

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe.expert_ffn_hidden_size or self.model.ffn_hidden_size

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}

    def validate(self) -> "VpMoEConfig":
        """Cross-field checks (single fields are checked while parsing)."""
        m, t, moe = self.model, self.tpa, self.moe
        if m.num_attention_heads % m.num_query_groups:
            raise ConfigError(
                f"[model] num_attention_heads ({m.num_attention_heads}) must be a multiple of "
                f"num_query_groups ({m.num_query_groups})"
            )
        if m.head_dim % 2:
            raise ConfigError(f"[model] head_dim must be even for rotary/GRAPE-M planes, got {m.head_dim}")
        if moe.topk > moe.num_experts:
            raise ConfigError(f"[moe] topk ({moe.topk}) must be <= num_experts ({moe.num_experts})")
        if moe.router_num_groups:
            if moe.num_experts % moe.router_num_groups:
                raise ConfigError(
                    f"[moe] router_num_groups ({moe.router_num_groups}) must divide num_experts "
                    f"({moe.num_experts}); use 0 to disable group-limited routing"
                )
            if not (0 < moe.router_group_topk <= moe.router_num_groups):
                raise ConfigError(
                    f"[moe] router_group_topk must be in 1..router_num_groups "
                    f"({moe.router_num_groups}), got {moe.router_group_topk}"
                )
        if t.use_tpa and t.tpa_q_rank < 1:
            raise ConfigError("[tpa] tpa_q_rank must be >= 1")
        if self.tokenizer.vocab_size % 128:
            raise ConfigError(
                f"[tokenizer] vocab_size must be a multiple of 128 (tensor-parallel padding), got "
                f"{self.tokenizer.vocab_size}"
            )
        return self


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def _type_ok(value, annotation) -> bool:
    if isinstance(annotation, str):
        annotation = eval(annotation, globals())  # dataclass annotations are strings here
    origin = get_origin(annotation)
    if origin is Union:
        return any(_type_ok(value, a) for a in get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return True


def _type_name(annotation) -> str:
    if isinstance(annotation, str):
        return annotation
    return getattr(annotation, "__name__", str(annotation))


def _parse_section(section: str, cls, raw: Dict[str, Any], where: str):
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(
                f"{where}: unknown key [{section}] {key!r}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; allowed keys: {', '.join(sorted(known))}"
            )
        f = known[key]
        if not _type_ok(value, f.type):
            raise ConfigError(
                f"{where}: [{section}] {key} = {value!r} has the wrong type; expected "
                f"{_type_name(f.type)}"
            )
        if isinstance(f.type, str) and "float" in f.type and isinstance(value, int):
            value = float(value)
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(
                f"{where}: [{section}] {key} = {value!r} is not allowed; allowed values: "
                f"{', '.join(repr(c) for c in choices)}"
            )
        if value is not None and "min" in f.metadata and value < f.metadata["min"]:
            raise ConfigError(
                f"{where}: [{section}] {key} = {value!r} is too small; must be >= {f.metadata['min']}"
            )
        if value is not None and "max" in f.metadata and value > f.metadata["max"]:
            raise ConfigError(
                f"{where}: [{section}] {key} = {value!r} is too large; must be <= {f.metadata['max']}"
            )
        kwargs[key] = value
    return cls(**kwargs)


def config_from_dict(data: Dict[str, Any], where: str = "<dict>") -> VpMoEConfig:
    """Build a :class:`VpMoEConfig` from parsed TOML data, validating every key."""
    sections = {}
    for section, raw in data.items():
        if section not in _SECTIONS:
            hint = difflib.get_close_matches(section, _SECTIONS, n=1)
            raise ConfigError(
                f"{where}: unknown section [{section}]"
                + (f" (did you mean [{hint[0]}]?)" if hint else "")
                + f"; allowed sections: {', '.join('[' + s + ']' for s in _SECTIONS)}"
            )
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: [{section}] must be a table of keys, got {raw!r}")
        sections[section] = _parse_section(section, _SECTIONS[section], raw, where)
    return VpMoEConfig(**sections, source=where).validate()


def load_config(name_or_path: Union[str, os.PathLike, VpMoEConfig, None] = "tiny") -> VpMoEConfig:
    """Load a preset (``tiny``, ``vpmoe-8l``, ``vpmoe``) or a TOML file.

    Raises:
        ConfigError: unknown preset/file, unknown section or key, wrong type or value.
    """
    if isinstance(name_or_path, VpMoEConfig):
        return name_or_path
    if name_or_path is None:
        name_or_path = "tiny"
    text_name = str(name_or_path)
    path = Path(text_name)
    if text_name in PRESETS:
        path = PRESET_DIR / f"{text_name}.toml"
    elif not path.exists():
        raise ConfigError(
            f"config {text_name!r} is neither a preset ({', '.join(PRESETS)}) nor an existing "
            f"TOML file"
        )
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    cfg = config_from_dict(data, where=str(path))
    cfg.source = text_name
    return cfg
