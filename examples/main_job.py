#!/usr/bin/env python
"""The README's main job: generate a protein and an RNA backbone with the shipped model, design a sequence for
the protein (ProteinMPNN), refine them, run the self-consistency check on each, and print one summary table
with the paths of the plots.

On CUDA when the plugin's CUDA kernels and a GPU are present, else on the CPU platform; a few minutes on two
CPU cores with the defaults. Outputs go to --out/protein and --out/rna (see examples/self_consistency.py).

    .venv/bin/python examples/main_job.py [--protein-length 40] [--rna-length 24] [--ps 2] [--out main-job]
"""
import argparse
import os
import time

from openmmflashipa.generate import choosePlatform
from openmmflashipa.selfconsistency import selfConsistency

ROWS = [("refinement level", None, "s"), ("RMSD to generated (nm; protein: the repaired, designed-for backbone)", "rmsd", "%.3f"),
        ("RMSD to refined (nm)", "rmsd_to_refined", "%.3f"), ("TM-score to generated", "tm_score", "%.3f"),
        ("secondary-structure retention", "ss_retention", "%.2f"),
        ("frame-bond violations (fraction)", "bond_violation_fraction", "%.3f"), ("clashes", "clashes", "%d"),
        ("learned-force energy (kJ/mol)", "learned", "%.0f")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protein-length", type=int, default=40)
    parser.add_argument("--rna-length", type=int, default=24)
    parser.add_argument("--ps", type=float, default=2.0, help="simulation per run (ps)")
    parser.add_argument("--snapshots", type=int, default=5)
    parser.add_argument("--refine-steps", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--platform", default=None, help="CUDA, CPU or Reference (default: fastest available)")
    parser.add_argument("--out", default="main-job")
    args = parser.parse_args()
    started = time.time()
    platform = choosePlatform(args.platform).getName()
    print("FlashIPA main job on the %s platform (shipped model)" % platform, flush=True)
    summaries = {}
    for moltype, length in (("protein", args.protein_length), ("rna", args.rna_length)):
        summaries[moltype] = selfConsistency(moltype, length, seed=args.seed, picoseconds=args.ps,
                                             snapshots=args.snapshots, out=os.path.join(args.out, moltype),
                                             platform=platform, refineSteps=args.refine_steps)
    header = "| after %g ps | protein with / without force | RNA with / without force |" % args.ps
    lines = ["", header, "|---|---|---|"]
    for label, key, fmt in ROWS:
        cells = []
        for moltype in ("protein", "rna"):
            s = summaries[moltype]
            if key is None:
                cells.append(s["refinement"]["level"])
                continue
            values = [s["runs"][run]["final"].get(key) for run in ("with", "without")]
            cells.append(" / ".join("-" if v is None else fmt % v for v in values))
        lines.append("| %s | %s |" % (label, " | ".join(cells)))
    print("\n".join(lines))
    if "designed_sequence" in summaries["protein"]:
        print("\nprotein sequence designed by ProteinMPNN: %s" % summaries["protein"]["designed_sequence"])
    print("\nplots: %s, %s" % (os.path.join(args.out, "protein", "selfconsistency.png"),
                               os.path.join(args.out, "rna", "selfconsistency.png")))
    print("structures and reports: %s/{protein,rna}/ (generated.pdb, refined.pdb, report.md, summary.json)" % args.out)
    print("done in %.0f s" % (time.time() - started))


if __name__ == "__main__":
    main()
