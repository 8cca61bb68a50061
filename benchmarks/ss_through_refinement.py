"""Where does a generated protein lose its secondary structure? (docs/MODEL.md, "Low-temperature sampling")

Generated backbones are followed through the steps of `flashipa evaluate`'s refinement, and DSSP (pydssp, the
carbonyl O placed from the frames, as the evaluation measures) and phi > 0 are taken after each:

    raw        the sample as the flow leaves it
    repaired   refine.repairGeometry: frame atoms minimised under ideal frame geometry (no learned force)
    minimized  refine(protocol="minimize"): poly-Gly all-atom, amber14 + OBC2, minimised without and then with the
               learned force
    md         refine(protocol="md", steps=N): the same, then N Langevin steps at 300 K and a quench, as
               `flashipa evaluate` refines generated chains

Each refined step also runs with the learned force switched off (scale 0), which says whether the force field
or the learned force undoes what the flow built. A second table repeats the repair without each of its terms
(the soft repulsion between frame atoms, FrameRepulsion; the trans-peptide distances, PeptideGeometry), with the
median distance each atom moved, and counts the raw samples' frame-atom clashes against validation natives'.

    python benchmarks/ss_through_refinement.py --model M.safetensors [--length 100] [--samples 4]
        [--score-scale 3] [--md-steps 500] [--platform CPU]
"""
import argparse

import numpy as np

from openmmflashipa import evaluation, refine
from openmmflashipa.generate import generate
from openmmflashipa.selfconsistency import CLASH_DISTANCE
from openmmflashipa.topology import positionsNm, selectFrameResidues
from raw_samples import clashesPer100, summarise  # the sampler table's measurements (benchmarks/)


def frameMetrics(frames):
    """helix, strand and phi > 0 of one protein chain's frame atoms ([L, 3, 3] nm), as raw_samples.summarise."""
    return {k: v for k, v in summarise([frames]).items() if k in ("helix", "strand", "phi_positive")}


def refinedFrames(refined):
    """The frame atoms ([L, 3, 3] nm) of a RefinedStructure."""
    return refined.particlePositions[evaluation._frameIndices(refined)]


def repairWithout(chain, dropped, platform):
    """The frame atoms of refine.repairGeometry(chain) with the named forces left out of its System."""
    topology, positions = chain.toOpenMM()
    frames, _ = selectFrameResidues(topology)
    system, start, _ = refine.backboneSystem(frames, positionsNm(positions), withForce=False, segments=[0] * len(frames))
    for k in reversed(range(system.getNumForces())):
        if system.getForce(k).getName() in dropped:
            system.removeForce(k)
    return refine.minimizedFrames(system, start, platform)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a model checkpoint")
    p.add_argument("--length", type=int, default=100)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--steps", type=int, default=60, help="sampler steps")
    p.add_argument("--score-scale", type=float, default=3.0, help="lambda")
    p.add_argument("--md-steps", type=int, default=500, help="Langevin steps of the 'md' protocol")
    p.add_argument("--platform", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="build/dataset/flashipa-dataset.safetensors", help="for the natives' clashes")
    args = p.parse_args()
    chains = generate("protein", args.length, numSamples=args.samples, seed=args.seed, numSteps=args.steps,
                      platform=args.platform, modelPath=args.model, progress=False, scoreScale=args.score_scale)
    stages = {}
    for j, chain in enumerate(chains):
        repaired = refine.repairGeometry(chain, platform=args.platform)
        rows = {"raw": frameMetrics(chain.frames), "repaired": frameMetrics(repaired.frames)}
        for scale in (1.0, 0.0):
            for protocol, steps in (("minimize", None), ("md", args.md_steps)):
                refined = refine.refine(chain, platform=args.platform, protocol=protocol, steps=steps, scale=scale,
                                        seed=args.seed + j, modelPath=args.model, progress=False)
                rows["%s%s" % (protocol, "" if scale else " (no learned force)")] = frameMetrics(refinedFrames(refined))
        for stage, values in rows.items():
            stages.setdefault(stage, []).append(values)
        print("chain %d: %s" % (j, ", ".join("%s %.2f/%.2f" % (k, v["helix"], v["strand"]) for k, v in rows.items())),
              flush=True)
    print("\n%d chains of %d residues, lambda %g, %d sampler steps, model %s\n" % (
        len(chains), args.length, args.score_scale, args.steps, args.model))
    print("| stage | helix | strand | φ > 0 |")
    print("|---|---:|---:|---:|")
    for stage, values in stages.items():
        print("| %s | %.2f | %.2f | %.2f |" % (stage, np.mean([v["helix"] for v in values]),
                                             np.mean([v["strand"] for v in values]),
                                             np.mean([v["phi_positive"] for v in values])))
    print("\nThe repair without each of its terms (same chains):\n")
    print("| repair | helix | strand | φ > 0 | median atom displacement (nm) |")
    print("|---|---:|---:|---:|---:|")
    for dropped in ((), ("FrameRepulsion",), ("PeptideGeometry",), ("FrameRepulsion", "PeptideGeometry")):
        repaired = [repairWithout(chain, dropped, args.platform) for chain in chains]
        values = [frameMetrics(f) for f in repaired]
        moved = [np.median(np.linalg.norm(f - chain.frames, axis=-1)) for f, chain in zip(repaired, chains)]
        print("| %s | %.2f | %.2f | %.2f | %.3f |" % (
            "without " + " and ".join(dropped) if dropped else "as refine does it", np.mean([v["helix"] for v in values]),
            np.mean([v["strand"] for v in values]), np.mean([v["phi_positive"] for v in values]), np.mean(moved)))
    data = evaluation.DataSet(args.data)
    natives = [data.chain(c)[0] for c in data.chains("protein", "val", minLength=80, maxLength=150)[:8]]
    print("\nFrame-atom clashes (pairs closer than %.2f nm, residues >= 2 apart) per 100 residues: raw samples %s; "
          "%d validation natives of 80-150 residues %s" % (CLASH_DISTANCE, ", ".join("%.0f" % clashesPer100(c.frames) for c in chains),
                                                          len(natives), ", ".join("%.0f" % clashesPer100(f) for f in natives)))


if __name__ == "__main__":
    main()
