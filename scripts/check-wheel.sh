#!/usr/bin/env bash
# The packaging check: build a wheel of the project, install it into a new virtual environment (pip fetches
# its pinned dependencies), then run the smoke test there: import openmmflashipa, one Reference-platform
# evaluation of a FlashIPAForce with the shipped model (tests/packaging/smoke_test.py), `flashipa --help`.
#
#   bash scripts/check-wheel.sh             the wheel from the developer build (build/ and .venv, as
#                                           scripts/bootstrap.sh set them up: no second compile)
#   bash scripts/check-wheel.sh --isolated  pip wheel . in pip's isolated build environment, from scratch
#                                           (what `pip install .` does on a user's machine; a full build)
#
# Needs scripts/bootstrap.sh to have run first (its .venv). The wheel is left in dist/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { printf '[check-wheel] %s\n' "$*" >&2; }
PY="$ROOT/.venv/bin/python"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
rm -rf dist && mkdir -p dist

start=$SECONDS
if [ "${1:-}" = "--isolated" ]; then
    log "pip wheel . (isolated build environment, full build)"
    "$PY" -m pip wheel -q --no-deps -w dist . > "$WORK/wheel.log" 2>&1 || { tail -50 "$WORK/wheel.log" >&2; exit 1; }
else
    # The same build folder and CMake settings as scripts/bootstrap.sh, so that nothing is compiled again.
    export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
    if [ -f build/CMakeCache.txt ]; then
        CMAKE_GENERATOR="$(sed -n 's/^CMAKE_GENERATOR:INTERNAL=//p' build/CMakeCache.txt)"
        export CMAKE_GENERATOR
    fi
    cmake_args=(-C build-dir=build -C cmake.define.FLASHIPA_BUILD_TESTS=ON -C cmake.define.FLASHIPA_BUILD_BENCHMARKS=ON)
    if [ -n "${FLASHIPA_CMAKE_ARGS:-}" ]; then
        cmake_args+=(-C "cmake.args=$(echo "$FLASHIPA_CMAKE_ARGS" | tr -s ' ' ';')")
    fi
    log "pip wheel . (from build/)"
    "$PY" -m pip wheel -q --no-build-isolation --no-deps -w dist "${cmake_args[@]}" . > "$WORK/wheel.log" 2>&1 \
        || { tail -50 "$WORK/wheel.log" >&2; exit 1; }
fi
WHEEL="$(ls dist/openmmflashipa-*.whl)"
log "built $WHEEL ($(du -h "$WHEEL" | cut -f1)) in $((SECONDS - start)) s"

start=$SECONDS
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "$WHEEL"
log "installed into a new virtual environment in $((SECONDS - start)) s"

# Run from an empty folder, so that nothing of the source tree can be imported.
cp tests/packaging/smoke_test.py "$WORK/"
(cd "$WORK" && OMP_NUM_THREADS=1 "$WORK/venv/bin/python" smoke_test.py "$(head -n1 "$ROOT/VERSION")")
(cd "$WORK" && "$WORK/venv/bin/flashipa" --help > help.txt) && head -n3 "$WORK/help.txt"
log "passed"
