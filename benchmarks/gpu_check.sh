#!/usr/bin/env bash
# The whole GPU check in one call of at most 8 minutes, for the few GPU sessions this project
# gets: build the extension there (an extension built against our CPU machines' torch does not
# load against the GPU machine's), then the CUDA tests and the GPU benchmark.
#
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (default $OUT)
# Writes into OUT_DIR: env.txt, build.log, resource_usage.txt (registers, spills and shared memory
# per kernel, where cuobjdump is installed), sass_check.txt (benchmarks/cuda_resources.py --check:
# each step kernel's trips to memory, loads, SHFL, occupancy and waves), test_cuda.log, bench.log
# with the benchmark's results.md, results.json and results.png, and summary.txt: one line per
# step with its exit status (124: timed out) and seconds. A failing step does not stop the next
# ones, but nothing runs on a failed build: the tests and the benchmark would time the
# pure-PyTorch reference.
# Exits 1 if any step failed. PYTHON (default python) picks the interpreter.
set -uo pipefail
OUT_DIR=${1:-${OUT:-}}
if [[ -z $OUT_DIR ]]; then
  echo "usage: bash benchmarks/gpu_check.sh OUT_DIR (or set OUT)" >&2
  exit 2
fi
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-python}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
SUMMARY=$OUT_DIR/summary.txt
: >"$SUMMARY"
failed=0

# step NAME SECONDS LOG COMMAND...: COMMAND under a timeout, its output into LOG and on to the
# caller's, its status and time into the summary.
step() {
  local name=$1 limit=$2 log=$3 start=$SECONDS rc
  shift 3
  echo "== $name (at most $limit s)"
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$log" | tail -n 25
  rc=${PIPESTATUS[0]}
  echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$SUMMARY"
  ((rc == 0)) || failed=1
  return "$rc"
}
skip() {
  echo "$1 skipped: $2" | tee -a "$SUMMARY"
}

# Within 8 minutes: the budgets add up to 7 min 55 s. env has 25 s because a fresh machine's
# first import of torch reads it all from disk.
step env 25 "$OUT_DIR/env.txt" bash -c "
  nvidia-smi; rc=\$?
  nproc
  git rev-parse HEAD 2>/dev/null && git status --short 2>/dev/null
  ninja --version 2>/dev/null || echo 'no ninja: torch compiles the sources one at a time'
  $PYTHON -c '
import importlib.util, sys, torch
print(sys.version)
print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda,
      torch.cuda.is_available() and torch.cuda.get_device_name())
# what the tests (hypothesis in test_parity) and the benchmark (matplotlib) import
print({m: importlib.util.find_spec(m) is not None
       for m in (\"setuptools\", \"pytest\", \"hypothesis\", \"matplotlib\")})' || rc=1
  exit \$rc"

# sm_90 only: one architecture's code is half the compile. FORCE_CUDA=1 makes a missing toolkit an
# error instead of a CPU-only build; -v puts the compilers' warnings into the log. The emulator
# (one host-compiled file, built beside the nvcc jobs) reports the kernels' tile shapes, which the
# tile-crossing tests read to size their cases.
if step build 190 "$OUT_DIR/build.log" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 FORCE_CUDA=1 \
    FUSED_LSTM_BUILD_EMULATOR=1 \
    "$PYTHON" -m pip install -v --no-build-isolation --no-deps -e . \
  && step native_cuda 20 "$OUT_DIR/native_cuda.txt" "$PYTHON" -c "
import fused_lstm, fused_lstm._C
print(fused_lstm._C.__file__)
assert 'cuda' in fused_lstm.native_backends(), fused_lstm.native_backends()"; then
  library=$(grep -m 1 '\.so$' "$OUT_DIR/native_cuda.txt")
  cuobjdump=$(command -v cuobjdump || echo "$CUDA_HOME/bin/cuobjdump")
  if [[ -x $cuobjdump ]]; then
    step resource_usage 10 "$OUT_DIR/resource_usage.txt" "$cuobjdump" --dump-resource-usage "$library"
  else
    skip resource_usage "no cuobjdump"
  fi
  # The SASS check CI runs (tests/test_cuda_kernels.py), on this machine's build: its table is
  # what RESULTS.md quotes.
  step sass_check 20 "$OUT_DIR/sass_check.txt" "$PYTHON" benchmarks/cuda_resources.py --library \
    --check
  # The CUDA backend's tests in every file (CI runs the emulated ones), the CUDA kernels' own file
  # first in case time runs out; FUSED_LSTM_EXPECT_CUDA=1 makes a build without the CUDA kernels
  # a failure, not a skip. A file whose imports are missing here costs its tests, not the run.
  step test_cuda 100 "$OUT_DIR/test_cuda.log" env FUSED_LSTM_EXPECT_CUDA=1 \
    "$PYTHON" -m pytest -q -rfE --maxfail=10 --continue-on-collection-errors --durations=15 \
    tests/test_cuda_kernels.py tests/test_parity.py tests -k "cuda and not emulated"
  step bench 110 "$OUT_DIR/bench.log" "$PYTHON" benchmarks/run.py --quick --out "$OUT_DIR"
else
  skip sass_check "no build with the CUDA kernels"
  skip test_cuda "no build with the CUDA kernels"
  skip bench "no build with the CUDA kernels"
fi
echo "total seconds=$SECONDS" | tee -a "$SUMMARY"
exit $failed
