#!/usr/bin/env bash
# The CPU kernels' tests on aarch64, on an x86-64 Debian machine: the extension cross-compiled
# with aarch64-linux-gnu-g++ against torch's aarch64 wheel, then pytest run by an aarch64 CPython
# under qemu-user. .ci/cross_check.sh only compiles the sources for aarch64; this runs them.
#
# Not in CI (docs/deploying.md, "ARM and macOS"): qemu emulates every aarch64 instruction, so
# importing torch alone takes about a minute, and the whole run takes about 12 minutes on a
# 2-core x86-64 VM (2.5 to cross-compile, 8 for the default tests), on top of CI's own build
# and suite; tests/test_isa.py adds about 6 more. Its first run also downloads about 200 MB
# (Debian's arm64 packages, torch's aarch64 wheel), kept in WORK_DIR for the next.
#
# Usage: .ci/aarch64_qemu.sh [WORK_DIR] [PYTEST_ARGS...]   (needs root for apt-get)
#   WORK_DIR     default /tmp/fused_lstm_aarch64; what was downloaded there is reused by later runs
#   PYTEST_ARGS  replace the default selection, e.g.  tests/test_module.py -k "cpu or reference"
# Environment: HOST_PYTHON (default python3): its minor version picks the aarch64 CPython, its
#   pip downloads the wheels. AARCH64_TORCH (default below): the torch requirement for aarch64.
#   AARCH64_TORCH_INDEX: an extra index URL for it (e.g. https://download.pytorch.org/whl/cpu).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/tmp/fused_lstm_aarch64}
shift $(( $# > 0 ? 1 : 0 ))
HOST_PYTHON=${HOST_PYTHON:-python3}
# From torch 2.11 on, PyPI's aarch64 wheels are CUDA builds: they import only with the
# nvidia-*/cuda-toolkit aarch64 wheels (several GB; cudnn's is missing from the mirror this was
# written on). torch's CPU-only aarch64 builds after 2.10 come from download.pytorch.org
# (AARCH64_TORCH='torch==2.14.1+cpu' AARCH64_TORCH_INDEX=https://download.pytorch.org/whl/cpu;
# untested: that host was unreachable where this was written).
# 2.10 is the newest CPU-only aarch64 torch on PyPI, within pyproject's torch>=2.4.
AARCH64_TORCH=${AARCH64_TORCH:-torch==2.10.*}
AARCH64_TORCH_INDEX=${AARCH64_TORCH_INDEX:-}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
SYSROOT=$WORK/sysroot SITE=$WORK/site-packages BUILD=$WORK/build PKG=$WORK/pkg
start=$SECONDS
log() { echo "aarch64_qemu [$((SECONDS - start)) s]: $*"; }

# ---- host tools ----------------------------------------------------------------------------
apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
QEMU=$(command -v qemu-aarch64-static || command -v qemu-aarch64 || true)
if [[ -z $QEMU ]] || ! command -v aarch64-linux-gnu-g++ >/dev/null; then
  log "installing qemu-user-static and g++-aarch64-linux-gnu"
  apt-get update -qq
  apt_install qemu-user-static g++-aarch64-linux-gnu
  QEMU=$(command -v qemu-aarch64-static)
fi
PYVER=$("$HOST_PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PYTAG=cpython-${PYVER/./}-aarch64-linux-gnu

# ---- aarch64 CPython: no aarch64 interpreter comes from PyPI, so Debian's arm64 packages,
# unpacked (not installed: dpkg would want the whole arm64 dependency tree) into a sysroot that
# qemu's -L serves to the emulated program, its glibc and libstdc++ included ------------------
if [[ ! -x $SYSROOT/usr/bin/python$PYVER ]]; then
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    log "adding Debian's arm64 architecture"
    dpkg --add-architecture arm64
    apt-get update -qq
  fi
  log "downloading and unpacking python$PYVER:arm64"
  # The interpreter, its stdlib and dev headers, and the libraries they and torch link to.
  DEBS=(python"$PYVER"-minimal libpython"$PYVER"-minimal libpython"$PYVER"-stdlib
        libpython"$PYVER"-dev libc6 libstdc++6 libgcc-s1 libgomp1 libexpat1 zlib1g libffi8
        libbz2-1.0 liblzma5 libsqlite3-0 libssl3 libuuid1 libcrypt1 libncursesw6 libtinfo6
        libreadline8 libzstd1)
  rm -rf "$WORK/debs" "$SYSROOT"
  mkdir -p "$WORK/debs" "$SYSROOT"
  # apt's _apt user cannot write into a root-owned directory; the download then warns only.
  (cd "$WORK/debs" && apt-get download -qq "${DEBS[@]/%/:arm64}" 2>&1 | grep -v unsandboxed || true)
  for deb in "$WORK"/debs/*.deb; do dpkg -x "$deb" "$SYSROOT"; done
  [[ -x $SYSROOT/usr/bin/python$PYVER ]] || { echo "no python$PYVER:arm64 in apt" >&2; exit 1; }
fi
# The interpreter as a host script: the host kernel runs an aarch64 executable only where qemu
# is registered in binfmt_misc (not in a container), so a test's subprocess.run(sys.executable)
# must start a host program. qemu's -0 makes the script's path the emulated argv[0], so
# sys.executable names the script; sys.prefix falls back to /usr, which -L maps to the sysroot.
PY=$WORK/bin/python$PYVER
mkdir -p "$WORK/bin"
printf '#!/bin/sh\nexec %q -L %q -0 "$0" %q "$@"\n' \
  "$QEMU" "$SYSROOT" "$SYSROOT/usr/bin/python$PYVER" > "$PY"
chmod +x "$PY"

# ---- torch's aarch64 wheel, pytest, hypothesis, numpy: the host's pip, told the target ------
if [[ ! -f $SITE/.complete ]]; then
  log "installing $AARCH64_TORCH and the test requirements for aarch64 into $SITE"
  rm -rf "$SITE"
  PIP=("$HOST_PYTHON" -m pip install -q --no-compile --target "$SITE"
       --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64
       --python-version "$PYVER" --implementation cp --abi "cp${PYVER/./}" --only-binary=:all:)
  # pip evaluates dependency markers for the host, not the target: torch's own would add x86-64's
  # nvidia wheels, so torch goes in without dependencies, which are then named (pure Python, but
  # MarkupSafe, whose aarch64 wheel --platform picks).
  "${PIP[@]}" --no-deps ${AARCH64_TORCH_INDEX:+--extra-index-url "$AARCH64_TORCH_INDEX"} \
    "$AARCH64_TORCH" numpy
  # --upgrade: both installs write bin/, which pip otherwise skips with a warning (nothing here
  # runs those scripts: pytest starts as -m pytest).
  "${PIP[@]}" --upgrade filelock typing-extensions sympy networkx jinja2 fsspec pytest hypothesis
  touch "$SITE/.complete"
fi
TORCH=$SITE/torch

# ---- the extension, as setup.py builds it (CppExtension, Linux: -fopenmp) but cross-compiled:
# the flags torch's BuildExtension adds for this torch (its -std, the extension's defines,
# torch's include dirs), those of Debian's python (-DNDEBUG -fwrapv -fPIC -Wall) and setup.py's.
# Built into a copy of the package, never the repo's fused_lstm/ (an x86-64 _C there) ---------
STD=$(grep -oE "common_cflags \+= \['-std=c\+\+[0-9]+'" "$TORCH/utils/cpp_extension.py" |
      grep -oE 'c\+\+[0-9]+' | head -1)
CXXFLAGS=(-std="${STD:-c++17}" -fPIC -DNDEBUG -fwrapv -Wall -Wsign-compare
          -O3 -fno-math-errno -fno-trapping-math -fopenmp
          -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=1
          -isystem "$TORCH/include" -isystem "$TORCH/include/torch/csrc/api/include"
          -isystem "$SYSROOT/usr/include/python$PYVER"
          -isystem "$SYSROOT/usr/include")  # for Debian's <aarch64-linux-gnu/pythonX.Y/pyconfig.h>
rm -rf "$PKG" && mkdir -p "$PKG" "$BUILD"
cp -r "$REPO/fused_lstm" "$REPO/tests" "$REPO/pyproject.toml" "$PKG/"
find "$PKG" \( -name '*.so' -o -name __pycache__ \) -exec rm -rf {} +
SO=$PKG/fused_lstm/_C.$PYTAG.so
cd "$REPO"
mapfile -t SOURCES < <(ls csrc/*.cpp csrc/autograd/*.cpp csrc/cpu/*.cpp csrc/python/*.cpp)
log "compiling ${#SOURCES[@]} files with aarch64-linux-gnu-g++ -std=${STD:-c++17}, $(nproc) at once"
OBJECTS=() running=0 status=0
for src in "${SOURCES[@]}"; do
  obj=$BUILD/${src//\//_}.o
  OBJECTS+=("$obj")
  # Rebuilt when any file in csrc/ (the headers hold most of the code) or the torch install is
  # newer than the object.
  if [[ -f $obj && -z $(find csrc "$SITE/.complete" -newer "$obj" -print -quit) ]]; then
    continue
  fi
  { aarch64-linux-gnu-g++ "${CXXFLAGS[@]}" -c "$src" -o "$obj" ||
      { echo "FAILED: $src" >&2; rm -f "$obj"; exit 1; }; } &
  if (( ++running >= $(nproc) )); then wait -n || status=1; running=$((running - 1)); fi
done
while (( running > 0 )); do wait -n || status=1; running=$((running - 1)); done
(( status == 0 )) || { echo "aarch64_qemu: FAILED to compile the extension" >&2; exit 1; }
# Linked as setup.py links them: the native library without libtorch_python, and _C, the Python
# module, over it; -rpath-link finds the libraries torch's own depend on.
MODULE=$BUILD/csrc_python_module.cpp.o
LIBRARY_OBJECTS=()
for obj in "${OBJECTS[@]}"; do [[ $obj == "$MODULE" ]] || LIBRARY_OBJECTS+=("$obj"); done
aarch64-linux-gnu-g++ -shared -fopenmp "${LIBRARY_OBJECTS[@]}" -L"$TORCH/lib" \
  -Wl,-rpath-link,"$TORCH/lib" -Wl,-soname,libfused_lstm.so -lc10 -ltorch -ltorch_cpu \
  -o "$PKG/fused_lstm/libfused_lstm.so"
aarch64-linux-gnu-g++ -shared -fopenmp "$MODULE" -L"$TORCH/lib" -Wl,-rpath-link,"$TORCH/lib" \
  -lc10 -ltorch -ltorch_cpu -ltorch_python -o "$SO"
log "built $PKG/fused_lstm/libfused_lstm.so and $SO"

# ---- the tests under qemu --------------------------------------------------------------------
# The default: the kernels' own tests and the cpu backend's cases of the parity and gradcheck
# tests, about 370 tests. tests/test_isa.py also runs (its subprocesses start through $PY) but
# imports torch in 6 fresh interpreters, about a minute each here: pass it as an argument.
if (( $# == 0 )); then
  set -- tests/test_cpu_kernels.py tests/test_parity.py tests/test_gradcheck.py -k "cpu"
fi
cd "$PKG"
TORCH_VERSION=$(grep -oP "^__version__ = '\K[^']+" "$TORCH/version.py")
log "torch $TORCH_VERSION, pytest $*"
set +e
# Two threads, the host's cores: qemu runs each emulated thread on a host thread.
timeout "${AARCH64_QEMU_TIMEOUT:-3600}" env PYTHONPATH="$PKG:$SITE" OMP_NUM_THREADS=2 \
  PYTHONDONTWRITEBYTECODE=1 "$PY" -m pytest -q -p no:cacheprovider "$@" 2>&1 |
  tee "$WORK/pytest.log"
rc=${PIPESTATUS[0]}
set -e
# pytest -q's last line: "372 passed, 725 deselected in 490.64s (0:08:10)" and the like.
counts=$(grep -E '^[0-9]+ [a-z]+.* in [0-9.]+s' "$WORK/pytest.log" | tail -1 || true)
where="aarch64 under $(basename "$QEMU"), python$PYVER, torch $TORCH_VERSION"
if (( rc == 0 )); then
  log "PASSED: ${counts:-?} ($where; $((SECONDS - start)) s in all)"
else
  log "FAILED: pytest exit status $rc (124: timed out): ${counts:-?}" \
      "($where; $((SECONDS - start)) s in all)"
fi
exit $rc
