"""From which noise level does the learned flow bring a native's helices back? (docs/MODEL.md, "Where the helix
is lost")

Validation protein chains with helices are noised by sigma (nm, per coordinate) and denoised with the product's
route (AnnealingIntegrator, the probability-flow ODE from sigma down to 0.02 nm) under the learned force alone,
with their own residue types and with every residue unknown (as generation sees them). DSSP (pydssp, the carbonyl O
placed from the frames, as raw_samples.py measures) then says what fraction of the residues is helix, and what
fraction of the native's helix residues is helix again ("kept"), with the Calpha RMSD to the native. Generation
starts from sigma_max = 1.2 nm; a helix the flow keeps from 0.3 nm but not from 0.8 nm is lost at large noise.

    python benchmarks/helix_recovery.py --model M.safetensors [--chains 4] [--sigma 0.1 --sigma 0.3 ...]
        [--steps 40] [--score-scale 1] [--platform CPU]
"""
import argparse

import numpy as np
import openmm
import openmm.unit as unit

from openmmflashipa import backbone, metrics
from openmmflashipa.annealing import AnnealingIntegrator
from openmmflashipa.evaluation import DataSet, _spread, choosePlatform
from openmmflashipa.generate import UNKNOWN_TYPE, frameSystem


def helixMask(frames):
    """DSSP helix per residue of one protein chain's frame atoms ([L, 3, 3] nm), O placed from the frames."""
    return metrics.secondaryStructure(backbone.proteinBackboneWithOxygen(frames)) == "H"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", default="build/dataset/flashipa-dataset.safetensors")
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--min-helix", type=float, default=0.3, help="natives with at least this helix fraction")
    p.add_argument("--sigma", type=float, action="append", help="nm (repeatable; default 0.1 0.2 0.3 0.5 0.8 1.2)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--score-scale", type=float, default=1.0)
    p.add_argument("--platform", default="CPU")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    sigmas = args.sigma or [0.1, 0.2, 0.3, 0.5, 0.8, 1.2]
    data = DataSet(args.dataset)
    candidates = []
    for c in data.chains("protein", "val", minLength=60, maxLength=150, singleSegment=True):
        atoms = data.chain(c)[0]
        if helixMask(atoms).mean() >= args.min_helix:
            candidates.append(c)
    candidates.sort(key=lambda c: int(data.offsets[c + 1] - data.offsets[c]))
    chosen = _spread(candidates, args.chains)
    platform = choosePlatform(args.platform)
    rng = np.random.default_rng(args.seed)
    print("| chain | residues | native helix | types | " + " | ".join("σ %g: helix / kept / Cα RMSD" % s for s in sigmas) + " |")
    print("|---|---:|---:|---|" + "---|" * len(sigmas))
    totals = {}
    for c in chosen:
        atoms, types, _, _ = data.chain(c)
        native = helixMask(atoms)
        noises = {s: rng.standard_normal(atoms.shape) for s in sigmas}  # the same noise for both type settings
        for label, chainTypes in (("own", types), ("unknown", [UNKNOWN_TYPE["protein"]] * len(atoms))):
            system, _ = frameSystem("protein", len(atoms), args.model, types=[int(t) for t in chainTypes])
            integrator = AnnealingIntegrator(max(sigmas), 0.02, args.steps, scoreScale=args.score_scale)
            context = openmm.Context(system, integrator, platform)
            cells = []
            for s in sigmas:
                context.setPositions((atoms + s * noises[s]).reshape(-1, 3))
                integrator.restart(s)
                integrator.step(args.steps)
                x = np.asarray(context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer),
                               dtype=np.float64).reshape(atoms.shape)
                helix = helixMask(x)
                kept = float(helix[native].mean()) if native.any() else float("nan")
                rmsd = float(metrics.kabschRMSD(x[:, 1], atoms[:, 1]))
                totals.setdefault((label, s), []).append((helix.mean(), kept, rmsd))
                cells.append("%.2f / %.2f / %.2f" % (helix.mean(), kept, rmsd))
            print("| %d | %d | %.2f | %s | %s |" % (c, len(atoms), native.mean(), label, " | ".join(cells)), flush=True)
            del context
    for label in ("own", "unknown"):
        cells = ["%.2f / %.2f / %.2f" % tuple(np.mean(totals[(label, s)], axis=0)) for s in sigmas]
        print("| **mean** | | | %s | %s |" % (label, " | ".join(cells)))


if __name__ == "__main__":
    main()
