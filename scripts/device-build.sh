#!/usr/bin/env bash
# Builds the project on the GPU machine (which has torch, nvcc and cmake but no package registry):
# installs the carried wheels (.whl and, when carried, .whl-extra: scripts/device-wheels.sh fetches both) and
# GoogleTest (.whl/*.deb),
# then configures and builds into $BUILD (default /tmp/flashipa-build). Used by the device runs only.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${BUILD:-/tmp/flashipa-build}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$ROOT"/.whl/*.whl \
    $(ls "$ROOT"/.whl-extra/*.whl 2>/dev/null)
export PYTHONPATH=/tmp/site
export SWIG_LIB="$(ls -d /tmp/site/swig/data/share/swig/*/ | head -1)"
mkdir -p /tmp/gtest && for deb in "$ROOT"/.whl/*.deb; do dpkg -x "$deb" /tmp/gtest; done
OPENMM_DIR="$(python3 -c 'import os, openmm.version as v; print(os.path.dirname(v.openmm_library_path))')"
TORCH_PREFIX="$(python3 -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DOPENMM_DIR="$OPENMM_DIR" -DCMAKE_PREFIX_PATH="$TORCH_PREFIX;/tmp/gtest/usr" \
    -DFLASHIPA_BUILD_CUDA=ON -DFLASHIPA_BUILD_PYTHON="${FLASHIPA_BUILD_PYTHON:-OFF}" -DSWIG_EXECUTABLE=/tmp/site/swig/data/bin/swig \
    -DPython3_EXECUTABLE="$(command -v python3)" > "$BUILD.configure.log" 2>&1 || { tail -40 "$BUILD.configure.log"; exit 1; }
# FLASHIPA_BUILD_TARGETS (space-separated) builds only those targets, for calls short of time.
# shellcheck disable=SC2086
cmake --build "$BUILD" -j"$(nproc)" ${FLASHIPA_BUILD_TARGETS:+--target $FLASHIPA_BUILD_TARGETS} > "$BUILD.log" 2>&1 || { grep -E -A5 'error|fatal' "$BUILD.log" | head -60; exit 1; }
echo "built in $BUILD"
