#!/usr/bin/env bash
# The extension's sources compile against another torch's headers than the one installed: the
# GPU machine has torch 2.11 while we build against the newest, and an older torch's headers (and
# its -std=, C++17 up to 2.11, C++20 since) can reject what the newest accepts. Front end only,
# nothing linked or run: g++ -fsyntax-only for the C++ sources, nvcc --cuda (cudafe++ and the host
# compiler's preprocessor, no ptxas) for the CUDA ones, with the -std= and nvcc defines read from
# the wheel's own torch/utils/cpp_extension.py and the other flags of setup.py.
#
# Usage: .ci/check_torch_headers.sh WHEEL [python]
#   WHEEL   a torch wheel, e.g. from `pip download torch==2.11.0 --no-deps -d DIR`
#   python  whose Python.h and nvidia-* wheels' CUDA headers to use (default python3): a minimal
#           toolkit lacks the cuBLAS headers torch's CUDA headers include (setup.py's
#           _pip_cuda_includes)
# CUDA_HOME (default /usr/local/cuda) is the toolkit. Exits 1 if any source fails.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEEL=${1:?usage: .ci/check_torch_headers.sh WHEEL [python]}
PYTHON=${2:-python3}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
unzip -q "$WHEEL" 'torch/include/*' 'torch/utils/cpp_extension.py' -d "$TMP" || exit 1

# The wheel's C++ standard and nvcc defines, as its cpp_extension gives them to an extension.
mapfile -t WHEEL_FLAGS < <("$PYTHON" - "$TMP/torch/utils/cpp_extension.py" <<'EOF'
import ast, re, sys
source = open(sys.argv[1]).read()
print("-std=" + re.search(r"cpp_flag_prefix \+ '(c\+\+\d+)'", source).group(1))
for node in ast.parse(source).body:
    if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["COMMON_NVCC_FLAGS"]:
        print(*ast.literal_eval(node.value))
EOF
)
STD=${WHEEL_FLAGS[0]}
read -ra NVCC_DEFINES <<< "${WHEEL_FLAGS[1]:-}"
mapfile -t PY_INCLUDES < <("$PYTHON" -c '
import glob, os, sysconfig
paths = sysconfig.get_paths()
for d in [paths["include"], *sorted(glob.glob(os.path.join(paths["purelib"], "nvidia", "*", "include")))]:
    print("-isystem", d, sep="\n")')
INCLUDES=(-isystem "$TMP/torch/include" -isystem "$TMP/torch/include/torch/csrc/api/include"
          -isystem "$CUDA_HOME/include" "${PY_INCLUDES[@]}")
COMMON=(-DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C "$STD" "${INCLUDES[@]}")
echo "torch $(unzip -p "$WHEEL" torch/version.py | sed -n "s/^__version__ = '\(.*\)'/\1/p"): $STD, nvcc ${NVCC_DEFINES[*]}"

check() {
  "$@" >"$TMP/log.$BASHPID" 2>&1 || { cat "$TMP/log.$BASHPID"; echo "FAILED: $*" | cut -c1-300; return 1; } >&2
}
# A job a core: one source against torch's headers takes 10-60 s.
start=$SECONDS status=0 running=0 sources=0
launch() {
  check "$@" &
  sources=$((sources + 1))
  if (( ++running >= $(nproc) )); then
    wait -n || status=1
    running=$((running - 1))
  fi
}
for source in csrc/*.cpp csrc/autograd/*.cpp csrc/cpu/*.cpp; do
  launch g++ -fsyntax-only -fopenmp "${COMMON[@]}" "$source"
done
for source in csrc/emulator/*.cpp; do
  launch g++ -fsyntax-only -DFUSED_LSTM_EMULATED -Wno-unknown-pragmas "${COMMON[@]}" "$source"
done
for source in csrc/cuda/*.cu csrc/cuda/instances/*.cu; do
  launch "$CUDA_HOME/bin/nvcc" --cuda -arch=sm_90 "${NVCC_DEFINES[@]}" -Xcompiler -fPIC \
    "${COMMON[@]}" -o /dev/null "$source"
done
while (( running > 0 )); do
  wait -n || status=1
  running=$((running - 1))
done
echo "check_torch_headers: $sources sources against $(basename "$WHEEL") in $((SECONDS - start)) s:" \
  "$( ((status)) && echo FAILED || echo ok)"
exit $status
