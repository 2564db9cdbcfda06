"""The kernel policy: the ``[kernels]`` config section, ``KernelPolicy`` and the one resolution rule."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_base.config import ConfigError, KernelsSection, load_config
from vpmoe_compile import kernels as K
from vpmoe_compile.kernels import KernelPolicy, KernelPolicyError, resolve_backend

TINY_TPA = {"head_dim": 16, "q_rank": 4, "kv_rank": 2}  # head_dim/2 = 8: outside the TPA kernels' tiles
VPMOE_TPA = {"head_dim": 128, "q_rank": 4, "kv_rank": 2}


def test_config_domains_are_the_policys():
    """megatron_base cannot import vpmoe_compile: the two spellings of the domains must agree."""
    choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(KernelsSection)}
    assert set(choices["attention"]) == set(K.ATTENTION_BACKENDS)
    assert set(choices["grouped_gemm"]) == set(K.GROUPED_GEMM_BACKENDS)
    assert {f.name for f in dataclasses.fields(KernelsSection)} == {f.name for f in dataclasses.fields(KernelPolicy)}
    assert KernelPolicy.from_config(load_config("tiny")) == KernelPolicy()  # defaults agree too


@pytest.mark.parametrize("preset", ["tiny", "vpmoe-8l", "vpmoe"])
def test_presets_load_with_the_default_policy(preset):
    assert load_config(preset).kernels == KernelsSection()


def test_kernels_section_is_read_and_validated(tmp_path):
    path = tmp_path / "k.toml"
    path.write_text('[meta]\nbase = "tiny"\n[kernels]\nattention = "reference"\ngrouped_gemm = "reference"\n')
    cfg = load_config(path)
    assert KernelPolicy.from_config(cfg) == KernelPolicy("reference", "reference")
    assert KernelPolicy.from_config(cfg, attention="auto").attention == "auto"  # transform(backend=...)
    path.write_text('[meta]\nbase = "tiny"\n[kernels]\nattention = "cuda"\n')
    with pytest.raises(ConfigError, match=r"\[kernels\] attention = 'cuda' is not allowed"):
        load_config(path)
    path.write_text('[meta]\nbase = "tiny"\n[kernels]\ngrouped_gem = "auto"\n')
    with pytest.raises(ConfigError, match="grouped_gemm"):
        load_config(path)
    with pytest.raises(ValueError, match="grouped_gemm"):
        KernelPolicy(grouped_gemm="triton")


def test_removed_tpa_attention_middle_is_refused_or_ignored(tmp_path):
    """``[kernels] tpa_attention_middle`` was removed (one sliding-window kernel family): asking for
    the deleted "shared" kernels (or any other value) is an error that says so; "own", today's only
    behaviour (and what every config or checkpoint written before recorded), is ignored with a
    warning. The policy and the op have no such choice any more."""
    path = tmp_path / "k.toml"
    for value in ("shared", "auto"):
        path.write_text(f'[meta]\nbase = "tiny"\n[kernels]\ntpa_attention_middle = "{value}"\n')
        with pytest.raises(ConfigError, match=r"\[kernels\] tpa_attention_middle was removed .*one sliding-window "
                                              r"kernel family.*delete the key"):
            load_config(path)
    path.write_text('[meta]\nbase = "tiny"\n[kernels]\ntpa_attention_middle = "own"\n')
    with pytest.warns(UserWarning, match=r"tpa_attention_middle = 'own' is ignored: the key was removed") as rec:
        cfg = load_config(path)
    assert len(rec) == 1 and cfg.kernels == KernelsSection()
    # a checkpoint's transform state (written before the removal) still restores
    from megatron_base.config import config_from_dict

    state = load_config("tiny").to_dict()
    state["kernels"]["tpa_attention_middle"] = "own"
    with pytest.warns(UserWarning, match="tpa_attention_middle"):
        assert config_from_dict(state).kernels == KernelsSection()
    assert "tpa_attention_middle" not in KernelPolicy().to_dict()
    with pytest.raises(TypeError, match="tpa_attention_middle"):
        KernelPolicy(tpa_attention_middle="own")  # noqa - the field is gone
    assert not hasattr(K, "TPA_ATTENTION_MIDDLES")


def test_transform_time_choice_asks_the_kernels():
    assert KernelPolicy().backend("tpa_attention", TINY_TPA) == "reference"
    assert KernelPolicy().backend("tpa_attention", VPMOE_TPA) == "auto"
    assert KernelPolicy(attention="triton").backend("tpa_attention", VPMOE_TPA) == "triton"
    assert KernelPolicy(attention="reference").backend("tpa_attention", VPMOE_TPA) == "reference"
    assert KernelPolicy().backend("sink_attention", {"head_dim": 16}) == "auto"
    assert KernelPolicy().backend("sink_attention", {"head_dim": 24}) == "reference"
    # ALiBi + window: no Triton kernel (the one sliding-window family has no ALiBi)
    assert KernelPolicy().backend("sink_attention", {"head_dim": 128, "alibi_with_window": True}) == "reference"
    with pytest.raises(KernelPolicyError, match="ALiBi slopes together with a sliding window"):
        KernelPolicy(attention="triton").backend("sink_attention", {"head_dim": 128, "alibi_with_window": True})
    with pytest.raises(KernelPolicyError, match="power of two >= 16"):  # the kernel's own reason
        KernelPolicy(attention="triton").backend("tpa_attention", TINY_TPA)
    with pytest.raises(KernelPolicyError, match="ranks <= 4"):
        KernelPolicy(attention="triton").backend("tpa_attention", {"head_dim": 128, "q_rank": 8, "kv_rank": 2})
    assert KernelPolicy(grouped_gemm="reference").backend("grouped_mm", {"k": 64, "n": 32}) == "reference"


def test_per_call_auto_never_picks_the_interpreter():
    def yes(shapes, dtype=None, device=None):
        return True

    kw = dict(allowed=K.ATTENTION_BACKENDS, supports=yes, shapes={}, dtype=torch.float32, what="op")
    assert resolve_backend("auto", device=torch.device("cpu"), **kw) == "reference"
    assert resolve_backend("auto", device="cuda", **kw) == "triton"
    assert resolve_backend("auto", device="cuda", **dict(kw, supports=lambda *a: False)) == "reference"
    assert resolve_backend("triton", device="cpu", **kw) == "triton"
    with pytest.raises(ValueError, match="op: backend must be one of"):
        resolve_backend("cuda", device="cpu", **kw)


def test_transform_hands_the_policy_to_the_modules(tiny_model, tmp_path):
    import vpmoe_compile
    from vpmoe_compile.modules.attention import SinkCoreAttention
    from vpmoe_compile.modules.tpa import TPACoreAttention

    path = tmp_path / "k.toml"
    path.write_text('[meta]\nbase = "tiny"\n[kernels]\ngrouped_gemm = "reference"\n')
    vpmoe_compile.transform(tiny_model, path, backend="reference")
    policy = tiny_model.vpmoe_transform.kernels
    assert policy == KernelPolicy("reference", "reference")
    cores = [m for m in tiny_model.modules() if isinstance(m, (SinkCoreAttention, TPACoreAttention))]
    assert len(cores) == 4 and all(m.kernels is policy and m.backend == "reference" for m in cores)
    experts = [m.experts for m in tiny_model.modules() if hasattr(m, "sort_dispatch")]
    assert experts and all(e.backend == "reference" for e in experts)


def test_explicit_triton_is_refused_before_anything_changes(tiny_model):
    import vpmoe_compile
    from passes.base import PassError

    before = [(n, type(m)) for n, m in tiny_model.named_modules()]
    with pytest.raises(PassError, match=r"\[kernels\] attention = 'triton'.*tpa_attention"):
        vpmoe_compile.transform(tiny_model, backend="triton")  # tiny: head_dim 16
    assert [(n, type(m)) for n, m in tiny_model.named_modules()] == before
    with pytest.raises(vpmoe_compile.TransformError, match="backend='cuda'"):
        vpmoe_compile.transform(tiny_model, backend="cuda")
