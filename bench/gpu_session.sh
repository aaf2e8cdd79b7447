#!/usr/bin/env bash
# One GPU run, one command: build (with the CUDA extension), GPU tests, benchmarks; everything logged and packed
# into one archive.  Ordered by value per minute, so a session that runs out of time still returns the most
# important numbers.
#   bash bench/gpu_session.sh [OUTDIR]      (OUTDIR defaults to ./gpu_results)
# Budget on an H100 (estimates, to be replaced by measurements): build 2 min, GPU tests 3 min, kernel bench quick
# 3 min, rsvd bench 4 min, e2e bench 4 min.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_results}"
mkdir -p "$out/run"
log="$out/run/session.log"
export PYTHONUNBUFFERED=1
step() { echo "=== $(date -u +%H:%M:%S) $*" | tee -a "$log"; }

step "environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"; } 2>&1 | tee -a "$log"

step "build (CUDA extension)"
python3 -m pip install --no-build-isolation --no-deps -e . >"$out/run/build.log" 2>&1
python3 -c "import lora_kernels as lk; print('has_extension cpu', lk.has_extension('cpu'), 'cuda', lk.has_extension('cuda'))" 2>&1 | tee -a "$log"

step "GPU tests (pinned tiles, then the autotuned path inside the tests)"
timeout 600 python3 -m pytest tests -q -m gpu -x -p no:cacheprovider >"$out/run/gpu_tests.log" 2>&1; echo "gpu tests rc=$?" | tee -a "$log"
tail -5 "$out/run/gpu_tests.log" | tee -a "$log"

step "kernel benchmark: target configuration (bench_lora_linear --quick)"
timeout 900 python3 bench/bench_lora_linear.py --quick --out "$out/run" >"$out/run/bench_lora_linear.log" 2>&1; echo "rc=$?" | tee -a "$log"

step "batched randomized SVD benchmark"
timeout 900 python3 bench/bench_rsvd.py --out "$out/run" >"$out/run/bench_rsvd.log" 2>&1; echo "rc=$?" | tee -a "$log"

step "end-to-end training step vs PEFT"
timeout 900 python3 bench/bench_e2e.py --out "$out/run" >"$out/run/bench_e2e.log" 2>&1; echo "rc=$?" | tee -a "$log"

step "pack"
tar -czf "$out/gpu_session_results.tar.gz" -C "$out" run && rm -rf "$out/run"
ls -la "$out"
