#!/usr/bin/env bash
# The README's test command (and CI's, .ci/run): set up (idempotent), then the C++ (GoogleTest via CTest) and Python
# (pytest) suites, then the packaging check (scripts/check-wheel.sh: a wheel from the same build, installed into a new
# virtual environment and smoke-tested there; a few minutes, no second compile).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" # the test models are tiny; threads only contend on small machines
echo "== C++ tests (CTest + GoogleTest)"
(cd build && ctest --output-on-failure -j"$(nproc)")
echo "== Python tests (pytest)"
.venv/bin/python -m pytest -q tests/python "$@"
echo "== Packaging check (wheel, new virtual environment, smoke test)"
bash scripts/check-wheel.sh
