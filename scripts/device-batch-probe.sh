#!/usr/bin/env bash
# GPU machine only: how one training step's time grows with the batch, measured on the run itself. Each batch
# resumes a copy of the run's checkpoint with --batch-size B for PROBE_STEPS steps (no validation, no checkpoint
# until the end) and times the steps from its training.csv (the first PROBE_SKIP steps left out: allocation and
# autotuning). Writes a markdown table to $OUT/batch_probe.md and, as its last line, the batch a chunk should
# use: the largest one whose steps/s stays at least PROBE_KEEP (default 0.75) of the run's own batch's, since a
# launch-bound step trains on more structures per second at about the same step rate (docs/MODEL.md, "Training
# throughput on the GPU").
#   RUN=DIR              the run folder holding checkpoint.safetensors (a repository folder or /tmp/run-NAME)
#   TRAINER=PATH         flashipa-train (default: the build's)
#   PROBE_BATCHES="..."  batches to time (default "32 64 128")
set -euo pipefail
: "${RUN:?set RUN to the run folder}"
T="${TRAINER:-/tmp/flashipa-build/bin/flashipa-train}"
BATCHES="${PROBE_BATCHES:-32 64 128}"
STEPS_EACH="${PROBE_STEPS:-60}"
SKIP="${PROBE_SKIP:-10}"
KEEP="${PROBE_KEEP:-0.75}"
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
TABLE="$OUT/batch_probe.md"
RUN_BATCH="$(python3 - "$RUN/checkpoint.safetensors" <<'EOF'
import json, struct, sys
with open(sys.argv[1], "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    print(json.loads(f.read(n))["__metadata__"]["trainer.batch_size"])
EOF
)"
{
    echo "| batch | steps/s | structures/s | training loss (mean of the timed steps) |"
    echo "|---:|---:|---:|---:|"
} > "$TABLE"
for B in $BATCHES; do
    W=/tmp/probe-$B; rm -rf "$W"; mkdir -p "$W"
    cp "$RUN/checkpoint.safetensors" "$RUN/training.csv" "$W/"
    "$T" --data build/dataset/flashipa-dataset.safetensors --out-dir "$W" --resume --device cuda --batch-size "$B" \
        --stop-after-steps "$STEPS_EACH" --val-every 0 --checkpoint-every 0 --quiet > "$W/log" 2>&1 || { tail -5 "$W/log"; continue; }
    python3 - "$W/training.csv" "$B" "$STEPS_EACH" "$SKIP" >> "$TABLE" <<'EOF'
import csv, sys
path, batch, steps, skip = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rows = [r for r in csv.DictReader(open(path)) if r["train_loss"]][-steps:][skip:]
rate = (len(rows) - 1) / (float(rows[-1]["wall_s"]) - float(rows[0]["wall_s"]))
loss = sum(float(r["train_loss"]) for r in rows) / len(rows)
print(f"| {batch} | {rate:.2f} | {rate * batch:.0f} | {loss:.4f} |")
EOF
done
nvidia-smi --query-gpu=name --format=csv,noheader | sed 's/^/GPU: /' >> "$TABLE"
python3 - "$TABLE" "$RUN_BATCH" "$KEEP" <<'EOF' >> "$TABLE"
import sys
rows = [l.split("|")[1:3] for l in open(sys.argv[1]) if l.startswith("| ") and l[2].isdigit()]
rate = {int(b): float(r) for b, r in rows}
base = rate.get(int(sys.argv[2]))
keep = float(sys.argv[3])
chosen = max([b for b in rate if base is None or rate[b] >= keep * base] or [int(sys.argv[2])])
print(f"chosen batch {chosen} (the largest whose steps/s is at least {keep} of the run's batch {sys.argv[2]})")
EOF
cat "$TABLE"
