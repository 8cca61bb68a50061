"""Are a model's generated samples chains, before any repair? (docs/MODEL.md, "Generated samples are not chains"
and "Low-temperature sampling")

For each model: 100-residue proteins from openmmflashipa.generate (the batched C++ sampler on the CPU, its
matched start), at each sigma_max and score scale lambda, and the raw frames' links: fraction connected
(evaluation.connectedFraction: C(i)-N(i+1) <= 0.2 nm), median C-N+1 and Calpha-Calpha distances, Calpha radius
of gyration against the training set's Rg(L) fit, the fraction of residues with phi > 0 (training chains: 6 %),
and the DSSP helix and strand fractions of the raw backbone (pydssp, carbonyl O placed from the frames, as the
self-consistency check measures; training set: 0.29 and 0.27), and the clashes of the raw frame atoms: pairs closer than
0.25 nm between residues at least two apart, per 100 residues (metrics.clashes, as the evaluation counts heavy-atom
clashes after refinement; validation natives: none).

    python benchmarks/raw_samples.py --model A.safetensors --model B.safetensors [--samples 3] [--steps 60]
        [--sigma-max 1.2 --sigma-max 0.8] [--score-scale 1 --score-scale 4] [--churn 0 --churn 0.3]
"""
import argparse
import itertools

import numpy as np

from openmmflashipa import backbone, evaluation, metrics
from openmmflashipa.generate import generate
from openmmflashipa.selfconsistency import CLASH_DISTANCE


def clashesPer100(frames):
    """Frame-atom pairs of one chain ([L, 3, 3] nm) closer than CLASH_DISTANCE between residues at least two apart,
    per 100 residues."""
    return 100.0 * metrics.clashes(frames.reshape(-1, 3), np.repeat(np.arange(len(frames)), 3), CLASH_DISTANCE, 2) / len(frames)


def summarise(frames):
    """What the tables report of raw protein samples (a list of [L, 3, 3] frame atoms, nm): links connected,
    median C-N+1 and Calpha-Calpha distances, mean Rg, phi > 0, DSSP helix and strand (O placed from the frames), and
    frame-atom clashes per 100 residues."""
    ss = [metrics.secondaryStructureFractions(metrics.secondaryStructure(backbone.proteinBackboneWithOxygen(f)))
          for f in frames]
    return {"connected": np.mean([evaluation.connectedFraction(f, "protein") for f in frames]),
            "link": np.median(np.concatenate([metrics.linkLengths(f, "protein") for f in frames])),
            "caca": np.median(np.concatenate([np.linalg.norm(f[1:, 1] - f[:-1, 1], axis=1) for f in frames])),
            "rg": np.mean([metrics.radiusOfGyration(f[:, 1]) for f in frames]),
            "phi_positive": np.mean([evaluation.ramachandran(f)["phi_positive"] for f in frames]),
            "helix": np.mean([v["helix"] for v in ss]), "strand": np.mean([v["strand"] for v in ss]),
            "clashes": np.mean([clashesPer100(f) for f in frames])}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", required=True, help="a model checkpoint (repeatable)")
    p.add_argument("--length", type=int, default=100)
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--sigma-max", type=float, action="append", help="nm (repeatable; default 1.2 and 2.0)")
    p.add_argument("--score-scale", type=float, action="append", help="lambda (repeatable; default 1)")
    p.add_argument("--churn", type=float, action="append", help="the sampler's churn (repeatable; default 0)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    sigmas = args.sigma_max or [1.2, 2.0]
    scales = args.score_scale or [1.0]
    churns = args.churn or [0.0]
    training_rg = 0.362 * args.length ** 0.298  # the training set's Rg(L) fit (evaluation targets)
    print("| model | σ_max (nm) | λ | churn | links connected | C–N+1 median (nm) | Cα–Cα median (nm; 0.38) | "
          "Rg (nm; training %.2f) | φ > 0 | helix | strand | clashes / 100 res |" % training_rg)
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model in args.model:
        for sigma_max, scale, churn in itertools.product(sigmas, scales, churns):
            chains = generate("protein", args.length, numSamples=args.samples, seed=args.seed, numSteps=args.steps,
                              sigmaMax=sigma_max, device="cpu", modelPath=model, progress=False, scoreScale=scale,
                              churn=churn)
            s = summarise([c.frames for c in chains])
            print("| %s | %.1f | %g | %g | %.2f | %.3f | %.3f | %.2f | %.2f | %.2f | %.2f | %.1f |" % (
                model, sigma_max, scale, churn, s["connected"], s["link"], s["caca"], s["rg"], s["phi_positive"], s["helix"],
                s["strand"], s["clashes"]), flush=True)


if __name__ == "__main__":
    main()
