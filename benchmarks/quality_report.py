#!/usr/bin/env python
"""Quality report for generated backbones: geometry after refinement, clashes, secondary structure and radius
of gyration against the training set, drift in MD with and without the learned force, and generation speed.

1. Generation: --proteins chains with lengths spread evenly over --protein-lengths (default 50..300 in steps
   of 25) and --rnas over --rna-lengths (40..150 in steps of 10), with the batched C++ sampler (one model batch
   per length), seeded.
2. Refinement (openmmflashipa.refine: protein all-atom with amber14 + OBC2 + the force, RNA at backbone level;
   the repair holds protein peptide links at ideal trans geometry and refine ends with a quench), then per
   structure: geometrically valid = every frame bond (N-CA, CA-C, C-N(i+1); C3'-C4', C4'-O4')
   within 0.01 nm of ideal AND no clash (heavy atoms of residues >= 2 apart closer than 0.25 nm).
3. Secondary structure (pydssp, proteins) and radius of gyration (CA / C4') vs length, against --train-chains
   train-split chains of the data set (build/dataset).
4. Drift: for the first --drift-proteins / --drift-rnas refined structures, Langevin for --drift-ps with and
   without the learned force; CA / C4' RMSD to the refined structure at the end (median).
5. Speed: backbones per second, C++ sampler vs the OpenMM AnnealingIntegrator route, same length and steps.

--time-budget stops refinement and drift early (everything measured so far is reported, with the counts);
the report says how many structures each number covers.

    python benchmarks/quality_report.py --platform CUDA --out benchmarks/results/quality
"""

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np

import torch  # noqa: F401  (before the plugin's extension)

import openmmflashipa
from openmmflashipa import metrics, torch_twin
from openmmflashipa.backbone import placeBackboneAtoms
from openmmflashipa.generate import generate, choosePlatform
from openmmflashipa.refine import refine
from openmmflashipa.selfconsistency import measure, simulate, _frameIndices, _heavy

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def log(message):
    print(message, file=sys.stderr, flush=True)


def spread(lengths_text, count):
    lengths = [int(v) for v in lengths_text.split(",")]
    return [lengths[i % len(lengths)] for i in range(count)]


def generate_all(moltype, lengths, steps, seed):
    """{length: list of Backbone}, one sampler batch per distinct length; and seconds spent."""
    out, started = {}, time.time()
    for k, length in enumerate(sorted(set(lengths))):
        n = lengths.count(length)
        out[length] = generate(moltype, length, n, seed=seed + k, numSteps=steps, progress=False)
        log("generated %d %s of length %d" % (n, moltype, length))
    return out, time.time() - started


def evaluate_refined(refined, backbone, moltype):
    indices = _frameIndices(refined)
    heavy, heavy_residues = _heavy(refined.topology, refined)
    xyz = refined.particlePositions
    values, ss = measure(xyz[indices], backbone.frames[:, 1], moltype, xyz[heavy], heavy_residues)
    values["valid"] = bool(values["bond_violation_fraction"] == 0 and values["clashes"] == 0)
    values["length"] = len(backbone)
    values["level"] = refined.level
    if ss is not None:
        values["ss"] = "".join(ss)
    return values


def training_reference(dataset, count, seed):
    """Secondary-structure fractions (protein) and (length, Rg) pairs for train-split chains."""
    tensors, _ = torch_twin.read_safetensors(dataset)
    offsets = tensors["chain_offsets"].numpy()
    split, is_rna = tensors["split"].numpy(), tensors["is_rna"].numpy()
    atoms, oxygen = tensors["atoms"].numpy().astype(np.float64), tensors["protein_O"].numpy().astype(np.float64)
    rng = np.random.default_rng(seed)
    ref = {"protein": {"rg": [], "ss": []}, "rna": {"rg": []}}
    train = [i for i in range(len(split)) if split[i] == 0]
    for i in rng.permutation(train)[:count]:
        a, b = offsets[i], offsets[i + 1]
        moltype = "rna" if is_rna[i] else "protein"
        if b - a < 20:
            continue
        ref[moltype]["rg"].append((int(b - a), metrics.radiusOfGyration(atoms[a:b, 1])))
        if moltype == "protein" and np.all(np.isfinite(oxygen[a:b])):
            backbone = np.concatenate([atoms[a:b], oxygen[a:b, None]], 1)
            ref[moltype]["ss"].append(metrics.secondaryStructureFractions(metrics.secondaryStructure(backbone)))
    return ref


def mean_fractions(rows):
    return {k: float(np.mean([r[k] for r in rows])) for k in ("helix", "strand", "coil")} if rows else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--proteins", type=int, default=100)
    p.add_argument("--rnas", type=int, default=50)
    p.add_argument("--protein-lengths", default=",".join(str(v) for v in range(50, 301, 25)))
    p.add_argument("--rna-lengths", default=",".join(str(v) for v in range(40, 151, 10)))
    p.add_argument("--steps", type=int, default=100, help="ODE steps of generation")
    p.add_argument("--refine-iterations", type=int, default=300)
    p.add_argument("--refine-steps", type=int, default=500)
    p.add_argument("--drift-proteins", type=int, default=4)
    p.add_argument("--drift-rnas", type=int, default=4)
    p.add_argument("--drift-ps", type=float, default=1000.0)
    p.add_argument("--speed-length", type=int, default=100)
    p.add_argument("--speed-samples", type=int, default=8)
    p.add_argument("--train-chains", type=int, default=300)
    p.add_argument("--dataset", default=os.path.join(ROOT, "build", "dataset", "flashipa-dataset.safetensors"))
    p.add_argument("--platform", default=None)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--time-budget", type=float, default=1e9, help="seconds; refinement and drift stop when spent")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "quality"))
    args = p.parse_args(argv)
    started = time.time()
    platform = choosePlatform(args.platform).getName()
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    recorded = dict(vars(args), dataset=os.path.relpath(args.dataset, ROOT), out=os.path.relpath(args.out, ROOT))
    report = {"date": datetime.date.today().isoformat(), "platform": platform, "gpu": gpu, "args": recorded}
    os.makedirs(args.out, exist_ok=True)

    # 5 first (cheap, and independent of the budget): speed of the two routes.
    speed = {}
    for method in ("sampler", "openmm"):
        t = time.time()
        generate("protein", args.speed_length, args.speed_samples, seed=args.seed, numSteps=args.steps,
                 method=method, platform=platform, progress=False)
        speed[method] = args.speed_samples / (time.time() - t)
    report["speed"] = {"length": args.speed_length, "samples": args.speed_samples, "steps": args.steps,
                       "backbones_per_second": speed}
    log("speed: %s" % speed)

    structures = {}
    for moltype, count, lengths in (("protein", args.proteins, args.protein_lengths),
                                    ("rna", args.rnas, args.rna_lengths)):
        generated, seconds = generate_all(moltype, spread(lengths, count), args.steps, args.seed)
        structures[moltype] = [b for length in sorted(generated) for b in generated[length]]
        report.setdefault("generation_seconds", {})[moltype] = seconds

    # 2. Refinement, alternating protein / RNA so that a budget cut leaves both represented.
    results = {"protein": [], "rna": []}
    refined_keep = {"protein": [], "rna": []}
    order = []
    for k in range(max(len(structures["protein"]), len(structures["rna"]))):
        for moltype in ("protein", "rna"):
            if k < len(structures[moltype]):
                order.append((moltype, structures[moltype][k]))
    for n, (moltype, backbone) in enumerate(order):
        if time.time() - started > args.time_budget * 0.7:
            log("time budget: refinement stopped after %d of %d structures" % (n, len(order)))
            break
        try:
            refined = refine(backbone, platform=platform, minimizeIterations=args.refine_iterations,
                             protocol="md", steps=args.refine_steps, seed=args.seed + n, progress=False)
            row = evaluate_refined(refined, backbone, moltype)
            if len(refined_keep[moltype]) < (args.drift_proteins if moltype == "protein" else args.drift_rnas):
                refined_keep[moltype].append((refined, backbone))
        except Exception as error:  # counted, never hidden
            row = {"length": len(backbone), "error": str(error).splitlines()[0][:200], "valid": False}
        results[moltype].append(row)
        log("[%d/%d] %s L=%d valid=%s bonds=%.3f clashes=%s (%.0f s)" % (
            n + 1, len(order), moltype, len(backbone), row.get("valid"), row.get("bond_violation_fraction", -1),
            row.get("clashes"), time.time() - started))
    report["refined"] = results

    # 4. Drift.
    drift = {"protein": [], "rna": []}
    for moltype in ("protein", "rna"):
        for refined, backbone in refined_keep[moltype]:
            if time.time() - started > args.time_budget:
                break
            entry = {"length": len(backbone)}
            indices = _frameIndices(refined)
            start = refined.particlePositions[indices][:, 1]
            for with_force in (True, False):
                frames, energies, times = simulate(refined, with_force, args.drift_ps, 5, platform, 300.0,
                                                   args.seed, False, "drift")
                entry["with" if with_force else "without"] = [metrics.kabschRMSD(f[indices][:, 1], start)
                                                              for f in frames]
                entry["times_ps"] = times
            drift[moltype].append(entry)
            log("drift %s L=%d: with %.3f without %.3f nm" % (moltype, len(backbone), entry["with"][-1],
                                                              entry["without"][-1]))
    report["drift"] = drift
    report["training"] = training_reference(args.dataset, args.train_chains, args.seed)
    report["summary"] = summarise(report)
    report["wall_seconds"] = time.time() - started
    with open(os.path.join(args.out, "report.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    text = markdown(report)
    with open(os.path.join(args.out, "report.md"), "w") as handle:
        handle.write(text)
    plots(report, args.out)
    print(text)


def summarise(report):
    s = {}
    for moltype in ("protein", "rna"):
        rows = report["refined"][moltype]
        ok = [r for r in rows if "error" not in r]
        d = report["drift"][moltype]
        s[moltype] = {
            "generated": len(rows), "refined": len(ok), "errors": len(rows) - len(ok),
            "valid_fraction": float(np.mean([r["valid"] for r in rows])) if rows else None,
            "bond_ok_fraction": float(np.mean([r["bond_violation_fraction"] == 0 for r in ok])) if ok else None,
            "median_clashes": float(np.median([r["clashes"] for r in ok])) if ok else None,
            "drift_structures": len(d),
            "median_drift_with": float(np.median([e["with"][-1] for e in d])) if d else None,
            "median_drift_without": float(np.median([e["without"][-1] for e in d])) if d else None,
        }
        if moltype == "protein" and ok:
            s[moltype]["ss_generated"] = mean_fractions([metrics.secondaryStructureFractions(r["ss"]) for r in ok
                                                         if "ss" in r])
            s[moltype]["ss_training"] = mean_fractions(report["training"]["protein"]["ss"])
    return s


def fmt(v, digits=3):
    return "n/a" if v is None else ("%.*f" % (digits, v))


def markdown(report):
    s = report["summary"]
    args = report["args"]
    lines = ["# Generated backbones: quality report", "",
             "%s; OpenMM platform %s, GPU %s; model: the shipped default; seed %d; wall time %.0f s." % (
                 report["date"], report["platform"], report["gpu"], args["seed"], report["wall_seconds"]),
             "Command: `python benchmarks/quality_report.py %s`" % " ".join(
                 "--%s %s" % (k.replace("_", "-"), v) for k, v in sorted(args.items())
                 if k not in ("out", "dataset")), "",
             "| | protein | RNA |", "|---|---|---|"]
    rows = [("structures generated / refined (errors)", lambda m: "%d / %d (%d)" % (
        s[m]["generated"], s[m]["refined"], s[m]["errors"])),
            ("geometrically valid after refinement (target >= 0.95)", lambda m: fmt(s[m]["valid_fraction"], 2)),
            ("  frame bonds all within 0.01 nm", lambda m: fmt(s[m]["bond_ok_fraction"], 2)),
            ("  median clashes", lambda m: fmt(s[m]["median_clashes"], 1)),
            ("drift: median RMSD to refined after %g ps, with force (target <= 0.2 nm at 1 ns)" % args["drift_ps"],
             lambda m: "%s (n=%d)" % (fmt(s[m]["median_drift_with"]), s[m]["drift_structures"])),
            ("drift without the force", lambda m: fmt(s[m]["median_drift_without"]))]
    for label, f in rows:
        lines.append("| %s | %s | %s |" % (label, f("protein"), f("rna")))
    p = s["protein"]
    if p.get("ss_generated"):
        lines += ["", "Secondary structure (protein, mean fractions): generated helix %.2f / strand %.2f / coil %.2f; "
                  "training set %.2f / %.2f / %.2f." % (
                      p["ss_generated"]["helix"], p["ss_generated"]["strand"], p["ss_generated"]["coil"],
                      p["ss_training"]["helix"], p["ss_training"]["strand"], p["ss_training"]["coil"])]
    sp = report["speed"]
    lines += ["", "Generation speed (protein, %d residues, %d samples, %d ODE steps): C++ sampler %.2f backbones/s, "
              "OpenMM AnnealingIntegrator %.2f backbones/s." % (sp["length"], sp["samples"], sp["steps"],
                                                                sp["backbones_per_second"]["sampler"],
                                                                sp["backbones_per_second"]["openmm"]),
              "", "Plots: rg_vs_length.png, ss_composition.png, drift.png.", ""]
    return "\n".join(lines)


def plots(report, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, moltype in zip(axes, ("protein", "rna")):
        train = report["training"][moltype]["rg"]
        if train:
            ax.scatter(*zip(*train), s=8, alpha=0.4, label="training set")
        gen = [(r["length"], r["radius_of_gyration"]) for r in report["refined"][moltype] if "radius_of_gyration" in r]
        if gen:
            ax.scatter(*zip(*gen), s=14, label="generated + refined")
        ax.set_xlabel("residues")
        ax.set_ylabel("radius of gyration (nm)")
        ax.set_title(moltype)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "rg_vs_length.png"), dpi=110)
    plt.close(fig)
    p = report["summary"]["protein"]
    if p.get("ss_generated"):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        keys = ("helix", "strand", "coil")
        x = np.arange(3)
        ax.bar(x - 0.2, [p["ss_training"][k] for k in keys], 0.4, label="training set")
        ax.bar(x + 0.2, [p["ss_generated"][k] for k in keys], 0.4, label="generated + refined")
        ax.set_xticks(x, keys)
        ax.set_ylabel("mean fraction of residues")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "ss_composition.png"), dpi=110)
        plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, moltype in zip(axes, ("protein", "rna")):
        for entry in report["drift"][moltype]:
            line, = ax.plot(entry["times_ps"], entry["with"], "-", lw=1)
            ax.plot(entry["times_ps"], entry["without"], "--", lw=1, color=line.get_color())
        ax.set_xlabel("time (ps)")
        ax.set_ylabel("RMSD to refined (nm)")
        ax.set_title("%s: solid with the force, dashed without" % moltype)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "drift.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
