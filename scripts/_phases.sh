# Sourced by the GPU scripts (gpu_step.sh, gpu_kernel_goals.sh): run_phase runs one phase of a
# script under a time limit and records its exit status in RC; finish_phases prints every
# phase's status and returns 1 if any failed.
declare -A RC=()
run_phase() {  # name limit_s log -- command...: at the limit SIGINT, 30 s later SIGKILL
  local name=$1 limit=$2 log=$3; shift 3
  echo "=== [$name] $(date -u +%H:%M:%S) limit ${limit}s: $*" | tee "$log"
  local t0=$SECONDS
  timeout -s INT -k 30 "$limit" "$@" 2>&1 | tee -a "$log"
  RC[$name]=${PIPESTATUS[0]}
  echo "=== [$name] rc ${RC[$name]} after $((SECONDS - t0)) s" | tee -a "$log"
}
finish_phases() {
  local status=0 k
  for k in "${!RC[@]}"; do
    echo "phase $k: rc ${RC[$k]}"
    [ "${RC[$k]}" = 0 ] || status=1
  done
  return $status
}
