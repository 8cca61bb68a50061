#!/usr/bin/env bash
# The README's test command: set up (idempotent), then the C++ (GoogleTest via CTest) and Python (pytest) suites.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" # the test models are tiny; threads only contend on small machines
echo "== C++ tests (CTest + GoogleTest)"
(cd build && ctest --output-on-failure -j"$(nproc)")
echo "== Python tests (pytest)"
.venv/bin/python -m pytest -q tests/python "$@"
