"""``<out>/kernel_goals.json``: the kernel speed goals, one record the benchmark scripts fill in.

Keys (each written by the script that measures it, with the command and time of that run):

* ``tpa_fwd_bwd_us`` — the fused TPA op from factors, fwd+bwd, CUDA-graph replay (``tpa.py``,
  or ``attention.py --suite tpa``); goal ≤ 350 µs.
* ``global_fwd_bwd_us`` and ``sdpa_default_fwd_bwd_us`` — our causal ALiBi + sink attention and
  PyTorch SDPA's default causal backend (cuDNN on an H100; no bias, no sink), fwd+bwd, CUDA-graph
  replay, measured in the same run (``attention.py --suite global``); goal: ours ≤ SDPA.
* ``normuon_step_ms`` and ``normuon_floor_ms`` — the best NorMuon step variant and its roofline
  floor measured on the same device in the same run (``optimizer.py``); goal ≤ 2× the floor.

A script updates only its own keys and keeps the others when the record is from the same device
(a record from another device is replaced whole). The file is written atomically (a temporary
file renamed over it). ``goals`` holds each goal's verdict for the keys present.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict

FILE = "kernel_goals.json"
TPA_GOAL_US = 350.0
NORMUON_GOAL_X_FLOOR = 2.0


def verdicts(rec: Dict[str, Any]) -> Dict[str, Any]:
    """Each goal whose numbers are present: the measured ratio and whether it is met."""
    out: Dict[str, Any] = {}
    if rec.get("tpa_fwd_bwd_us"):
        out["tpa_le_350us"] = {"value_us": rec["tpa_fwd_bwd_us"], "goal_us": TPA_GOAL_US,
                               "met": rec["tpa_fwd_bwd_us"] <= TPA_GOAL_US}
    if rec.get("global_fwd_bwd_us") and rec.get("sdpa_default_fwd_bwd_us"):
        ratio = rec["global_fwd_bwd_us"] / rec["sdpa_default_fwd_bwd_us"]
        out["global_le_sdpa"] = {"ratio": ratio, "met": ratio <= 1.0}
    if rec.get("normuon_step_ms") and rec.get("normuon_floor_ms"):
        ratio = rec["normuon_step_ms"] / rec["normuon_floor_ms"]
        out["normuon_le_2x_floor"] = {"ratio": ratio, "goal": NORMUON_GOAL_X_FLOOR,
                                      "met": ratio <= NORMUON_GOAL_X_FLOOR}
    return out


def update(out_dir: str, device: str, values: Dict[str, float], *, script: str, details: Dict[str, Any] = None) -> Dict:
    """Merge ``values`` (some of the keys above) measured on ``device`` into
    ``<out_dir>/kernel_goals.json``; returns the record written."""
    path = os.path.join(out_dir, FILE)
    rec: Dict[str, Any] = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            rec = {}
        if rec.get("device") != device:
            rec = {}
    rec["device"] = device
    rec.update({k: float(v) for k, v in values.items()})
    runs = rec.setdefault("runs", {})
    runs[script] = {"keys": sorted(values), "command": "python " + " ".join([script] + sys.argv[1:]),
                    "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(details or {})}
    rec["goals"] = verdicts(rec)
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".{FILE}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(rec, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        plot(rec, os.path.join(out_dir, "kernel_goals.png"))
    except Exception as e:  # the plot must not lose the numbers
        print("kernel_goals plot failed:", e)
    return rec


GOAL_LABELS = {
    "tpa_le_350us": "fused TPA op fwd+bwd\nvs its 350 us goal",
    "global_le_sdpa": "global ALiBi+sink attention fwd+bwd\nvs PyTorch SDPA (default, no bias/sink)",
    "normuon_le_2x_floor": "NorMuon step\nvs 2x its roofline floor",
}


def plot(rec: Dict[str, Any], path: str) -> None:
    """One bar per goal: measured time / goal time (< 1 is met), the two times written beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    g = rec.get("goals", {})
    if "tpa_le_350us" in g:
        rows.append(("tpa_le_350us", rec["tpa_fwd_bwd_us"] / TPA_GOAL_US,
                     f"{rec['tpa_fwd_bwd_us']:,.0f} us vs {TPA_GOAL_US:,.0f} us"))
    if "global_le_sdpa" in g:
        rows.append(("global_le_sdpa", g["global_le_sdpa"]["ratio"],
                     f"{rec['global_fwd_bwd_us']:,.0f} us vs {rec['sdpa_default_fwd_bwd_us']:,.0f} us"))
    if "normuon_le_2x_floor" in g:
        goal_ms = NORMUON_GOAL_X_FLOOR * rec["normuon_floor_ms"]
        rows.append(("normuon_le_2x_floor", rec["normuon_step_ms"] / goal_ms,
                     f"{rec['normuon_step_ms']:.2f} ms vs {goal_ms:.2f} ms"))
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.9 * len(rows)))
    ys = range(len(rows))
    vals = [r[1] for r in rows]
    ax.barh(list(ys), vals, color=["C2" if v <= 1 else "C3" for v in vals], height=0.5)
    for y, (_, v, text) in zip(ys, rows):
        ax.text(v + 0.03, y, f"{v:.2f}x  ({text})", va="center", fontsize=8)
    ax.axvline(1.0, color="k", ls="--", lw=1, label="goal (bar left of the line: met)")
    ax.set_yticks(list(ys))
    ax.set_yticklabels([GOAL_LABELS[r[0]] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(vals + [1.0]) * 1.6)
    ax.set_xlabel("measured time / goal time (green: met, red: missed)")
    ax.set_title(f"Kernel speed goals, {rec.get('device', '')}: each ratio from one run", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":  # redraw the PNG from a record: python benchmarks/_kernel_goals.py DIR
    d = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    with open(os.path.join(d, FILE)) as f:
        plot(json.load(f), os.path.join(d, "kernel_goals.png"))
