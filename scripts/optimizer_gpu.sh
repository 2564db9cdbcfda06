#!/usr/bin/env bash
# NorMuon optimizer on a CUDA machine (issue #6): GPU tests, benchmark, Megatron-path check.
#
#   bash scripts/optimizer_gpu.sh OUT_DIR [PHASES] [-- benchmark args...]
#
# PHASES: comma list of tests,bench,check (default all). Logs and results go to OUT_DIR:
# tests.log (tests/vpmoe_compile/optim/test_normuon_gpu.py + test_pe_triton.py: T3 / T11 on the
# GPU), bench.log + optimizer_<set>.json/.png (benchmarks/optimizer.py), check.log (the Megatron-path
# GPU tests, tests/vpmoe_compile/optim/test_build_optimizer_gpu.py: stock and transformed model,
# without and with CUDA graphs; formerly benchmarks/check_megatron_optimizer.py).
# Each phase has a time limit (TESTS_S, BENCH_S, CHECK_S seconds) so one call ends in time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: optimizer_gpu.sh OUT_DIR [PHASES] [-- bench args]}; shift
PHASES=${1:-tests,bench,check}; [ $# -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [[ ",$PHASES," == *",tests,"* ]]; then
  timeout -s INT "${TESTS_S:-100}" python3 -m pytest -q -p no:cacheprovider -rA \
    tests/vpmoe_compile/optim/test_normuon_gpu.py tests/vpmoe_compile/optim/test_pe_triton.py \
    2>&1 | tee "$OUT/tests.log" | tail -n 60
fi
if [[ ",$PHASES," == *",bench,"* ]]; then
  timeout -s INT "${BENCH_S:-180}" python3 benchmarks/optimizer.py --out "$OUT" "$@" \
    2>&1 | tee "$OUT/bench.log" | grep -v "^  " | tail -n 40
fi
if [[ ",$PHASES," == *",check,"* ]]; then
  timeout -s INT "${CHECK_S:-120}" python3 -m pytest -q -p no:cacheprovider -rA \
    tests/vpmoe_compile/optim/test_build_optimizer_gpu.py \
    2>&1 | tee "$OUT/check.log" | tail -n 25
fi
