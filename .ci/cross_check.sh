#!/usr/bin/env bash
# The C++ sources (without CUDA) compile for aarch64 with GCC and with Clang, and for x86-64 with
# Clang: CI's machine is x86-64 and GCC, where nothing else would notice an x86-only construct
# or a GCC-only one. A syntax and semantic check against torch's headers (-fsyntax-only: no
# aarch64 torch to link against here), templates instantiated.
#
# Usage: .ci/cross_check.sh [python]   (the python whose torch's headers to use; default python3)
# Installs the compilers with apt-get where they are missing (Debian's g++-aarch64-linux-gnu and
# clang; needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-python3}

if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v clang++ >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    g++-aarch64-linux-gnu clang >/dev/null
fi

mapfile -t INCLUDES < <("$PYTHON" -c '
import sysconfig
from torch.utils.cpp_extension import include_paths
for path in include_paths() + [sysconfig.get_paths()["include"]]:
    print("-isystem" + path)')
# The flags torch's build gives the extension (setup.py), but -O3: -fsyntax-only does not optimise.
FLAGS=(-std=c++20 -fsyntax-only -Wall -Werror -Wno-unknown-pragmas -DTORCH_API_INCLUDE_EXTENSION_H
       -DTORCH_EXTENSION_NAME=_C "${INCLUDES[@]}")
SOURCES=(csrc/*.cpp csrc/autograd/*.cpp csrc/cpu/*.cpp csrc/python/*.cpp)

# aarch64-linux-gnu-g++ with OpenMP, as setup.py builds on Linux; Clang without, as Apple clang
# builds without libomp (and Clang's omp.h is not installed here).
COMPILERS=("aarch64-linux-gnu-g++ -fopenmp"
           "clang++ --target=aarch64-linux-gnu"
           "clang++ --target=x86_64-linux-gnu")
# Every compiler and source at once, a job a core: one file against torch's headers takes 10-20 s.
check() {
  # shellcheck disable=SC2086  # the compiler's own flags split on purpose
  $1 "${FLAGS[@]}" "$2" || { echo "FAILED: $1 $2" >&2; return 1; }
}
start=$SECONDS status=0 running=0
for compiler in "${COMPILERS[@]}"; do
  for source in "${SOURCES[@]}"; do
    check "$compiler" "$source" &
    if (( ++running >= $(nproc) )); then
      wait -n || status=1
      running=$((running - 1))
    fi
  done
done
while (( running > 0 )); do
  wait -n || status=1
  running=$((running - 1))
done
echo "cross_check: ${#SOURCES[@]} files x ${#COMPILERS[@]} compilers in $((SECONDS - start)) s"
exit $status
