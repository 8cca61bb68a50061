"""Refinement of perturbed native proteins: does refine() bring them closer to the native than plain minimisation?

Validation natives of the project's split (data/split.tsv, `val`; files from ../shared/data/protein/, one chain,
one segment, 60-200 residues) get Gaussian noise on every heavy atom (0.1 nm per coordinate, fixed seed); each
route starts from the same perturbed structure, and the N/CA/C RMSD to the native (Kabsch, nm) and the wall
time are recorded:

- start: the perturbed structure;
- amber min: amber14-all + OBC2 (refine.allAtomSystem without the learned force), L-BFGS;
- amber + learned min: the same System plus the FlashIPAForce (--scale, default 1; --sigma, default the force's
  0.05 nm), L-BFGS;
- refine(): the package's default protocol; refine(scale=0): the same without the learned force;
- with --protocols, refine(protocol=...) for each protocol named.

The two plain minimisations get as many L-BFGS iterations as refine's two stages together
(PRERELAX_ITERATIONS + --iterations), at refine's tolerance. Writes refinement.json and refinement.md in --out.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/refinement_benchmark.py --structures 5
"""

import argparse
import csv
import json
import os
import platform as _platform
import time

import numpy as np
import openmm
import openmm.unit as unit

from openmmflashipa import metrics
from openmmflashipa.checksums import fileSha256
from openmmflashipa import refine as _refine
from openmmflashipa.generate import choosePlatform
from openmmflashipa.structure import readStructure

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def select(count, minLength, maxLength, dataDir):
    """`count` validation proteins spread evenly over the length range: [(file, residues)]."""
    split = {r["structure"]: r["split"] for r in csv.DictReader(open(os.path.join(ROOT, "data", "split.tsv")),
                                                                 delimiter="\t")}
    rows = []
    for r in csv.DictReader(open(os.path.join(dataDir, "manifest.tsv")), delimiter="\t"):
        n = int(r["residues_with_frame_atoms"])
        if (r["moltype"] == "protein" and split.get(r["structure"]) == "val" and minLength <= n <= maxLength
                and r["segments"] == "1" and r["residues"] == r["residues_with_frame_atoms"]
                and "X" not in r["sequence"]):
            rows.append((r["file"], n))
    rows.sort(key=lambda row: (row[1], row[0]))
    if count >= len(rows):
        return rows
    picks = np.linspace(0, len(rows) - 1, count).round().astype(int)
    return [rows[i] for i in picks]


def perturb(positions, noise, seed):
    xyz = np.asarray(positions.value_in_unit(unit.nanometer), dtype=np.float64)
    return unit.Quantity(xyz + np.random.default_rng(seed).normal(0.0, noise, xyz.shape), unit.nanometer)


def plainMinimisation(topology, positions, withForce, iterations, platform, sigma=_refine.DEFAULT_SIGMA, scale=1.0):
    system, fixedTopology, fixedPositions = _refine.allAtomSystem(topology, positions, sigma=sigma, scale=scale,
                                                                  withForce=withForce)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), choosePlatform(platform))
    context.setPositions(fixedPositions)
    openmm.LocalEnergyMinimizer.minimize(context, _refine.MINIMIZE_TOLERANCE, iterations)
    return fixedTopology, context.getState(getPositions=True).getPositions(asNumpy=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--structures", type=int, default=5)
    parser.add_argument("--min-length", type=int, default=60)
    parser.add_argument("--max-length", type=int, default=200)
    parser.add_argument("--noise", type=float, default=0.1, help="nm per coordinate")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--iterations", type=int, default=500, help="refine's minimizeIterations")
    parser.add_argument("--protocols", default="", help="extra refine protocols, comma-separated")
    parser.add_argument("--platform", default="CPU")
    parser.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
    parser.add_argument("--out", default=os.path.join(HERE, "results", "refinement_cpu"))
    parser.add_argument("--model", help="the learned force's checkpoint (default: the shipped model)")
    parser.add_argument("--routes", default="", help="only these routes, comma-separated (default: all)")
    parser.add_argument("--sigma", type=float, default=_refine.DEFAULT_SIGMA,
                        help="the learned force's flashipaSigma in nm for every route with it (default %(default)g)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="the learned force's flashipaScale for every route with it (default 1)")
    args = parser.parse_args()
    if args.model:  # the plugin and the package resolve the default model through this variable
        os.environ["FLASHIPA_DEFAULT_MODEL"] = os.path.abspath(args.model)
    os.makedirs(args.out, exist_ok=True)
    plainIterations = _refine.PRERELAX_ITERATIONS + args.iterations
    routes = [("start", None),
              ("amber min", lambda t, p: plainMinimisation(t, p, False, plainIterations, args.platform)),
              ("amber + learned min", lambda t, p: plainMinimisation(t, p, True, plainIterations, args.platform,
                                                                     args.sigma, args.scale)),
              ("refine()", lambda t, p: _result(_refine.refine((t, p), platform=args.platform, progress=False,
                                                                 minimizeIterations=args.iterations, sigma=args.sigma,
                                                                 scale=args.scale))),
              ("refine(scale=0)", lambda t, p: _result(_refine.refine((t, p), platform=args.platform, scale=0,
                                                                        progress=False,
                                                                        minimizeIterations=args.iterations)))]
    for protocol in [p for p in args.protocols.split(",") if p]:
        routes.append(("refine(protocol=%r)" % protocol,
                       lambda t, p, protocol=protocol: _result(_refine.refine(
                           (t, p), platform=args.platform, progress=False, protocol=protocol,
                           minimizeIterations=args.iterations, sigma=args.sigma, scale=args.scale))))
    if args.routes:
        wanted = ["start"] + [r.strip() for r in args.routes.split(",")]
        unknown = [r for r in wanted if r not in [name for name, _ in routes]]
        if unknown:
            parser.error("unknown route(s) %s; the routes are %s" % (unknown, [name for name, _ in routes]))
        routes = [(name, route) for name, route in routes if name in wanted]
    chosen = select(args.structures, args.min_length, args.max_length, args.data)
    report = {"model": ({"file": os.path.basename(args.model), "sha256": fileSha256(args.model)} if args.model
                        else "shipped"), "noise_nm": args.noise, "seed": args.seed, "iterations": args.iterations,
              "plain_iterations": plainIterations, "default_protocol": _refine.DEFAULT_PROTOCOL,
              "sigma_nm": args.sigma, "scale": args.scale,
              "min_length": args.min_length, "max_length": args.max_length,
              "platform": choosePlatform(args.platform).getName(), "cpu_count": os.cpu_count(),
              "machine": _platform.processor() or _platform.machine(), "structures": []}
    for k, (path, length) in enumerate(chosen):
        native = readStructure(os.path.join(args.data, path))
        noisy = perturb(native[1], args.noise, args.seed + k)
        row = {"file": path, "residues": length, "rmsd": {}, "seconds": {}}
        for name, route in routes:
            started = time.perf_counter()
            try:
                topology, positions = (native[0], noisy) if route is None else route(native[0], noisy)
                row["rmsd"][name] = metrics.backboneRMSD(topology, positions, *native)
            except Exception as error:  # recorded, never hidden
                row["rmsd"][name] = None
                row.setdefault("errors", {})[name] = str(error).splitlines()[0][:200]
            row["seconds"][name] = time.perf_counter() - started
            print("%s (%d res) %-24s rmsd %s  %.0f s" % (path, length, name, row["rmsd"][name],
                                                         row["seconds"][name]), flush=True)
        report["structures"].append(row)
        _write(report, [name for name, _ in routes], args.out)


def _result(refined):
    return refined.topology, refined.positions


def _write(report, names, out):
    with open(os.path.join(out, "refinement.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    rows = report["structures"]
    lines = ["# Refinement of perturbed validation natives (%s platform, %d cores)" % (report["platform"],
                                                                                        report["cpu_count"]),
             "",
             "%d validation proteins (data/split.tsv `val`, one chain, one segment, %d-%d residues, spread over "
             "the lengths); heavy atoms perturbed by %.2f nm Gaussian noise per coordinate (seed %d + structure "
             "index). N/CA/C RMSD to the native after Kabsch superposition (nm), then wall time (s) per route "
             "including PDBFixer and System construction. refine() is protocol '%s' with minimizeIterations=%d; "
             "the plain minimisations get %d L-BFGS iterations. The learned force: flashipaSigma %g nm, flashipaScale "
             "%g. Written by `benchmarks/refinement_benchmark.py`."
             % (len(rows), report.get("min_length", 60), report.get("max_length", 200), report["noise_nm"], report["seed"], report["default_protocol"], report["iterations"],
                report["plain_iterations"], report.get("sigma_nm", _refine.DEFAULT_SIGMA), report.get("scale", 1.0)),
             "",
             "| protein | residues | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for row in rows:
        lines.append("| %s | %d | " % (os.path.basename(row["file"]).replace(".cif.gz", ""), row["residues"])
                     + " | ".join("-" if row["rmsd"][n] is None else "%.3f" % row["rmsd"][n] for n in names) + " |")
    means = []
    for n in names:
        values = [row["rmsd"][n] for row in rows if row["rmsd"][n] is not None]
        means.append("%.3f" % np.mean(values) if values else "-")
    lines.append("| **mean** | | " + " | ".join(means) + " |")
    lines += ["", "Wall time (s):", "",
              "| protein | " + " | ".join(names[1:]) + " |",
              "|---|" + "---|" * (len(names) - 1)]
    for row in rows:
        lines.append("| %s | " % os.path.basename(row["file"]).replace(".cif.gz", "")
                     + " | ".join("%.0f" % row["seconds"][n] for n in names[1:]) + " |")
    errors = [(row["file"], name, text) for row in rows for name, text in row.get("errors", {}).items()]
    if errors:
        lines += ["", "Errors:", ""] + ["- %s, %s: %s" % e for e in errors]
    with open(os.path.join(out, "refinement.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
