"""Where along the flow does the score scale act? (docs/MODEL.md, "Low-temperature sampling")

The probability-flow ODE of openmmflashipa.generate, written out with the PyTorch twin of the model
(torch_twin, float32, CPU) from the sampler's own start (ChainSpread), with the score multiplied by lambda only
at noise levels below sigma_c (lambda@sigma_c; plain lambda = every level). Raw 100-residue proteins: DSSP helix
and strand (carbonyl O placed from the frames), Calpha-Calpha median, links connected, phi > 0, Rg.

    python benchmarks/score_scale_window.py --model M.safetensors --scale 8@0.6 --scale 6@0.8 --scale 6
"""
import argparse

import numpy as np
import torch

from openmmflashipa import torch_twin
from openmmflashipa.openmmflashipa import UNKNOWN_AMINO_ACID, _chainStart
from raw_samples import summarise  # the same measurements as the sampler's table (run from benchmarks/)


def flow(model, start, types, chains, scale, below, sigma_max, sigma_min, steps):
    """Heun steps of dx/dsigma = lambda(sigma) sigma dE/dx, lambda = scale below `below` (else 1), then Tweedie."""
    def grad(x, sigma):
        x = x.detach().requires_grad_(True)
        energy = torch_twin.energy(model, x, types, chains, torch.full((x.shape[0],), sigma), checked=False).sum()
        return torch.autograd.grad(energy, x)[0]
    factor = lambda sigma: scale if sigma < below else 1.0  # noqa: E731
    x = start.clone()
    sigmas = sigma_max * (sigma_min / sigma_max) ** (np.arange(steps + 1) / steps)
    for s, t in zip(sigmas[:-1], sigmas[1:]):
        d1 = factor(s) * s * grad(x, s)
        d2 = factor(t) * t * grad(x + (t - s) * d1, t)
        x = x + (t - s) * 0.5 * (d1 + d2)
    return (x - factor(sigma_min) * sigma_min ** 2 * grad(x, sigma_min)).detach().double().numpy()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--scale", action="append", required=True, help="lambda or lambda@sigma_c (repeatable)")
    p.add_argument("--length", type=int, default=100)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--sigma-max", type=float, default=1.2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    model = torch_twin.load_energy_model(args.model, dtype=torch.float32)
    L, n = args.length, args.samples
    types = torch.full((n, L), UNKNOWN_AMINO_ACID, dtype=torch.long)
    chains = torch.zeros_like(types)
    start = torch.from_numpy(np.frombuffer(_chainStart([UNKNOWN_AMINO_ACID] * L, [0] * L, args.sigma_max, n, args.seed),
                                           dtype=np.float64).reshape(n, L, 3, 3).copy()).float()
    print("| λ | below σ_c (nm) | helix | strand | Cα–Cα median (nm) | links connected | φ > 0 | Rg (nm) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for spec in args.scale:
        scale, below = (float(v) for v in (spec.split("@") + ["inf"])[:2])
        s = summarise(list(flow(model, start, types, chains, scale, below, args.sigma_max, 0.02, args.steps)))
        print("| %g | %s | %.3f | %.3f | %.3f | %.2f | %.2f | %.2f |" % (
            scale, "every" if np.isinf(below) else "%g" % below, s["helix"], s["strand"], s["caca"], s["connected"],
            s["phi_positive"], s["rg"]), flush=True)


if __name__ == "__main__":
    main()
