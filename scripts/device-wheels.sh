#!/usr/bin/env bash
# Fetches here what the GPU machine cannot (it has no package registry): the pinned wheels of
# scripts/requirements.txt for its Python 3.12 on x86-64 Linux, and GoogleTest as a Debian package, in two
# folders, so that a call carries only what it needs (64 MiB per call in all):
#   .whl        the build and the CUDA suites: openmm, openmm-cuda-13, swig, safetensors, pytest with its dependencies,
#               libgtest-dev (.deb); about 20 MB, enough beside .dataset and .trainbin for a training call
#   .whl-extra  the other Python test files: gemmi, pdbfixer, pydssp, einops, tqdm; about 5 MB
# scripts/device-build.sh installs whatever of the two was carried.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
pin() { grep -E "^$1==" scripts/requirements.txt | sed 's/ .*//'; }
download() {  # folder, then requirement specifiers
    local folder="$1"; shift
    mkdir -p "$folder"
    "$PYTHON" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
        --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform any -d "$folder" "$@"
}
download .whl --no-deps "$(pin openmm)" "$(pin openmm-cuda-13)" "$(pin swig)" "$(pin safetensors)"
download .whl "$(pin pytest)"   # with its pure-Python dependencies (pluggy, iniconfig, packaging, pygments)
download .whl-extra --no-deps "$(pin gemmi)" "$(pin pydssp)" "$(pin einops)" "$(pin tqdm)"
# pdbfixer is published as a source distribution only; it is pure Python, so a wheel built here serves there.
"$PYTHON" -m pip wheel -q --no-deps -w .whl-extra "$(pin pdbfixer)"
(cd .whl && apt-get download libgtest-dev > /dev/null)
du -sh .whl .whl-extra
