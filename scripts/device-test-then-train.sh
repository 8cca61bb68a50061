#!/usr/bin/env bash
# GPU machine only: the lean call for a short device budget: build, the CUDA CTest suites and the geometry prior's
# tests (whose blocked exclusion also runs on the GPU), then a training chunk until DEADLINE_S seconds after the start
# (default 500). Carry .whl and .dataset. Environment of the chunk: RUN, STEPS, NEW_RUN (device-train-chunk.sh).
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
t0=$(date +%s)
: "${RUN:?set RUN to the run folder}" "${STEPS:?set STEPS}"
bash scripts/device-dataset.sh unpack || exit 1
bash scripts/device-build.sh || exit 1
echo "build: $(( $(date +%s) - t0 )) s"
(cd /tmp/flashipa-build && timeout 200 ctest -j4 --timeout 150 --output-on-failure -L cuda > "$OUT/ctest-cuda.log" 2>&1;
 grep -E 'tests passed|Failed|\*\*\*' "$OUT/ctest-cuda.log" | head -20;
 timeout 90 ctest --output-on-failure -R GeometryPrior > "$OUT/ctest-prior.log" 2>&1;
 grep -E 'tests passed|Failed|\*\*\*' "$OUT/ctest-prior.log" | head -10)
echo "tests: $(( $(date +%s) - t0 )) s"
LEFT=$(python3 -c "print(round(((${DEADLINE_S:-500}) - ($(date +%s) - $t0)) / 60 - 0.4, 2))")
if python3 -c "import sys; sys.exit(not $LEFT >= 1)"; then
    echo "chunk: $LEFT minutes"
    TRAINER=/tmp/flashipa-build/bin/flashipa-train MINUTES="$LEFT" bash scripts/device-train-chunk.sh 2>&1 | tail -12
else
    echo "no chunk: $LEFT minutes left"
fi
(cd "$OUT" && tar czf logs.tgz ./*.log && rm -f ./*.log)
echo "total: $(( $(date +%s) - t0 )) s"
