"""vpMoE configuration: the reference fork's TOML format as a typed dataclass.

A config file has the sections and keys of the reference fork's ``configs/vpmoe.toml``
(``[meta] [tokenizer] [model] [attention] [tpa] [grape] [moe] [optimizer]``) plus a few keys
the fork passed on its command line (documented per field below) and our own ``[kernels]``. ``load_config`` accepts a
preset name (``tiny``, ``vpmoe-8l``, ``vpmoe``) or a path, rejects unknown sections and keys
and invalid values with an error that names the key and what is allowed, and returns a
:class:`VpMoEConfig`. A removed key (:data:`REMOVED_KEYS`) is an error that says why it went,
except with the one value that still means today's behaviour, which is ignored with a warning
(so configs and checkpoints written before the removal still load).

A config states its model
-------------------------
A file never silently inherits the dataclass defaults (which are the 80-layer, 256-expert
``vpmoe`` architecture). It does one of two things:

* **It names a base preset**: ``[meta] base = "tiny"`` (or ``"vpmoe-8l"``, ``"vpmoe"``). Every
  key the file omits takes the preset's value, key by key within each section (``[meta]``
  itself is not inherited); the file states only what it changes::

      [meta]
      base = "vpmoe-8l"
      [model]
      num_layers = 16

* **Or it is complete**: without ``base`` it must give every model section (``[tokenizer]
  [model] [attention] [tpa] [grape] [moe]``) with every model key, i.e. every key of those
  sections except the few that have a documented default (:data:`DEFAULTED_KEYS`: values the
  fork took from Megatron's defaults or its command line, such as ``layernorm_epsilon``,
  ``rotary_base``, ``expert_ffn_hidden_size = 0`` and the fused-kernel switches). This is
  the shape of the fork's own ``configs/vpmoe.toml`` and of the shipped presets.

``[meta]``, ``[optimizer]`` and ``[kernels]`` are optional in both cases: the optimizer keys
default to the fork's training settings (listed on :class:`OptimizerSection`), the kernel keys
to automatic choices (:class:`KernelsSection`). An empty file is an error
that says so ("states no model").

Value domains
-------------
Every key has a domain, checked when the file is loaded, and an error names the key as
``[section] key`` and the allowed range: floats must be finite (TOML's ``nan`` / ``inf`` are
refused), learning rates and coefficients ``>= 0``, betas and momenta in ``[0, 1)`` (1 never
forgets), epsilons and standard deviations ``> 0``, dropout in ``[0, 1)``, sizes and counts
``>= 1``, ``[tokenizer] vocab_size`` at least the tokenizer's vocabulary (201,088 ids for
o200k Harmony, read from :mod:`megatron_base.o200k`) and a multiple of 128; cross-key
rules (head groups dividing the heads, router groups, ``min_lr <= lr``, ...) are checked on
the whole config by :meth:`VpMoEConfig.validate`.

Nothing here imports Megatron: turning the config into a stock ``TransformerConfig`` is
:func:`megatron_base.model.transformer_config_from_vpmoe`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import math
import os
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union, get_args, get_origin

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

PRESET_DIR = Path(__file__).resolve().parent / "configs"
PRESETS = ("tiny", "vpmoe-8l", "vpmoe")


def _tokenizer_vocab_size() -> int:
    """``O200K_HARMONY_VOCAB_SIZE`` of :mod:`megatron_base.o200k`, read from its source.

    Importing the encoding module would import Megatron and tiktoken; the constant is a
    literal, so it is read off the module's syntax tree instead (one source of truth).
    """
    path = Path(__file__).resolve().parent / "o200k.py"
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "O200K_HARMONY_VOCAB_SIZE" for t in targets):
                value = ast.literal_eval(node.value)
                if isinstance(value, int) and value > 0:
                    return value
    raise RuntimeError(f"{path} defines no integer O200K_HARMONY_VOCAB_SIZE")  # pragma: no cover


#: The o200k Harmony vocabulary (docs/design.md#megatron-ids-and-vocabulary-rows): the smallest
#: ``[tokenizer] vocab_size``.
O200K_PADDED_VOCAB = _tokenizer_vocab_size()
#: Megatron splits the embedding and output rows evenly over tensor-parallel ranks (and pads
#: vocabularies to ``make_vocab_size_divisible_by = 128`` by default).
VOCAB_MULTIPLE = 128


class ConfigError(ValueError):
    """A config file or value is invalid; the message names the key and what is allowed."""


def _meta(
    *,
    choices: Optional[Tuple[Any, ...]] = None,
    ge: Optional[float] = None,
    gt: Optional[float] = None,
    le: Optional[float] = None,
    lt: Optional[float] = None,
    multiple_of: Optional[int] = None,
    note: str = "",
    required: bool = False,
) -> Dict[str, Any]:
    """Field metadata: allowed ``choices`` or bounds (``ge``/``gt`` lower, ``le``/``lt`` upper),
    ``multiple_of``, a ``note`` saying why, and ``required`` (a model key: a config without
    ``[meta] base`` must state it)."""
    meta: Dict[str, Any] = {"required": required}
    bounds = dict(choices=choices, ge=ge, gt=gt, le=le, lt=lt, multiple_of=multiple_of)
    meta.update({key: value for key, value in bounds.items() if value is not None})
    if note:
        meta["note"] = note
    return meta


def _choice(*values, required: bool = True):
    return _meta(choices=tuple(values), required=required)


def _positive(required: bool = True, note: str = ""):
    return _meta(ge=1, required=required, note=note)


def _req():
    """A model key without further constraints (bools)."""
    return _meta(required=True)


_UNIT = dict(ge=0.0, lt=1.0)  # betas, momenta, dropout: 1 is unusable


# --------------------------------------------------------------------------------------------
# Sections. Field metadata: see _meta. Keys with required=True are the model keys a config
# without [meta] base must state (the keys of the fork's configs/vpmoe.toml).
# --------------------------------------------------------------------------------------------


@dataclass
class MetaSection:
    """Free-text description of the config (the fork keeps comments here), and ``base``: the
    preset whose values fill every key the file omits (see the module docstring)."""

    name: str = ""
    description: str = ""
    base: str = ""


@dataclass
class TokenizerSection:
    """Tokenizer identity and the vocabulary (embedding rows; 201088 for o200k Harmony)."""

    name: str = field(default="o200k_harmony", metadata=_choice("o200k_harmony"))
    vocab_size: int = field(
        default=O200K_PADDED_VOCAB,
        metadata=_meta(
            ge=O200K_PADDED_VOCAB,
            multiple_of=VOCAB_MULTIPLE,
            required=True,
            note=f"the o200k_harmony tokenizer has {O200K_PADDED_VOCAB} ids; Megatron splits the "
            f"vocabulary rows over tensor-parallel ranks, hence a multiple of {VOCAB_MULTIPLE}",
        ),
    )


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
    #: the fork's value residual (the value_residual pass): layer 1's values mixed into every
    #: later layer with a learnable lambda initialised to ``value_residual_init``
    value_residual: bool = field(default=True, metadata=_req())
    value_residual_init: float = 1.0
    normalization: str = field(default="RMSNorm", metadata=_choice("RMSNorm"))
    qk_layernorm: bool = field(default=True, metadata=_req())
    softmax_type: str = field(default="learnable", metadata=_choice("learnable", "vanilla", "off-by-one"))
    #: linear biases (the linear_bias pass adds them; stock builds only the QKV bias)
    add_bias_linear: bool = field(default=True, metadata=_req())
    add_qkv_bias: bool = field(default=True, metadata=_req())
    gated_linear_unit: bool = field(default=False, metadata=_req())
    activation: str = field(default="squaredrelu", metadata=_choice("squaredrelu", "gelu", "relu", "swiglu"))
    untied_embeddings: bool = field(default=True, metadata=_req())
    # Not in the fork's TOML (Megatron defaults / command-line values).
    init_method_std: float = field(default=0.02, metadata=_meta(gt=0.0, note="0 initialises every weight to 0"))
    layernorm_epsilon: float = field(default=1e-5, metadata=_meta(gt=0.0))
    hidden_dropout: float = field(default=0.0, metadata=_meta(**_UNIT, note="1 drops every activation"))


@dataclass
class AttentionSection:
    """Attention options (fork ``[attention]``). ``window_size`` W counts the current token."""

    attention_dropout: float = field(
        default=0.0, metadata=_meta(**_UNIT, required=True, note="1 drops every attention weight")
    )
    max_sequence_length: int = field(default=2048, metadata=_positive())
    position_embedding_type: str = field(default="grapem", metadata=_choice("grapem", "rope", "none"))
    window_size: int = field(default=128, metadata=_positive(note="W tokens including the current one"))
    window_attn_skip_freq: int = field(
        default=4, metadata=_positive(note="every Nth layer is global; 1 makes every layer global")
    )
    # Not in the fork's TOML (Megatron default).
    rotary_base: float = field(
        default=10000.0, metadata=_meta(gt=1.0, note="at 1 every rotary plane turns at the same rate")
    )


@dataclass
class TPASection:
    """Tensor Product Attention on local layers (fork ``[tpa]``)."""

    use_tpa: bool = field(default=True, metadata=_req())
    tpa_rank: int = field(default=2, metadata=_positive())
    tpa_q_rank: int = field(default=4, metadata=_positive())
    #: Factor init: "normal" = Normal(0, init_method_std) (the fork), "xavier" = the paper's 2-D
    #: Xavier uniform. Not in the fork's TOML.
    tpa_init: str = field(default="normal", metadata=_choice("normal", "xavier", required=False))


@dataclass
class GrapeSection:
    """GRAPE positional encoding (fork ``[grape]``)."""

    grape_a: bool = field(default=True, metadata=_req())
    grapem_learnable_freq: bool = field(default=True, metadata=_req())
    grapem_share_across_heads: bool = field(default=True, metadata=_req())
    grapem_log_freq_scale: float = field(default=16.0, metadata=_meta(gt=0.0, required=True))


@dataclass
class MoESection:
    """Mixture-of-Experts options (fork ``[moe]``)."""

    num_experts: int = field(default=256, metadata=_positive())
    topk: int = field(default=4, metadata=_positive())
    shared_expert: bool = field(default=True, metadata=_req())
    shared_expert_size: int = field(default=512, metadata=_positive())
    first_layer_dense: bool = field(default=True, metadata=_req())
    #: Routed-expert FFN width; 0 means ``[model] ffn_hidden_size`` (the fork's behaviour).
    expert_ffn_hidden_size: int = field(default=0, metadata=_meta(ge=0, note="0 means [model] ffn_hidden_size"))
    router_load_balancing_type: str = field(
        default="seq_aux_loss", metadata=_choice("seq_aux_loss", "aux_loss", "global_aux_loss", "none")
    )
    aux_loss_coeff: float = field(default=1e-4, metadata=_meta(ge=0.0, required=True))
    router_score_function: str = field(default="sigmoid", metadata=_choice("sigmoid", "softmax"))
    router_topk_scaling_factor: float = field(
        default=2.5, metadata=_meta(gt=0.0, required=True, note="0 would zero every routed expert's output")
    )
    router_num_groups: int = field(
        default=8, metadata=_meta(ge=0, required=True, note="0 disables group-limited routing")
    )
    router_group_topk: int = field(
        default=4, metadata=_meta(ge=0, required=True, note="0 disables group-limited routing")
    )
    router_enable_expert_bias: bool = field(default=True, metadata=_req())
    router_bias_update_rate: float = field(default=1e-3, metadata=_meta(ge=0.0, required=True))
    router_dtype: str = field(default="fp32", metadata=_choice("fp32", "fp64", "none"))
    # Fused-kernel switches (Transformer Engine only; must stay false here). Not required.
    grouped_gemm: bool = False
    permute_fusion: bool = False
    router_fusion: bool = False


@dataclass
class OptimizerSection:
    """NorMuon + auxiliary AdamW (fork ``[optimizer]`` plus the fork's command-line options).

    Every key is optional; the defaults are the fork's training settings. ``normuon_aux_lr`` /
    ``normuon_aux_min_lr`` left out (``None``) fall back to ``lr`` / ``min_lr``.
    """

    name: str = field(default="normuon", metadata=_choice("normuon", "adamw", required=False))
    lr: float = field(default=3e-3, metadata=_meta(ge=0.0))
    min_lr: float = field(default=3e-4, metadata=_meta(ge=0.0, note="and <= lr"))
    normuon_aux_lr: Optional[float] = field(default=3e-4, metadata=_meta(ge=0.0))
    normuon_aux_min_lr: Optional[float] = field(default=None, metadata=_meta(ge=0.0))
    weight_decay: float = field(default=0.01, metadata=_meta(ge=0.0))
    adam_beta1: float = field(default=0.9, metadata=_meta(**_UNIT, note="1 never updates the first moment"))
    adam_beta2: float = field(default=0.95, metadata=_meta(**_UNIT, note="1 never updates the second moment"))
    adam_eps: float = field(default=1e-8, metadata=_meta(gt=0.0))
    normuon_momentum: float = field(default=0.95, metadata=_meta(**_UNIT, note="1 never updates the momentum"))
    normuon_beta2: float = field(default=0.95, metadata=_meta(**_UNIT, note="1 never updates the second moment"))
    normuon_eps: float = field(default=1e-10, metadata=_meta(gt=0.0))
    polar_express_safety_factor: float = field(default=2e-2, metadata=_meta(ge=0.0))
    polar_express_steps: int = field(default=5, metadata=_positive(required=False))
    qkv_split: str = field(default="qkv", metadata=_choice("qkv", "fused", "head", required=False))
    router_optimizer: str = field(default="normuon", metadata=_choice("normuon", "adamw", required=False))
    scale_mode: str = field(default="shape", metadata=_choice("shape", "rms0.2", required=False))
    neuron_axis: str = field(default="rows", metadata=_choice("rows", "larger", required=False))
    clip_grad: float = field(default=1.0, metadata=_meta(ge=0.0, note="0 disables clipping"))
    nan_policy: str = field(default="skip", metadata=_choice("skip", "raise", required=False))
    compile: bool = True
    #: Capture the NorMuon step into CUDA graphs (CUDA only; docs/design.md#banks).
    cuda_graph: bool = False
    #: Polar Express kernels: "auto" (fused Triton kernel for min(m, n) <= 128 on CUDA),
    #: "torch" (batched bmm only) or "triton".
    pe_backend: str = field(default="auto", metadata=_choice("auto", "torch", "triton", required=False))
    #: Polar Express form of the fused kernels' banks: "gram" (steps on the Gram matrix, one
    #: restart; docs/design.md#gram-form) or "standard" (every step sweeps the matrix); the
    #: optimizer's own list is ``vpmoe_compile.optim.polar_express.PE_FORMS``.
    pe_form: str = field(default="gram", metadata=_choice("gram", "standard", required=False))
    #: The one-kernel bank steps (expert stacks, whole re-homed fp32 matrices) read each gradient
    #: where it is, through a table of addresses, instead of copying it into the bank first
    #: (``NorMuon(direct_grads=...)``; docs/design.md#banks). Gradients that are not contiguous,
    #: 16-byte aligned fp32 tensors of the parameter's shape are still copied.
    direct_grads: bool = False
    #: With ``direct_grads``: the one-kernel bank steps of the banks that share member shape and
    #: settings (the expert stacks of every layer) run as one kernel launch through a table of
    #: member addresses instead of one launch per bank (``NorMuon(merge_launches=...)``).
    merge_launches: bool = False
    #: Separate max / min learning rate of the embedding and output layer (Megatron's
    #: ``decoupled_lr``); unset: the AdamW (aux) learning rates.
    decoupled_lr: Optional[float] = field(default=None, metadata=_meta(ge=0.0))
    decoupled_min_lr: Optional[float] = field(default=None, metadata=_meta(ge=0.0))


@dataclass
class KernelsSection:
    """Which kernels the transformed model runs (not in the fork's TOML; every key optional).

    ``vpmoe_compile.transform`` turns this section into one ``vpmoe_compile.kernels.KernelPolicy``
    (``transform(..., backend=...)`` overrides ``attention``). The optimizer's kernels are
    ``[optimizer] pe_backend``.
    """

    #: Both attention ops (global sink attention, local TPA): "auto" (Triton on CUDA where the
    #: kernels support the shapes, the PyTorch reference elsewhere), "triton" or "reference".
    attention: str = field(default="auto", metadata=_choice("auto", "triton", "reference", required=False))
    #: The MoE experts' grouped GEMM: "auto" (torch._grouped_mm on sm90+ bf16, else the
    #: reference op) or "reference".
    grouped_gemm: str = field(default="auto", metadata=_choice("auto", "reference", required=False))


_SECTIONS = {
    "meta": MetaSection,
    "tokenizer": TokenizerSection,
    "model": ModelSection,
    "attention": AttentionSection,
    "tpa": TPASection,
    "grape": GrapeSection,
    "moe": MoESection,
    "optimizer": OptimizerSection,
    "kernels": KernelsSection,
}

#: The sections that describe the model (all required without ``[meta] base``).
MODEL_SECTIONS = ("tokenizer", "model", "attention", "tpa", "grape", "moe")

#: Model keys per section that a config without ``[meta] base`` must state.
REQUIRED_KEYS: Dict[str, Tuple[str, ...]] = {
    s: tuple(f.name for f in fields(_SECTIONS[s]) if f.metadata.get("required")) for s in MODEL_SECTIONS
}
#: Keys of the model sections that have a documented default (not in the fork's TOML).
DEFAULTED_KEYS: Dict[str, Tuple[str, ...]] = {
    s: tuple(f.name for f in fields(_SECTIONS[s]) if not f.metadata.get("required")) for s in MODEL_SECTIONS
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
    kernels: KernelsSection = field(default_factory=KernelsSection)
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
        """Check every value against its domain and the cross-key rules; returns ``self``."""
        where = self.source or "config"
        for name, cls in _SECTIONS.items():
            section = getattr(self, name)
            for f in fields(cls):
                _check_value(name, f, getattr(section, f.name), where)
        m, t, moe, opt = self.model, self.tpa, self.moe, self.optimizer
        if m.num_attention_heads % m.num_query_groups:
            raise ConfigError(
                f"{where}: [model] num_attention_heads ({m.num_attention_heads}) must be a multiple of "
                f"num_query_groups ({m.num_query_groups})"
            )
        if m.head_dim % 2:
            raise ConfigError(
                f"{where}: [model] head_dim must be even for rotary/GRAPE-M planes, got {m.head_dim}"
            )
        if m.activation == "swiglu" and not m.gated_linear_unit:
            raise ConfigError(
                f"{where}: [model] activation = 'swiglu' needs gated_linear_unit = true (SwiGLU is the gated "
                "SiLU unit; without the gate it would be a plain SiLU MLP)"
            )
        if moe.topk > moe.num_experts:
            raise ConfigError(f"{where}: [moe] topk ({moe.topk}) must be <= num_experts ({moe.num_experts})")
        if moe.topk == 1 and moe.router_score_function == "softmax":
            raise ConfigError(
                f"{where}: [moe] topk = 1 with router_score_function = 'softmax' is refused by Megatron (a "
                "softmax over the one selected score has zero gradient); use topk >= 2 or 'sigmoid'"
            )
        if moe.router_enable_expert_bias and moe.router_score_function != "sigmoid":
            raise ConfigError(
                f"{where}: [moe] router_enable_expert_bias = true needs router_score_function = 'sigmoid' "
                "(Megatron's aux-loss-free expert bias supports only sigmoid scores); set "
                "router_enable_expert_bias = false to use 'softmax'"
            )
        if moe.router_num_groups:
            if moe.num_experts % moe.router_num_groups:
                raise ConfigError(
                    f"{where}: [moe] router_num_groups ({moe.router_num_groups}) must divide num_experts "
                    f"({moe.num_experts}); use 0 to disable group-limited routing"
                )
            if not (0 < moe.router_group_topk <= moe.router_num_groups):
                raise ConfigError(
                    f"{where}: [moe] router_group_topk must be in 1..router_num_groups "
                    f"({moe.router_num_groups}), got {moe.router_group_topk}"
                )
            per_group = moe.num_experts // moe.router_num_groups
            most = moe.router_group_topk * per_group
            if not (moe.router_group_topk <= moe.topk <= most):
                raise ConfigError(
                    f"{where}: [moe] topk ({moe.topk}) must be in {moe.router_group_topk}..{most} with "
                    f"group-limited routing: each token picks router_group_topk "
                    f"({moe.router_group_topk}) groups of {per_group} experts "
                    f"(num_experts / router_num_groups), ranked by their top "
                    f"topk // router_group_topk scores, and its topk experts among them"
                )
        elif moe.router_group_topk:
            raise ConfigError(
                f"{where}: [moe] router_group_topk = {moe.router_group_topk} needs router_num_groups > 0 "
                "(group-limited routing); set router_group_topk = 0 to disable it"
            )
        if t.use_tpa and t.tpa_q_rank < 1:
            raise ConfigError(f"{where}: [tpa] tpa_q_rank must be >= 1")
        if opt.min_lr > opt.lr:
            raise ConfigError(
                f"{where}: [optimizer] min_lr ({opt.min_lr!r}) must be <= [optimizer] lr ({opt.lr!r}) (the "
                "schedule decays from lr to min_lr)"
            )
        aux_lr = opt.lr if opt.normuon_aux_lr is None else opt.normuon_aux_lr
        if opt.normuon_aux_min_lr is not None and opt.normuon_aux_min_lr > aux_lr:
            raise ConfigError(
                f"{where}: [optimizer] normuon_aux_min_lr ({opt.normuon_aux_min_lr!r}) must be <= "
                f"normuon_aux_lr ({aux_lr!r}"
                + (", from lr since normuon_aux_lr is not set" if opt.normuon_aux_lr is None else "")
                + ")"
            )
        if opt.normuon_aux_min_lr is None and opt.min_lr > aux_lr:
            raise ConfigError(
                f"{where}: [optimizer] normuon_aux_lr ({aux_lr!r}) is below the auxiliary minimum lr: "
                f"normuon_aux_min_lr is not set, so it is min_lr ({opt.min_lr!r}); set "
                "normuon_aux_min_lr <= normuon_aux_lr"
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


def _is_float_field(f) -> bool:
    return "float" in (f.type if isinstance(f.type, str) else _type_name(f.type))


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _domain(key: str, meta: Dict[str, Any], is_float: bool) -> str:
    """The allowed range of a numeric key, e.g. ``0 <= adam_beta2 < 1 (why)``."""
    lower = f"{_num(meta['ge'])} <= " if "ge" in meta else (f"{_num(meta['gt'])} < " if "gt" in meta else "")
    upper = f" <= {_num(meta['le'])}" if "le" in meta else (f" < {_num(meta['lt'])}" if "lt" in meta else "")
    if lower and not upper:  # "lr >= 0" reads better than "0 <= lr"
        text = f"{key} >= {_num(meta['ge'])}" if "ge" in meta else f"{key} > {_num(meta['gt'])}"
    elif lower or upper:
        text = f"{lower}{key}{upper}"
    else:
        text = f"any {'finite number' if is_float else 'integer'}"
    if is_float and (lower or upper):
        text += ", finite"
    if "multiple_of" in meta:
        text += f" and a multiple of {meta['multiple_of']}"
    if meta.get("note"):
        text += f" ({meta['note']})"
    return text


def _check_value(section: str, f, value, where: str) -> None:
    """Raise a ConfigError naming ``[section] key`` if ``value`` is outside the field's domain."""
    key, meta = f.name, f.metadata
    if not _type_ok(value, f.type):
        raise ConfigError(
            f"{where}: [{section}] {key} = {value!r} has the wrong type; expected {_type_name(f.type)}"
        )
    if value is None:  # Optional keys: None means "not set" (TOML cannot write it)
        return
    choices = meta.get("choices")
    if choices is not None:
        if value not in choices:
            raise ConfigError(
                f"{where}: [{section}] {key} = {value!r} is not allowed; allowed values: "
                f"{', '.join(repr(c) for c in choices)}"
            )
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    is_float = _is_float_field(f)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(
            f"{where}: [{section}] {key} = {value!r} is not a finite number; allowed: "
            f"{_domain(key, meta, is_float)}"
        )
    too_small = ("ge" in meta and value < meta["ge"]) or ("gt" in meta and value <= meta["gt"])
    too_large = ("le" in meta and value > meta["le"]) or ("lt" in meta and value >= meta["lt"])
    if too_small or too_large:
        raise ConfigError(
            f"{where}: [{section}] {key} = {value!r} is too {'small' if too_small else 'large'}; "
            f"allowed: {_domain(key, meta, is_float)}"
        )
    if "multiple_of" in meta and value % meta["multiple_of"]:
        raise ConfigError(
            f"{where}: [{section}] {key} = {value!r} is not a multiple of {meta['multiple_of']}; "
            f"allowed: {_domain(key, meta, is_float)}"
        )


#: Keys that existed once: ``(section, key) -> (the value that still means today's behaviour, why
#: the key went)``. That value is accepted and ignored with a warning (configs and checkpoints
#: written before the removal record it); any other value is an error that says the key was removed.
REMOVED_KEYS: Dict[Tuple[str, str], Tuple[Any, str]] = {
    ("kernels", "tpa_attention_middle"): (
        "own",
        "the TPA op runs one sliding-window kernel family, its own (the \"own\" choice); the "
        "\"shared\" choice, the sink-attention kernels' window path, was deleted after the measured "
        "H100 comparison (benchmarks/results/window_kernels.json)",
    ),
}


def _removed_key(section: str, key: str, value: Any, where: str, warn: bool) -> None:
    """Warn about (kept value; when ``warn``) or refuse (any other) a key of :data:`REMOVED_KEYS`."""
    kept, why = REMOVED_KEYS[(section, key)]
    if value == kept:
        if warn:
            warnings.warn(f"{where}: [{section}] {key} = {value!r} is ignored: the key was removed ({why}); "
                          "delete it from the config", UserWarning, stacklevel=2)
        return
    raise ConfigError(f"{where}: [{section}] {key} was removed ({why}); {key} = {value!r} cannot be honoured: "
                      "delete the key")


def _parse_section(section: str, cls, raw: Dict[str, Any], where: str, warn: bool = True):
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if (section, key) in REMOVED_KEYS:
            _removed_key(section, key, value, where, warn)
            continue
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(
                f"{where}: unknown key [{section}] {key!r}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; allowed keys: {', '.join(sorted(known))}"
            )
        f = known[key]
        _check_value(section, f, value, where)
        if _is_float_field(f) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kwargs[key] = value
    return cls(**kwargs)


def _check_sections(data: Dict[str, Any], where: str) -> None:
    """Unknown sections, non-table sections, unknown keys and bad values of ``data`` itself."""
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
        _parse_section(section, _SECTIONS[section], raw, where, warn=False)  # warned when built


_BASE_HINT = " | ".join(f'"{p}"' for p in PRESETS)


def _read_toml(path: Path) -> Dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def _with_base(data: Dict[str, Any], where: str, chain: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """``data`` with the omitted keys filled from its ``[meta] base`` preset (recursively).

    ``[meta]`` is the file's own; without ``base`` ``data`` is returned as it is.
    """
    base = data.get("meta", {}).get("base", "")
    if base == "":
        return data
    if base not in PRESETS:
        raise ConfigError(
            f"{where}: [meta] base = {base!r} is not a preset; allowed values: "
            f"{', '.join(repr(p) for p in PRESETS)} (or leave base out and state every model key)"
        )
    if base in chain:
        raise ConfigError(f"{where}: [meta] base presets form a cycle: {' -> '.join(chain + (base,))}")
    path = PRESET_DIR / f"{base}.toml"
    parent = _read_toml(path)
    _check_sections(parent, str(path))
    parent = _with_base(parent, str(path), chain + (base,))
    merged: Dict[str, Any] = {s: dict(raw) for s, raw in parent.items() if s != "meta"}
    for section, raw in data.items():
        merged[section] = {**merged.get(section, {}), **raw} if section != "meta" else dict(raw)
    return merged


def _check_complete(data: Dict[str, Any], where: str) -> None:
    """A config without ``[meta] base`` must state every model key (see the module docstring)."""
    missing: Dict[str, List[str]] = {}
    for section in MODEL_SECTIONS:
        raw = data.get(section, {})
        keys = [k for k in REQUIRED_KEYS[section] if k not in raw]
        if keys:
            missing[section] = keys
    if not missing:
        return
    every = " ".join(f"[{s}]" for s in MODEL_SECTIONS)
    if not any(s in data for s in MODEL_SECTIONS):
        raise ConfigError(
            f"{where}: the config states no model; set [meta] base = {_BASE_HINT} to start from "
            f"a preset and give only the keys that differ, or give every section ({every}) with "
            "all of its model keys"
        )
    parts = []
    for section, keys in missing.items():
        if section not in data:
            parts.append(f"[{section}] (the whole section: {', '.join(keys)})")
        else:
            parts.extend(f"[{section}] {k}" for k in keys)
    raise ConfigError(
        f"{where}: the config names no [meta] base preset and leaves out model keys: "
        f"{'; '.join(parts)}. Either set [meta] base = {_BASE_HINT} (its values fill every key "
        f"the file omits), or give every section ({every}) with all of its model keys; only "
        f"these have a default there: "
        + "; ".join(f"[{s}] {', '.join(k)}" for s, k in DEFAULTED_KEYS.items() if k)
    )


def config_from_dict(data: Dict[str, Any], where: str = "<dict>") -> VpMoEConfig:
    """Build a :class:`VpMoEConfig` from parsed TOML data, validating every key.

    ``data`` either names ``[meta] base`` (a preset that fills what it omits) or states every
    model key; see the module docstring.
    """
    _check_sections(data, where)
    data = _with_base(data, where)
    _check_complete(data, where)
    sections = {s: _parse_section(s, _SECTIONS[s], raw, where) for s, raw in data.items()}
    return VpMoEConfig(**sections, source=where).validate()


def optimizer_section(source: Any = None) -> OptimizerSection:
    """The ``[optimizer]`` settings as an :class:`OptimizerSection` — the one owner of the
    optimizer's defaults and allowed values — from a :class:`VpMoEConfig`, an
    :class:`OptimizerSection`, any object carrying some of its keys as attributes (the others
    keep their defaults; other attributes are ignored), or ``None`` (all defaults). Every value
    is checked as a config file's would be (:class:`ConfigError` naming the key)."""
    if isinstance(source, OptimizerSection):
        return source
    section = source.optimizer if isinstance(source, VpMoEConfig) else source
    raw = {}
    if section is not None:
        for f in fields(OptimizerSection):
            if hasattr(section, f.name):
                raw[f.name] = getattr(section, f.name)
    return _parse_section("optimizer", OptimizerSection, raw, "<optimizer settings>")


def load_config(name_or_path: Union[str, os.PathLike, VpMoEConfig, None] = "tiny") -> VpMoEConfig:
    """Load a preset (``tiny``, ``vpmoe-8l``, ``vpmoe``) or a TOML file.

    A file names ``[meta] base = "<preset>"`` (the preset fills every key the file omits) or
    states every model key; see the module docstring.

    Raises:
        ConfigError: unknown preset/file, unknown section or key, wrong type or value, a
            model key neither stated nor inherited.
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
    data = _read_toml(path)
    cfg = config_from_dict(data, where=str(path))
    cfg.source = text_name
    return cfg
