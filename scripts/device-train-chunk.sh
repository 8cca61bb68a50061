#!/usr/bin/env bash
# GPU machine only: continues the training run from models/checkpoints/in-progress (or /tmp/run) for one
# chunk of under ten minutes with the carried trainer (.trainbin: flashipa-train + libFlashIPAModels.so built
# here against the same torch wheel), falling back to a build there. STEPS = total steps of the run.
set -u; R=/tmp/run; mkdir -p $R; [ -f $R/checkpoint.safetensors ] || cp models/checkpoints/in-progress/checkpoint.safetensors models/checkpoints/in-progress/training.csv $R/
export LD_LIBRARY_PATH=$PWD/.trainbin:$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__)+"/lib")')
T=.trainbin/flashipa-train; M=8.7
if ! $T --help >/dev/null 2>&1; then echo "carried binary failed:"; $T --help 2>&1 | head -3; bash scripts/device-build.sh && T=/tmp/flashipa-build/bin/flashipa-train && M=6.2 || exit 1; fi
nvidia-smi --query-gpu=name --format=csv,noheader
$T --data build/dataset/flashipa-dataset.safetensors --out-dir $R --resume --device cuda --steps ${STEPS} --max-minutes $M --quiet 2>&1 | tail -20
cp $R/* $OUT/; ls -la $OUT
