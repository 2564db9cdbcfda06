"""The benchmark plots read without the README: rendered on the CPU from the recorded JSON
(``benchmarks/results``) or small synthetic results, every figure is checked for

* log axes labelled with plain numbers (no 10^k / scientific notation),
* tick labels of one axis that do not overlap each other, and value labels inside their axes,
* legends and tick labels in words, not the internal variant names the JSON is keyed by."""

import json
import re
from pathlib import Path

import pytest

from tests.benchmarks._load import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
INTERNAL_NAMES = re.compile(
    r"\b(stock_eager|transformed_eager|transformed_compiled|stock_megatron|fused_torch_ops|fork_loop|"
    r"batched_eager|batched_compiled|pe_kernel\w*|bank_kernel\w*|tiktoken_loop|ours_loop|tiktoken_batch|"
    r"ours_batch|workers_\d+)\b"
)
PLAIN_NUMBER = re.compile(r"^−?[\d,]+(\.\d+)?$")

pytest.importorskip("matplotlib")


_load = load_benchmark


@pytest.fixture()
def figures(monkeypatch):
    """Every figure saved during the test (savefig still writes the file)."""
    from matplotlib.figure import Figure

    saved = []
    original = Figure.savefig

    def savefig(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


def _check(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()  # plot() closed the figure; draw it again to lay out the text
    renderer = fig.canvas.get_renderer()
    words = []
    for ax in fig.axes:
        frame = ax.get_window_extent(renderer)
        for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
            labels = [t for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]
            texts = [t.get_text() for t in labels]
            words += texts
            if scale == "log":
                assert texts and all(PLAIN_NUMBER.match(t) for t in texts), texts
            boxes = [t.get_window_extent(renderer) for t in labels]
            for i in range(len(boxes)):
                for j in range(i + 1, len(boxes)):
                    assert not boxes[i].overlaps(boxes[j]), (texts[i], texts[j])
        for t in ax.texts:
            if t.get_text().strip():
                box = t.get_window_extent(renderer)
                assert frame.x0 - 1 <= box.x0 and box.x1 <= frame.x1 + 60 and box.y1 <= frame.y1 + 1, t.get_text()
        if ax.get_legend():
            words += [t.get_text() for t in ax.get_legend().get_texts()]
    for legend in fig.legends:
        words += [t.get_text() for t in legend.get_texts()]
    bad = [w for w in words if INTERNAL_NAMES.search(w)]
    assert not bad, bad


def test_tokenizer_plot(tmp_path, figures):
    _load("tokenizer").plot(json.loads((RESULTS / "tokenizer.json").read_text()), str(tmp_path / "t.png"))
    assert len(figures) == 1
    _check(figures[0])


@pytest.mark.parametrize("tag", ["vpmoe-8l", "vpmoe-ep8", "vpmoe-8l_stacked", "vpmoe-8l_separate", "vpmoe-8l_bmm"])
def test_optimizer_plot(tmp_path, figures, tag):
    _load("optimizer").plot(json.loads((RESULTS / f"optimizer_{tag}.json").read_text()), str(tmp_path / "o.png"))
    _check(figures[0])


def test_head_plot(tmp_path, figures):
    _load("head").plot(json.loads((RESULTS / "head.json").read_text()), str(tmp_path / "h.png"))
    _check(figures[0])


@pytest.mark.parametrize("suite", ["global", "window", "tpa"])
def test_attention_plot(tmp_path, figures, suite):
    res = json.loads((RESULTS / f"attention_{suite}.json").read_text())
    _load("attention").plot(res["rows"], res, str(tmp_path / "a.png"))
    _check(figures[0])


def test_step_plot(tmp_path, figures):
    def breakdown(k):
        parts = {p: {"ms_per_micro_batch": v * k, "count_per_micro_batch": c} for p, v, c in (
            ("attention_local", 40, 6), ("attention_global", 20, 2), ("moe_layer", 120, 7), ("dense_mlp", 3, 1),
            ("head_loss", 30, 1))}
        return {"parts": parts, "other_ms": 25 * k, "optimizer_ms": 80}

    rows = [
        {"variant": "stock_eager", "fwd_bwd_ms": 6000.0, "accumulated_step_ms": 48000.0, "accumulated_mfu": 0.005},
        {"variant": "transformed_eager", "fwd_bwd_ms": 260.0, "accumulated_step_ms": 2150.0, "accumulated_mfu": 0.05,
         "breakdown": breakdown(1.0)},
        {"variant": "transformed_compiled", "fwd_bwd_ms": 190.0, "accumulated_step_ms": 1600.0,
         "accumulated_mfu": 0.07, "breakdown": breakdown(0.7)},
    ]
    meta = {"micro_batch": 2, "seq_len": 4096, "accum": 8, "config": "vpmoe-8l", "path": "megatron",
            "dtype": "bf16", "device": "GPU", "torch": "2.x", "date": "2025-01-01T00:00:00"}
    _load("step").plot(rows, meta, tmp_path / "s.png")
    _check(figures[0])


def test_train_parity_plot(tmp_path, figures):
    le = [10.0 - 0.1 * i for i in range(20)]
    lc = [v + 0.002 * (-1) ** i for i, v in enumerate(le)]
    res = {
        "meta": {"config": "tiny", "steps": 20, "micro_batch": 2, "seq_len": 64, "path": "plain", "device": "GPU",
                 "torch": "2.x", "compile_backend": "inductor"},
        "eager": {"losses": le}, "compiled": {"losses": lc},
        "comparison": {"abs_diff": [abs(a - b) for a, b in zip(le, lc)], "within_bf16_tolerance": True,
                       "max_rel_diff": 2e-4, "max_rel_diff_step": 3, "final_window": 5,
                       "final_mean_rel_diff": 1e-5, "same_initial_weights": True},
    }
    _load("train_parity").plot(res, tmp_path / "p.png")
    _check(figures[0])


def test_kernel_goals_plot(tmp_path, figures):
    _load("_kernel_goals").plot(json.loads((RESULTS / "kernel_goals.json").read_text()), str(tmp_path / "k.png"))
    assert len(figures) == 1
    _check(figures[0])


def test_attention_schedule_plot(tmp_path, figures):
    """Synthetic result of ``benchmarks/attention_schedule.py`` (no GPU record of it yet)."""
    mod = _load("attention_schedule")
    kern = dict(zip(mod.KERNELS, (713.0, 824.0, 1625.0)))
    res = {
        "device": "GPU", "tiles": "autotuned per variant",
        "shape": dict(b=8, s=4096, H=8, G=2, d=128, dtype="bf16"),
        "sdpa_default_fwd_bwd_us": 2186.0,
        "variants": {
            name: {"label": mod.VARIANTS[name][-1], "fwd_bwd_us_graph": total,
                   "kernels_us": {k: v * f for k, v in kern.items()}}
            for name, total, f in (("2d", 3191.0, 1.0), ("lpt", 2900.0, 0.9))
        },
    }
    mod.plot(res, str(tmp_path / "s.png"))
    assert len(figures) == 1
    _check(figures[0])


def test_normuon_bank_plot(tmp_path, figures):
    _load("normuon_bank").plot(json.loads((RESULTS / "normuon_bank_h100_run1.json").read_text()),
                               str(tmp_path / "b.png"))
    assert len(figures) == 1
    _check(figures[0])
