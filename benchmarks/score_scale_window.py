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


def flow(model, start, types, chains, sigma_max, sigma_min, steps, scale=lambda sigma: 1.0, extra=None):
    """Heun steps of dx/dsigma = sigma grad(scale(sigma) E + extra(x, sigma)), then Tweedie's step with the same
    energy at sigma_min. extra: an energy [B] added to the model's (None: nothing)."""
    def grad(x, sigma):
        x = x.detach().requires_grad_(True)
        energy = scale(sigma) * torch_twin.energy(model, x, types, chains, torch.full((x.shape[0],), sigma), checked=False).sum()
        if extra is not None:
            energy = energy + extra(x, sigma).sum()
        return torch.autograd.grad(energy, x)[0]
    x = start.clone()
    sigmas = sigma_max * (sigma_min / sigma_max) ** (np.arange(steps + 1) / steps)
    for s, t in zip(sigmas[:-1], sigmas[1:]):
        d1 = s * grad(x, s)
        d2 = t * grad(x + (t - s) * d1, t)
        x = x + (t - s) * 0.5 * (d1 + d2)
    return (x - sigma_min ** 2 * grad(x, sigma_min)).detach().double().numpy()


def addFlowArguments(parser):
    """The options every twin-flow benchmark takes: the model, the chains and the sampler's schedule."""
    parser.add_argument("--model", required=True)
    parser.add_argument("--length", type=int, default=100)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--sigma-max", type=float, default=1.2)
    parser.add_argument("--seed", type=int, default=0)


def flowInputs(args):
    """(model, types, chains, start) for addFlowArguments' options: the twin in float32 and the sampler's own start
    (ChainSpread) for `samples` unknown-type chains of `length` residues."""
    model = torch_twin.load_energy_model(args.model, dtype=torch.float32)
    L, n = args.length, args.samples
    types = torch.full((n, L), UNKNOWN_AMINO_ACID, dtype=torch.long)
    chains = torch.zeros_like(types)
    start = torch.from_numpy(np.frombuffer(_chainStart([UNKNOWN_AMINO_ACID] * L, [0] * L, args.sigma_max, n, args.seed),
                                           dtype=np.float64).reshape(n, L, 3, 3).copy()).float()
    return model, types, chains, start


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", action="append", required=True, help="lambda or lambda@sigma_c (repeatable)")
    addFlowArguments(p)
    args = p.parse_args()
    model, types, chains, start = flowInputs(args)
    print("| λ | below σ_c (nm) | helix | strand | Cα–Cα median (nm) | links connected | φ > 0 | Rg (nm) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for spec in args.scale:
        scale, below = (float(v) for v in (spec.split("@") + ["inf"])[:2])
        factor = lambda sigma, scale=scale, below=below: scale if sigma < below else 1.0  # noqa: E731
        s = summarise(list(flow(model, start, types, chains, args.sigma_max, 0.02, args.steps, scale=factor)))
        print("| %g | %s | %.3f | %.3f | %.3f | %.2f | %.2f | %.2f |" % (
            scale, "every" if np.isinf(below) else "%g" % below, s["helix"], s["strand"], s["caca"], s["connected"],
            s["phi_positive"], s["rg"]), flush=True)


if __name__ == "__main__":
    main()
