#!/usr/bin/env bash
# The train command, checkpoint resume and the example on a CUDA machine (one GPU).
#
#   bash scripts/gpu_train.sh OUT_DIR [CONFIG]
#
# 1. builds the demo dataset (the shipped corpus) under OUT_DIR/data;
# 2. python -m vpmoe_compile train --config CONFIG (default tiny): 6 steps straight, then 3 steps +
#    save + resume to 6, and compares the two logs; a second straight run gives the run-to-run
#    spread of a fresh process (bf16 on GPU: the autotuned global-attention kernel may pick other
#    tiles in another process, so bit-equality is not expected there; printed, not asserted);
#    then 6 steps with --compile, compared with the eager run; the loss/lr plot of each run;
# 3. examples/pretrain_vpmoe.py (train, save, load into a fresh stock model).
# Logs and JSON lines go to OUT_DIR. The repository must be on PYTHONPATH (as gpu_step.sh does).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_train.sh OUT_DIR [CONFIG]}
CFG=${2:-tiny}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PREFIX=$(python3 -c "import sys; from megatron_base import build_demo_dataset; print(build_demo_dataset(sys.argv[1]))" "$OUT/data" | tail -1)
echo "demo data: $PREFIX"
COMMON=(--config "$CFG" --data "$PREFIX" --micro-batch 2 --global-batch 8 --seq-len 128 --warmup-steps 2 --lr-decay-steps 6)
python3 -m vpmoe_compile train "${COMMON[@]}" --steps 6 --log-json "$OUT/full.jsonl" 2>&1 | tail -5 | tee "$OUT/train_full.log"
python3 -m vpmoe_compile train "${COMMON[@]}" --steps 6 --log-json "$OUT/full2.jsonl" 2>&1 | tail -2 | tee "$OUT/train_full2.log"
python3 -m vpmoe_compile train "${COMMON[@]}" --steps 3 --save "$OUT/ck" --save-interval 3 --log-json "$OUT/resumed.jsonl" 2>&1 | tail -5 | tee "$OUT/train_first.log"
python3 -m vpmoe_compile train "${COMMON[@]}" --steps 6 --load "$OUT/ck" --save "$OUT/ck" --log-json "$OUT/resumed.jsonl" 2>&1 | tail -5 | tee "$OUT/train_resumed.log"
python3 -m vpmoe_compile train "${COMMON[@]}" --steps 6 --compile --log-json "$OUT/compiled.jsonl" 2>&1 | tail -5 | tee "$OUT/train_compiled.log"
python3 - "$OUT" <<'PY' | tee "$OUT/resume_compare.log"
import json, sys
out = sys.argv[1]
a = [json.loads(x) for x in open(f"{out}/full.jsonl")]
b = [json.loads(x) for x in open(f"{out}/resumed.jsonl")]
r = [json.loads(x) for x in open(f"{out}/full2.jsonl")]
for x, y, z in zip(a, b, r):
    print(f"step {x['step']}: loss {x['loss']:.6f} vs resumed {y['loss']:.6f} ({'equal' if x['loss'] == y['loss'] else 'DIFFERENT'}), "
          f"vs a second straight run {z['loss']:.6f} ({'equal' if x['loss'] == z['loss'] else 'DIFFERENT'}), "
          f"lr {x['lr']:.3e} / {y['lr']:.3e}, tokens/s {x['tokens_per_s']:.0f}")
try:
    c = [json.loads(x) for x in open(f"{out}/compiled.jsonl")]
except OSError:
    c = []
for x, y in zip(a, c):
    print(f"step {x['step']}: eager loss {x['loss']:.6f} vs compiled {y['loss']:.6f} "
          f"(rel diff {abs(x['loss'] - y['loss']) / x['loss']:.2e}), tokens/s {y['tokens_per_s']:.0f}")
PY
python3 examples/pretrain_vpmoe.py --config "$CFG" --steps 3 --out "$OUT/example" 2>&1 | grep -v -i warn | tail -6 | tee "$OUT/example.log"
ls "$OUT" "$OUT/ck"
