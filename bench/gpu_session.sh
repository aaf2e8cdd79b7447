#!/usr/bin/env bash
# GPU checks and benchmarks in budgeted steps, everything logged and packed into one archive per call.
#
#   bash bench/gpu_session.sh OUTDIR [STEP ...]       STEP in: build lora rsvd e2e tests   (default: all five)
#
# Each call must end inside a wall-clock limit (LIMIT_S, default 570 s), so each step gets a budget, is cut by
# `timeout` before the limit, and the benchmarks themselves stop starting new cases when their budget is spent
# (they append every finished case to their CSV, so a cut run keeps what it measured).  The archive is written
# last, always: OUTDIR/gpu_<steps>.tar.gz.  Steps that need the package build it first if it is not built.
#
# Planned use with 30 minutes of GPU time in 10-minute commands (estimates, to be replaced by measurements):
#   call 1:  build lora rsvd     (build ~2 min, lora 240 s, rsvd what is left of 570 s)
#   call 2:  build e2e tests     (build skipped when the machine is still warm; e2e 260 s, tests what is left)
# Step budgets can be overridden: BUDGET_LORA, BUDGET_RSVD, BUDGET_E2E, BUDGET_TESTS (seconds).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_results}"
shift || true
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build lora rsvd e2e tests)
limit="${LIMIT_S:-570}"
start=$(date +%s)
name="gpu_$(IFS=_; echo "${steps[*]}")"
run_dir="$out/$name"
mkdir -p "$run_dir"
log="$run_dir/session.log"
export PYTHONUNBUFFERED=1
step() { echo "=== $(date -u +%H:%M:%S) +$(( $(date +%s) - start ))s $*" | tee -a "$log"; }
left() { echo $(( limit - ($(date +%s) - start) )); }
# budget NAME DEFAULT: the step's budget, never more than what is left minus a 40 s reserve for packing (0: none left;
# callers then skip the step, since a budget of 0 means "no limit" to the benchmarks and to timeout)
budget() { local b="$2" l; l=$(( $(left) - 40 )); [ "$l" -lt "$b" ] && b="$l"; [ "$b" -lt 0 ] && b=0; echo "$b"; }

tried_build=0  # one build attempt per call: the extension is optional, a failed build is not retried per step
built() { [ "$tried_build" = 1 ] || python3 -c "import lora_kernels as lk, sys; sys.exit(0 if lk.has_extension('cuda') else 1)" 2>/dev/null; }
do_build() {
  if built; then echo "already built (CUDA extension present, or tried in this call)" | tee -a "$log"; return; fi
  tried_build=1
  local b; b=$(budget build 300)
  if [ "$b" -le 0 ]; then echo "skipped build: no time left before the limit" | tee -a "$log"; return; fi
  TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS=16 timeout "$b" \
    python3 -m pip install --no-build-isolation --no-deps -e . >"$run_dir/build.log" 2>&1
  echo "build rc=$?" | tee -a "$log"
  python3 -c "import lora_kernels as lk; print('has_extension cpu', lk.has_extension('cpu'), 'cuda', lk.has_extension('cuda'))" 2>&1 | tee -a "$log"
}

# bench NAME BUDGET GRACE TITLE SCRIPT [ARGS...]: one budgeted benchmark, cut by `timeout` at the step's budget.
# The script itself starts no new case after budget - GRACE seconds, GRACE being room for the case in flight.
bench() {
  local name="$1" want="$2" grace="$3" title="$4" script="$5" b; shift 5
  b=$(budget "$name" "$want")
  if [ "$b" -gt "$grace" ]; then built || do_build; b=$(budget "$name" "$want"); fi
  if [ "$b" -le "$grace" ]; then echo "skipped $name: no time left before the limit" | tee -a "$log"; return; fi
  step "$title ($script $*), budget ${b}s, new cases until $(( b - grace ))s"
  timeout "$b" python3 "bench/$script" "$@" --budget-s $(( b - grace )) --out "$run_dir" \
    >"$run_dir/${script%.py}.log" 2>&1
  echo "rc=$? (124: cut by the timeout)" | tee -a "$log"
  grep -sE "^# " "$run_dir/${script%.py}.log" | tail -3 | tee -a "$log"
}

step "environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee -a "$log"

for s in "${steps[@]}"; do
  case "$s" in
    build)
      step "build (CUDA extension, sm_90 only)"; do_build ;;
    lora)
      bench lora "${BUDGET_LORA:-240}" 90 "kernel benchmark, target configuration" bench_lora_linear.py --quick
      grep -sE "rel err" "$run_dir/bench_lora_linear.log" | tee -a "$log" ;;
    rsvd)
      bench rsvd "${BUDGET_RSVD:-260}" 90 "batched randomized SVD benchmark" bench_rsvd.py ;;
    e2e)
      bench e2e "${BUDGET_E2E:-260}" 90 "end-to-end training step vs PEFT" bench_e2e.py
      grep -sE "speed-up|out of memory" "$run_dir/bench_e2e.log" | tee -a "$log" ;;
    tests)
      b=$(budget tests "${BUDGET_TESTS:-300}")
      if [ "$b" -gt 0 ]; then built || do_build; b=$(budget tests "${BUDGET_TESTS:-300}"); fi
      if [ "$b" -le 0 ]; then echo "skipped tests: no time left before the limit" | tee -a "$log"; continue; fi
      step "GPU tests (kernels first; the benchmark test is skipped: the benchmarks ran above), timeout ${b}s"
      timeout "$b" python3 -m pytest tests/ops/test_gpu.py tests/ops/test_rsvd.py tests/ops/test_compile.py -m gpu -v --tb=short \
        -p no:cacheprovider >"$run_dir/gpu_tests.log" 2>&1; echo "gpu tests rc=$? (124: cut by the timeout)" | tee -a "$log"
      grep -E "FAILED|ERROR|[0-9]+ (passed|failed)" "$run_dir/gpu_tests.log" | tail -15 | tee -a "$log" ;;
    *)
      echo "unknown step '$s' (steps: build lora rsvd e2e tests)" | tee -a "$log" ;;
  esac
done

step "pack"
tar -czf "$out/$name.tar.gz" -C "$out" "$name" && rm -rf "$run_dir"
ls -la "$out"
