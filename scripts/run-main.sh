#!/usr/bin/env bash
# The main job: set up and build everything (idempotent), then run the quick-start example.
# Arguments are passed to examples/quickstart.py (e.g. --steps 50, --solvent vacuum, --only rna).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
.venv/bin/python examples/quickstart.py "$@"
