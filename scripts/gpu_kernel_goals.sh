#!/usr/bin/env bash
# The kernel speed goals on a CUDA machine (one H100): every number of OUT_DIR/kernel_goals.json
# (and its PNG) in one run, each ratio measured within its own benchmark run.
#
#   bash scripts/gpu_kernel_goals.sh OUT_DIR [PHASES]
#
# PHASES: comma list of global,schedule,tpa_tests,tpa,normuon,normuon_separate,normuon_bank
# (default global,tpa,normuon):
#   global    benchmarks/attention.py --suite global --kernel-sweep  -> attention_global.json/.png
#             (ours vs SDPA default in one run; per-kernel profile of ours)
#   schedule  benchmarks/attention_schedule.py --tag tuned           -> attention_schedule_tuned.json/.png
#             (the global kernels' two grid orders, each autotuned, vs SDPA default in one run),
#             then the bf16 accuracy tests of both orders (tests/.../test_sink_attention_gpu.py)
#   tpa_tests the bf16 GPU tests of the sliding-window attention, at every tile candidate of
#             benchmarks/tpa.py --tune (packed heads included), before the tune may pick one
#   tpa       benchmarks/tpa.py --skip-chain                         -> tpa_bench.json
#             (the fused TPA op, CUDA-graph replay, per-kernel profile)
#   normuon_separate  benchmarks/optimizer.py --experts separate     -> optimizer_vpmoe-8l_separate.json
#             (the stock one-matrix-per-expert layout, for comparison; runs before normuon so the
#             goal record keeps the stacked layout's numbers)
#   normuon   benchmarks/optimizer.py (experts stacked as the moe pass holds them) -> optimizer_vpmoe-8l.json
#   normuon_bank  the GPU tests of the bank kernel's workspaces (per SM, restart without a store) and
#             of several banks in one launch (merge_launches), then benchmarks/normuon_bank.py
#             (bank-kernel variants on the expert stacks) -> normuon_bank.json/.png
# Each phase has a time limit in seconds (GLOBAL_S, SCHEDULE_S, TPA_S, NORMUON_S, NORMUON_BANK_S;
# TPA_TESTS_S; defaults 240 / 420 / 150 / 240 / 240 / 240; the device allows 600 s per call, so group the phases to fit):
# at the limit it gets SIGINT, 30 s later SIGKILL. A failing phase does not stop the next; the exit
# status is 1 if any failed. NORMUON_VARIANTS picks the optimizer variants
# (default bank_kernel_graph,bank_kernel_graph_direct,bank_kernel_graph_direct_gram),
# NORMUON_SEPARATE_VARIANTS those of normuon_separate (default pe_kernel_graph, that layout's best);
# NORMUON_ARGS adds arguments to the normuon phase (e.g. --pe-tune: the launch sweep first), TPA_ARGS
# to the tpa phase (e.g. --tune: every kernel's tiles timed first).
#
# No installation: the repository is put on PYTHONPATH in front of whatever is there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_kernel_goals.sh OUT_DIR [PHASES]}; shift
PHASES=${1:-global,tpa,normuon}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,temperature.gpu --format=csv,noheader || true
VARIANTS=${NORMUON_VARIANTS:-bank_kernel_graph,bank_kernel_graph_direct,bank_kernel_graph_direct_gram}
# shellcheck source=scripts/_phases.sh
source scripts/_phases.sh
has() { [[ ",$PHASES," == *",$1,"* ]]; }
has global && run_phase global "${GLOBAL_S:-240}" "$OUT/global.log" \
  python3 benchmarks/attention.py --suite global --kernel-sweep --out "$OUT"
has schedule && run_phase schedule "${SCHEDULE_S:-420}" "$OUT/schedule.log" bash -c \
  "python3 benchmarks/attention_schedule.py --tag tuned --out '$OUT' && \
   python3 -m pytest -q -p no:cacheprovider tests/vpmoe_compile/ops/test_sink_attention_gpu.py -k grid_orders"
has tpa_tests && run_phase tpa_tests "${TPA_TESTS_S:-240}" "$OUT/tpa_tests.log" \
  python3 -m pytest -q -p no:cacheprovider tests/vpmoe_compile/ops/test_tpa_attention_gpu.py -k window_attention
has tpa && run_phase tpa "${TPA_S:-150}" "$OUT/tpa.log" python3 benchmarks/tpa.py --skip-chain ${TPA_ARGS:-} --out "$OUT"
has normuon_separate && run_phase normuon_separate "${NORMUON_S:-240}" "$OUT/normuon_separate.log" \
  python3 benchmarks/optimizer.py --experts separate --skip-fork --variants "${NORMUON_SEPARATE_VARIANTS:-pe_kernel_graph}" --out "$OUT"
has normuon && run_phase normuon "${NORMUON_S:-240}" "$OUT/normuon.log" \
  python3 benchmarks/optimizer.py --skip-fork --variants "$VARIANTS" ${NORMUON_ARGS:-} --out "$OUT"
has normuon_bank && run_phase normuon_bank "${NORMUON_BANK_S:-240}" "$OUT/normuon_bank.log" bash -c \
  "python3 -m pytest -q -p no:cacheprovider tests/vpmoe_compile/optim/test_pe_triton.py tests/vpmoe_compile/optim/test_normuon_gpu.py \
     -k 'workspace_and_restart or sm_workspace or one_launch or merged_launches' && \
   python3 benchmarks/normuon_bank.py --out '$OUT'"
finish_phases; status=$?
[ -f "$OUT/kernel_goals.json" ] && cat "$OUT/kernel_goals.json"
exit $status
