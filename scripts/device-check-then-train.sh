#!/usr/bin/env bash
# GPU machine only: one call that builds and runs every suite first (device-check.sh, steps CHECK_STEPS, default
# "cuda rest", cut off after CHECK_S seconds, default 420), then, with the GPU to itself, times the run's step at
# several batches (device-batch-probe.sh, when PROBE_BATCHES is set: the chunk then trains with the batch it
# chooses) and trains a chunk of the run in the time left before DEADLINE_S seconds after the start (default 560;
# no chunk when under a minute is left). Unlike device-train-and-check.sh nothing shares the GPU with the timings.
# On a short device budget: CHECK_STEPS="cuda prior" and a smaller DEADLINE_S (the CUDA suites and the geometry
# prior's, then the chunk).
# Carry .whl, .whl-extra and .dataset. Environment of the chunk: RUN, STEPS (device-train-chunk.sh). Logs land in
# $OUT/logs.tgz, the probe's table in $OUT/batch_probe.md, the chunk's files in $OUT/<run name>.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
t0=$(date +%s)
: "${RUN:?set RUN to the run folder}" "${STEPS:?set STEPS}"
bash scripts/device-dataset.sh unpack || exit 1
# timeout signals its whole process group, so the suites' pytest processes stop with it.
STEPS="${CHECK_STEPS:-cuda rest}" timeout "${CHECK_S:-420}" bash scripts/device-check.sh > "$OUT/check.log" 2>&1
echo "check rc=$? after $(( $(date +%s) - t0 )) s"
grep -v "^\s*$" "$OUT/check.log" | tail -40
export TRAINER=/tmp/flashipa-build/bin/flashipa-train
[ -x "$TRAINER" ] || { echo "no trainer was built"; exit 1; }
ARGS="--val-every 500 --checkpoint-every 500"
if [ -n "${PROBE_BATCHES:-}" ]; then
    bash scripts/device-batch-probe.sh > "$OUT/probe.log" 2>&1
    tail -6 "$OUT/probe.log"
    BATCH="$(tail -1 "$OUT/batch_probe.md" | awk '$1 == "chosen" {print $3}')"
    [ -n "$BATCH" ] && ARGS="$ARGS --batch-size $BATCH"
fi
LEFT=$(python3 -c "print(round(((${DEADLINE_S:-560}) - ($(date +%s) - $t0)) / 60 - 0.5, 2))")
if python3 -c "import sys; sys.exit(not $LEFT >= 1)"; then
    echo "chunk: $LEFT minutes with $ARGS"
    MINUTES="$LEFT" RESUME_ARGS="$ARGS" bash scripts/device-train-chunk.sh 2>&1 | tail -12
else
    echo "no chunk: $LEFT minutes left"
fi
(cd "$OUT" && tar czf logs.tgz ./*.log && rm -f ./*.log)
echo "total: $(( $(date +%s) - t0 )) s"
