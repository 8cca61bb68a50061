"""What the geometry prior alone says about noised chains (docs/MODEL.md, "Chain weight").

Two measurements of the analytic prior (GeometryPrior.h) without the network, for each prior version:

1. On validation chains noised at sigma: the least-squares scale c that best matches the prior's correction
   sigma * dE/dx to the true noise (the denoising score matching optimum of c * prior). 1 means the prior's
   overall pull has the right strength; a sum of pair marginals gives 2/3 at large sigma for proteins.
2. The probability-flow ODE of the prior alone from pure noise (60 Heun steps, the sampler's matched start,
   ChainSpread.h): are the samples chains? Links C(i)-N(i+1) within 0.2 nm, median bond and link lengths.

The pair statistics (d0, s0) come from a checkpoint with a prior (any run of flashipa-train --geometry-prior,
even one step: they are measured when a run starts). Torch twin, CPU, float64.

    python benchmarks/prior_diagnostics.py --stats-from RUN/model.safetensors [--out FILE.md]
"""
import argparse
import math
import os

import numpy as np
import torch

from openmmflashipa import torch_twin
from openmmflashipa.evaluation import DataSet

SIGMAS = (0.03, 0.1, 0.3, 1.0, 2.0)
# The sampler's start spread of a protein chain, s(L) = a L^nu (ChainSpread.h), per coordinate (nm).
PROTEIN_SPREAD = (0.2066, 0.3015)


def optimal_scales(data, moltype, pairs, stats, version, chains, draws=4):
    """Per sigma: <eps_prior, eps> / <eps_prior, eps_prior> over noised validation chains."""
    out = []
    for sigma in SIGMAS:
        generator = torch.Generator().manual_seed(0)
        dot = norm = 0.0
        for c in chains:
            atoms, types = data.chain(c)[0], data.chain(c)[1]
            x0 = torch.tensor(atoms, dtype=torch.float64)[None]
            L = x0.shape[1]
            ty = torch.tensor(np.asarray(types), dtype=torch.int64)[None]
            ch = torch.zeros(1, L, dtype=torch.int64)
            real = torch.ones(1, L, dtype=torch.bool)
            for _ in range(draws):
                eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
                x = (x0 + sigma * eps).requires_grad_(True)
                energy = torch_twin.geometry_prior(x, ty, ch, real, torch.tensor([sigma], dtype=torch.float64),
                                                   pairs, stats, version=version)
                correction = sigma * torch.autograd.grad(energy.sum(), x)[0]
                dot += (correction * eps).sum().item()
                norm += correction.pow(2).sum().item()
        out.append(dot / norm)
    return out


def prior_flow(pairs, stats, version, sigma_max, length=100, samples=4, steps=60, sigma_min=0.01):
    """Protein samples of the prior-only flow: (links connected, C-N+1 median, N-CA median) in nm."""
    types = torch.zeros(samples, length, dtype=torch.int64)
    chains = torch.zeros(samples, length, dtype=torch.int64)
    real = torch.ones(samples, length, dtype=torch.bool)

    def grad(x, sigma):
        x = x.detach().requires_grad_(True)
        e = torch_twin.geometry_prior(x, types, chains, real, torch.full((samples,), sigma, dtype=torch.float64),
                                      pairs, stats, version=version)
        return torch.autograd.grad(e.sum(), x)[0]

    generator = torch.Generator().manual_seed(0)
    spread = PROTEIN_SPREAD[0] * length ** PROTEIN_SPREAD[1]
    x = torch.randn(samples, length, 3, 3, generator=generator, dtype=torch.float64)
    x = x * math.sqrt(sigma_max ** 2 + spread ** 2)
    level = [sigma_max * (sigma_min / sigma_max) ** (k / steps) for k in range(steps + 1)]
    for s, t in zip(level[:-1], level[1:]):
        d1 = s * grad(x, s)
        d2 = t * grad(x + (t - s) * d1, t)
        x = x + (t - s) * 0.5 * (d1 + d2)
    link = (x[:, 1:, 0] - x[:, :-1, 2]).norm(dim=-1)
    bond = (x[:, :, 0] - x[:, :, 1]).norm(dim=-1)
    return (link < 0.2).double().mean().item(), link.median().item(), bond.median().item()


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stats-from", required=True, help="a checkpoint with a geometry prior (its d0, s0)")
    p.add_argument("--data", default=os.path.join(root, "build", "dataset", "flashipa-dataset.safetensors"))
    p.add_argument("--out", help="write the tables here (Markdown)")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = torch_twin.load_energy_model(args.stats_from, dtype=torch.float64)
    if model.geometryPriorStats is None:
        raise SystemExit("%s has no geometry prior" % args.stats_from)
    pairs, stats = model.geometryPriorPairs.detach(), model.geometryPriorStats.detach()
    data = DataSet(args.data)
    lines = ["# The geometry prior alone (`benchmarks/prior_diagnostics.py`)", "",
             "Least-squares scale of the prior's correction against the true noise on validation chains "
             "(1 = right strength), per sigma (nm):", "",
             "| molecule | prior version | " + " | ".join("σ = %g" % s for s in SIGMAS) + " |",
             "|---|---|" + "---:|" * len(SIGMAS)]
    for moltype, lengths in (("protein", (60, 150)), ("rna", (20, 200))):
        chains = data.chains(moltype, "val", minLength=lengths[0], maxLength=lengths[1], singleSegment=True)[:6]
        for version in (1, 2, 3):
            scales = optimal_scales(data, moltype, pairs, stats, version, chains)
            lines.append("| %s | %d | %s |" % (moltype, version, " | ".join("%.3f" % c for c in scales)))
            print(lines[-1], flush=True)
    lines += ["", "The prior alone as the sampler's flow (100-residue proteins, 4 samples, 60 Heun steps to 0.01 nm, "
              "matched start):", "",
              "| prior version | σ_max (nm) | links connected | C–N+1 median (nm; proteins 0.133) | N–CA median (nm; 0.146) |",
              "|---|---|---:|---:|---:|"]
    for version in (1, 2, 3):
        for sigma_max in (1.0, 2.0):
            connected, link, bond = prior_flow(pairs, stats, version, sigma_max)
            lines.append("| %d | %.1f | %.2f | %.3f | %.3f |" % (version, sigma_max, connected, link, bond))
            print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
