#!/usr/bin/env bash
# GPU machine only: one call that trains and tests. A training chunk (scripts/device-train-chunk.sh, with the
# carried trainer in .trainbin, so no build waits for it) runs on the GPU while the project is built beside it
# and the CUDA suites (CTest and the CUDA pytest files, scripts/device-check.sh's "cuda" step) run once the
# build is done. Needs the carried .whl, .dataset and .trainbin; the chunk's environment (RUN, STEPS,
# NEW_RUN, MINUTES) as device-train-chunk.sh. ABLATION_RUN and ABLATION_NEW_RUN, when set, train a second
# run of the same length beside the first on the same GPU (one step is bound by kernel launches, so two
# processes share the GPU at little cost to each): an A/B comparison from one call. If the carried trainer
# does not run there, the project is built first and both runs use the built trainer. Logs land in
# $OUT/logs.tgz, each chunk's files in $OUT/<run name>.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
# CHECK_STEPS: device-check.sh's steps beside the chunk (default "cuda"; "cuda rest" runs every suite).
check() { STEPS="${CHECK_STEPS:-cuda}" bash scripts/device-check.sh > "$OUT/check.log" 2>&1; echo "check rc=$?"; }
# The chunk (and the ablation run beside it, if any) while the CUDA suites run.
train() {
    check &
    if [ -n "${ABLATION_RUN:-}" ]; then
        RUN="$ABLATION_RUN" NEW_RUN="${ABLATION_NEW_RUN:-}" bash scripts/device-train-chunk.sh > "$OUT/ablation.log" 2>&1 &
    fi
    bash scripts/device-train-chunk.sh 2>&1 | tail -25
    wait
    if [ -n "${ABLATION_RUN:-}" ]; then echo "== ablation $ABLATION_RUN"; tail -12 "$OUT/ablation.log"; fi
}
bash scripts/device-dataset.sh unpack || exit 1
if bash scripts/device-train-chunk.sh probe; then
    train
else
    # No carried trainer (a call whose checkpoint leaves no room for .trainbin in the 64 MiB) or one that
    # does not run here: build once, then train with the built trainer while the suites run beside it
    # (device-check.sh's own build finds nothing left to do).
    echo "no carried trainer that runs here: building first"
    t0=$(date +%s)
    FLASHIPA_BUILD_PYTHON=ON bash scripts/device-build.sh > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
    echo "build: $(( $(date +%s) - t0 )) s"
    MINUTES=$(python3 -c "print(max(1.0, ${MINUTES:-8.5} - $(( $(date +%s) - t0 )) / 60))")
    export TRAINER=/tmp/flashipa-build/bin/flashipa-train MINUTES
    train
fi
grep -v "^\s*$" "$OUT/check.log" | tail -30
# A call returns at most 8 files: the logs travel as one archive, leaving room for two runs' checkpoint and log.
(cd "$OUT" && tar czf logs.tgz ./*.log && rm -f ./*.log)
