#!/usr/bin/env bash
# The one prepared command for a lent GPU (see README "GPU checks"): build, the CUDA C++ kernels' GPU tests first,
# the other GPU tests, selftest, every benchmark (quick grids).
#   OUT=/some/dir bash bench/gpu_check.sh            (default OUT: bench/out/gpu)
#   GPU_CHECK_DRY_RUN=1 OUT=/tmp/x bash bench/gpu_check.sh   (no GPU: echo each step, fake its outputs;
#                                   GPU_CHECK_DRY_FAIL=<step name> makes that step time out)
# It runs on the GPU image's own python3 (torch 2.11 + triton 3.6 there): nothing is installed from a registry.
#
# What comes back: the lending machine returns at most 8 plain files from $OUT (16 MiB each), so $OUT gets three:
# gpu_check.log (everything printed), summary.txt (one line per step: verdict, seconds, cap) and results.tar.gz
# (the benchmarks' CSVs and plots and the tests' junit XML, written into a scratch folder and packed by the EXIT
# trap: also after a failed or timed-out step, an early exit or SIGTERM). Unpack it into bench/results/<folder>/
# beside the log to commit the evidence (python/turbokernels/acceptance.py's rule).
#
# Budget: every step runs under `timeout` with a cap below, and the caps total 455 s, under the 480 s (8 minutes)
# this check must fit in, leaving 25 s for start-up and packing:
#   machine: nvidia-smi 5 + versions 15                                              =  20
#   build 100 (one architecture; the build's seconds are printed) + turbokernels info 10 = 110
#   GPU tests: CUDA C++ kernels (tests/test_*cuda*.py) 60 + the rest 75              = 135
#   selftest --quick 20                                                               =  20
#   benchmarks: int4 40 + sparse24 25 + attention 30 + decode 25 + e2e 35 + overhead 15 = 170
#   total 20 + 110 + 135 + 20 + 170                                                   = 455
# The caps are ceilings, never measured on the GPU image yet: the tests' torch.compile cases and e2e's CUDA-graph
# variants compile with inductor (tens of seconds each). The benchmarks write their CSV as they go where they can,
# so a capped one still leaves its finished rows. tests/test_gpu_check_script.py checks the caps' sum and $OUT.
set -uo pipefail
CAP_SMI=5
CAP_MACHINE=15
CAP_BUILD=100
CAP_INFO=10
CAP_CUDA_TESTS=60
CAP_GPU_TESTS=75
CAP_SELFTEST=20
CAP_INT4=40
CAP_SPARSE24=25
CAP_ATTENTION=30
CAP_DECODE=25
CAP_E2E=35
CAP_OVERHEAD=15

# $OUT as the caller meant it (relative to the caller's directory), then run from the repository's root
ROOT=$(cd "$(dirname "$0")/.." && pwd) || exit 1
OUT=${OUT:-$ROOT/bench/out/gpu}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
cd "$ROOT" || exit 1
DRY=${GPU_CHECK_DRY_RUN:-}
[ "$DRY" = 0 ] && DRY=
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 1
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
exec > >(tee "$OUT/gpu_check.log") 2>&1
tee_pid=$!
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0

finish() {
  local rc=$?
  trap - EXIT INT TERM HUP
  [ "$rc" -ne 0 ] && status=$rc
  echo
  echo "=== packing $WORK into $OUT/results.tar.gz ($(date +%H:%M:%S))"
  if tar -czf "$OUT/results.tar.gz" -C "$WORK" .; then
    tar -tzvf "$OUT/results.tar.gz"
    local bytes
    bytes=$(wc -c < "$OUT/results.tar.gz")
    # over the lending machine's per-file limit the archive would not come back at all
    if [ "$bytes" -gt $((16 * 1024 * 1024)) ]; then
      echo "WARNING: results.tar.gz is $bytes bytes, over 16 MiB: it will not come back"
      status=1
    fi
  else
    echo "PACKING FAILED"
    status=1
  fi
  rm -rf "$WORK"
  echo "status $status" >> "$SUMMARY"
  echo "=== done: status $status; $OUT holds:"
  ls -la "$OUT"
  cat "$SUMMARY"
  # let tee write the last lines before the caller collects $OUT
  exec 1>&- 2>&-
  wait "$tee_pid" 2>/dev/null
  exit "$status"
}
trap finish EXIT
trap 'echo "interrupted"; exit 130' INT TERM HUP

step() { echo; echo "=== $* ($(date +%H:%M:%S))"; }

# In a dry run a step's outputs are faked where the real command would write them (--out DIR, --junitxml=FILE), so
# that the packing is exercised without a GPU.
fake_outputs() {
  local name=$1 prev="" a
  shift
  for a in "$@"; do
    case $a in
      --junitxml=*) echo "<testsuite name=\"$name\" tests=\"0\"/>" > "${a#--junitxml=}" ;;
    esac
    if [ "$prev" = "--out" ]; then
      mkdir -p "$a"
      echo "step,dry_run" > "$a/${name}_cuda.csv"
      echo "fake plot" > "$a/${name}_cuda.png"
    fi
    prev=$a
  done
}

# capped NAME CAP COMMAND...: COMMAND under `timeout CAP`; its verdict and seconds go to the summary.
capped() {
  local name=$1 cap=$2 t0=$SECONDS rc verdict
  shift 2
  echo "+ timeout $cap $*"
  if [ -n "$DRY" ] && [ "$name" = "${GPU_CHECK_DRY_FAIL:-}" ]; then
    rc=124  # the test's way to make one step time out
  elif [ -n "$DRY" ]; then
    fake_outputs "$name" "$@"
    rc=0
  else
    timeout "$cap" "$@"
    rc=$?
  fi
  case $rc in
    0) verdict=ok ;;
    124|137) verdict="TIMED OUT" ;;
    *) verdict="failed (exit $rc)" ;;
  esac
  [ "$rc" -eq 0 ] || status=1
  echo "--- $name: $verdict after $((SECONDS - t0)) s (cap $cap s)"
  printf '%-12s %-16s %4d s (cap %d s)\n' "$name" "$verdict" "$((SECONDS - t0))" "$cap" >> "$SUMMARY"
  return "$rc"
}

step "machine${DRY:+ (dry run: commands are echoed, not run)}"
capped nvidia-smi "$CAP_SMI" nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
capped versions "$CAP_MACHINE" "$PY" -c "
import sys, torch, triton
print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name())
m, n = torch.cuda.get_device_capability()
open(sys.argv[1], 'w').write(f'{m}.{n}' + ('a' if m == 9 else ''))" "$WORK/arch.txt" || exit 1
arch=$(cat "$WORK/arch.txt" 2>/dev/null || echo 9.0a)
rm -f "$WORK/arch.txt"

step "build turbokernels._C (only this GPU's architecture, $arch, to keep the build short)"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
export MAX_JOBS=${MAX_JOBS:-16}
export TURBOKERNELS_REQUIRE_EXT=1
build_start=$SECONDS
capped build "$CAP_BUILD" "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . -q || echo "BUILD FAILED"
echo "build took $((SECONDS - build_start)) s"
capped info "$CAP_INFO" "$PY" -m turbokernels.cli info

# The CUDA C++ kernels' tests first: they are what a lent GPU is for, and nothing else can run them. Selected by
# name, so a new tests/test_<op>_cuda*.py is picked up without editing this script. No autotuning in the tests:
# correctness only, fewer compiles.
shopt -s nullglob
cuda_tests=(tests/test_*cuda*.py)
shopt -u nullglob
step "GPU tests of the CUDA C++ kernels (pytest -m gpu ${cuda_tests[*]:-: none found})"
if [ ${#cuda_tests[@]} -gt 0 ]; then
  capped cuda_tests "$CAP_CUDA_TESTS" env TURBOKERNELS_AUTOTUNE=0 "$PY" -m pytest -m gpu -q -p no:cacheprovider \
    --junitxml="$WORK/gpu_tests_cuda.xml" "${cuda_tests[@]}"
fi
ignore=()
for f in ${cuda_tests[@]+"${cuda_tests[@]}"}; do ignore+=("--ignore=$f"); done

step "the other GPU tests (pytest -m gpu)"
capped gpu_tests "$CAP_GPU_TESTS" env TURBOKERNELS_AUTOTUNE=0 "$PY" -m pytest -m gpu -q -p no:cacheprovider \
  --junitxml="$WORK/gpu_tests.xml" ${ignore[@]+"${ignore[@]}"} tests

step "selftest: every backend against the reference (first shape of each op)"
capped selftest "$CAP_SELFTEST" "$PY" -m turbokernels.cli selftest --quick

step "benchmark: int4 (ours, triton, cuda vs cuBLAS fp16/bf16)"
capped int4 "$CAP_INT4" "$PY" bench/int4.py --device cuda --quick --out "$WORK"

step "benchmark: sparse24"
capped sparse24 "$CAP_SPARSE24" "$PY" bench/sparse24.py --device cuda --quick --out "$WORK"

step "benchmark: attention (forward/backward vs torch's SDPA backends and FlexAttention)"
capped attention "$CAP_ATTENTION" "$PY" bench/attention.py --quick --out "$WORK"

step "benchmark: decode attention (triton, cuda vs SDPA flash and cuDNN)"
capped decode "$CAP_DECODE" "$PY" bench/attention_decode.py --device cuda --quick --out "$WORK"

step "benchmark: end to end (SmolLM2-135M: fp32 HF vs int4 (+ attention); bf16 decode, eager and CUDA graphs)"
# --budget: no CUDA-graph variant (an inductor compile each) is started after 20 s; the rows say which were skipped
capped e2e "$CAP_E2E" "$PY" bench/e2e.py --device cuda --quick --budget 20 --out "$WORK"

step "benchmark: per-call overhead on tiny shapes (synchronized per-call time vs torch's equivalents)"
# no autotuning: the tuned path costs the same cache lookup, and tuning five ops' candidates would eat the cap
capped overhead "$CAP_OVERHEAD" env TURBOKERNELS_AUTOTUNE=0 "$PY" bench/overhead.py --device cuda --quick \
  --out "$WORK"

exit "$status"
