#!/usr/bin/env bash
# The one prepared command for a lent GPU (see README "GPU checks"): build, GPU tests, every benchmark.
# Writes logs, CSV and plots into $OUT (default bench/out/gpu). Budget: each step has a cap and the caps add up to
# 10 minutes (build 100 s, tests 120 s, selftest 30 s, benchmarks int4 60 + sparse24 70 + attention 60 + decode 30
# + e2e 100 + overhead 30 s: 600 s); quick benchmark grids. The caps are ceilings: the tests' torch.compile cases
# and e2e's CUDA-graph variants compile with inductor (tens of seconds each, never measured on the GPU image yet).
#   OUT=/some/dir bash bench/gpu_check.sh
# It runs on the GPU image's own python3 (torch 2.11 + triton 3.6 there): nothing is installed from a registry.
set -uo pipefail
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
step() { echo; echo "=== $* ($(date +%H:%M:%S))"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || status=1
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" || exit 1

step "build turbokernels._C (only this GPU's architecture, to keep the build short)"
cap=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m == 9 else ''))")
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap} MAX_JOBS=${MAX_JOBS:-16}
export TURBOKERNELS_REQUIRE_EXT=1
timeout 100 $PY -m pip install --no-build-isolation --no-deps --no-index -e . -q || { echo "BUILD FAILED"; status=1; }
$PY -m turbokernels.cli info || status=1

step "GPU tests (pytest -m gpu; no autotuning: correctness only, fewer compiles)"
TURBOKERNELS_AUTOTUNE=0 timeout 120 $PY -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" tests || status=1

step "selftest: every backend against the reference"
timeout 30 $PY -m turbokernels.cli selftest || status=1

step "benchmark: int4"
timeout 60 $PY bench/int4.py --device cuda --out "$OUT" || status=1

step "benchmark: sparse24"
timeout 70 $PY bench/sparse24.py --device cuda --quick --out "$OUT" || status=1

step "benchmark: attention (forward/backward vs torch's SDPA backends and FlexAttention)"
timeout 60 $PY bench/attention.py --quick --out "$OUT" || status=1

step "benchmark: decode attention"
timeout 30 $PY bench/attention_decode.py --device cuda --quick --out "$OUT" || status=1

step "benchmark: end to end (SmolLM2-135M: fp32 HF vs int4 (+ attention); bf16 decode, eager and CUDA graphs)"
# --budget: no CUDA-graph variant (an inductor compile each) is started after 75 s; the rows say which were skipped
timeout 100 $PY bench/e2e.py --device cuda --quick --budget 75 --out "$OUT" || status=1

step "benchmark: per-call overhead on tiny shapes (synchronized per-call time vs torch's equivalents)"
# no autotuning: the tuned path costs the same cache lookup, and tuning five ops' candidates would eat the cap
TURBOKERNELS_AUTOTUNE=0 timeout 30 $PY bench/overhead.py --device cuda --quick --out "$OUT" || status=1

step "done: status $status; files in $OUT"
ls -la "$OUT"
exit $status
