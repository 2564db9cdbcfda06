#!/usr/bin/env bash
# Whole-step benchmark + training parity on a CUDA machine (one H100).
#
#   bash scripts/gpu_step.sh OUT_DIR [PHASES] [-- extra benchmarks/step.py args]
#
# PHASES: comma list of tests,step,parity (default tests,step,parity), run in that order:
#   tests   python3 -m pytest -q -p no:cacheprovider -m gpu tests/      -> OUT_DIR/tests.log
#   step    benchmarks/step.py --out OUT_DIR [args]                     -> step.json, step.png, step.log
#   parity  benchmarks/train_parity.py --out OUT_DIR $PARITY_ARGS       -> train_parity.json/.png/.log
# (The former window phase, benchmarks/window_kernels.py, compared the two sliding-window kernel
# families; it was deleted with the second family: its record is benchmarks/results/window_kernels.json.)
# Each phase has a time limit in seconds (TESTS_S, STEP_S, PARITY_S; defaults 300 / 420 / 240):
# at the limit it gets SIGINT (step.py and train_parity.py then write what they have), 30 s
# later SIGKILL. A failing phase does not stop the next; the exit status is 1 if any failed.
#
# No installation: the repository is put on PYTHONPATH in front of whatever is there (e.g.
# megatron-core installed from wheels into /tmp/site with PYTHONPATH=/tmp/site).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_step.sh OUT_DIR [PHASES] [-- step.py args]}; shift
PHASES=${1:-tests,step,parity}; [ $# -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,temperature.gpu --format=csv,noheader || true
python3 - <<'PY' 2>&1 | grep -v -i "warn" | tee "$OUT/env.log"
import importlib.metadata as md, torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda,
      "megatron-core", md.version("megatron-core"), "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
import megatron.core, vpmoe_compile  # fail here, clearly, if either is not importable
print("megatron.core from", megatron.core.__file__, "; vpmoe_compile from", vpmoe_compile.__file__)
PY
# shellcheck source=scripts/_phases.sh
source scripts/_phases.sh
if [[ ",$PHASES," == *",tests,"* ]]; then
  run_phase tests "${TESTS_S:-300}" "$OUT/tests.log" python3 -m pytest -q -p no:cacheprovider -rA -m gpu tests/
fi
if [[ ",$PHASES," == *",step,"* ]]; then
  run_phase step "${STEP_S:-420}" "$OUT/step.log" python3 benchmarks/step.py --out "$OUT" "$@"
fi
if [[ ",$PHASES," == *",parity,"* ]]; then
  # shellcheck disable=SC2086
  run_phase parity "${PARITY_S:-240}" "$OUT/train_parity.log" python3 benchmarks/train_parity.py --out "$OUT" ${PARITY_ARGS:-}
fi
finish_phases; status=$?
ls -la "$OUT"
exit $status
