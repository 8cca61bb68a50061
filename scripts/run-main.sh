#!/usr/bin/env bash
# The main job: set up and build everything (idempotent), then generate a protein and an RNA backbone with the
# shipped model, refine them, run the self-consistency check and print the summary (examples/main_job.py).
# Arguments are passed to examples/main_job.py (e.g. --ps 10, --protein-length 80, --platform CPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
.venv/bin/python examples/main_job.py "$@"
