#!/usr/bin/env bash
# GPU machine only: one training chunk of under ten minutes, resumable across device calls and sessions.
#
#   RUN=models/checkpoints/<name>  the run's folder in the repository: checkpoint.safetensors (the resumable
#                                  state, one overwritten file) and training.csv travel in it; the chunk's
#                                  outputs come back through $OUT/<name> and are committed there
#   STEPS=N                        total optimiser steps of the run
#   NEW_RUN="--flag ..."           only when $RUN holds no checkpoint yet: flashipa-train's settings of a new run
#   MINUTES=M                      training wall time of this chunk (default 8.5)
#   RESUME_ARGS="--flag ..."       when resuming: the settings a resume takes from its own command line
#                                  (--val-every, --checkpoint-every; default "--val-every 500
#                                  --checkpoint-every 500", the v2 run's)
#   NPROC=N                        data parallel over the machine's first N GPUs (python -m openmmflashipa.train,
#                                  docs/DESIGN-DECISIONS.md "Data-parallel training"; default 1: the C++ trainer
#                                  alone). Needs the project built with its Python module (device-build.sh with
#                                  FLASHIPA_BUILD_PYTHON=ON; built here if absent). --batch-size is per process, so
#                                  a resumed run keeps its step's batch only if N divides it.
# `device-train-chunk.sh probe` only exits 0 when the carried trainer runs on this machine.
#
# The trainer is $TRAINER if set (e.g. one built on the machine), else the carried .trainbin (flashipa-train +
# libFlashIPAModels.so and libFlashIPATraining.so built here against the same torch wheel) or, if that does not run there, a build on
# the machine. The data set travels packed (.dataset,
# scripts/device-dataset.sh) and is unpacked and checked against its sha256 first.
set -u
TORCH_DIR="$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')"
# the CUDA runtime the torch wheel ships (nvidia/cu13/lib) serves the carried library too
export LD_LIBRARY_PATH=$PWD/.trainbin:$TORCH_DIR/lib:$TORCH_DIR/../nvidia/cu13/lib:/usr/local/cuda/lib64
T="${TRAINER:-.trainbin/flashipa-train}"
# "probe": only say (exit status) whether the carried trainer runs on this machine.
[ "${1:-}" = probe ] && { $T --help > /dev/null 2>&1; exit $?; }
: "${RUN:?set RUN to the run folder}" "${STEPS:?set STEPS}"
MINUTES="${MINUTES:-8.5}"
bash scripts/device-dataset.sh unpack || exit 1
NAME="$(basename "$RUN")"
W=/tmp/run-$NAME; mkdir -p $W "$OUT/$NAME"
[ -f "$RUN/checkpoint.safetensors" ] && cp "$RUN/checkpoint.safetensors" "$RUN/training.csv" $W/
if ! $T --help >/dev/null 2>&1; then
    echo "carried binary failed:"; $T --help 2>&1 | head -3
    bash scripts/device-build.sh && T=/tmp/flashipa-build/bin/flashipa-train || exit 1
    MINUTES=$(python3 -c "print(max(1.0, $MINUTES - 2.5))")  # the build took part of the call
fi
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "${NPROC:-1}" -gt 1 ]; then
    # NVLink multicast stays off on these machines (the device notes): set where NCCL starts, also here.
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    export PYTHONPATH=/tmp/site:/tmp/flashipa-build/python
    python3 -c "import openmmflashipa._training" 2>/dev/null || FLASHIPA_BUILD_PYTHON=ON bash scripts/device-build.sh || exit 1
    if [ -f $W/checkpoint.safetensors ]; then ARGS="--resume ${RESUME_ARGS:---val-every 500 --checkpoint-every 500}"; else ARGS="${NEW_RUN:-}"; fi
    # shellcheck disable=SC2086
    python3 -m openmmflashipa.train --nproc "$NPROC" --data build/dataset/flashipa-dataset.safetensors --out-dir $W \
        --device cuda --steps $STEPS --max-minutes $MINUTES $ARGS --quiet 2>&1 | tail -20
elif [ -f $W/checkpoint.safetensors ]; then
    # shellcheck disable=SC2086
    $T --data build/dataset/flashipa-dataset.safetensors --out-dir $W --resume --device cuda --steps $STEPS --max-minutes $MINUTES ${RESUME_ARGS:---val-every 500 --checkpoint-every 500} --quiet 2>&1 | tail -20
else
    # shellcheck disable=SC2086
    $T --data build/dataset/flashipa-dataset.safetensors --out-dir $W --device cuda --steps $STEPS --max-minutes $MINUTES ${NEW_RUN:-} --quiet 2>&1 | tail -20
fi
cp $W/* "$OUT/$NAME/"; ls -la "$OUT/$NAME"
