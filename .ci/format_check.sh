#!/usr/bin/env bash
# The formatters, pinned, in check mode: clang-format (.clang-format) on every C++ and CUDA
# source, ruff format (pyproject.toml's [tool.ruff]) on every Python file. Fails on the first
# file either would change, printing the change. Usage: .ci/format_check.sh [PYTHON] (the
# interpreter whose environment gets the formatters; default python3). To format instead, run
# the same two tools without --dry-run -Werror / --check.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python3}"
"$PY" -m pip install -q clang-format==23.1.3 ruff==0.17.5
bin="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")"
git ls-files -z -- '*.h' '*.cpp' '*.cu' '*.cuh' | xargs -0 "$bin/clang-format" --dry-run -Werror
"$bin/ruff" format --check --diff .
echo "format check: clean"
