#!/usr/bin/env python
"""Self-consistency check: generate -> refine -> simulate with and without the learned force -> report.

Writes, in --out: generated.pdb, refined.pdb, trajectories, summary.json, report.md and
selfconsistency.png (RMSD to the generated and refined structure, TM-score, secondary-structure retention,
energies over time), and prints the report.

    .venv/bin/python examples/self_consistency.py --type protein --length 50 --ps 20 --out check-protein
"""
import argparse

from openmmflashipa.selfconsistency import selfConsistency, markdown


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--type", choices=("protein", "rna"), default="protein")
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--ps", type=float, default=10.0, help="simulation length per run (ps)")
    parser.add_argument("--snapshots", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--platform", default=None)
    parser.add_argument("--out", default="check")
    args = parser.parse_args()
    summary = selfConsistency(args.type, args.length, seed=args.seed, picoseconds=args.ps, snapshots=args.snapshots,
                              out=args.out, platform=args.platform)
    print(markdown(summary))


if __name__ == "__main__":
    main()
