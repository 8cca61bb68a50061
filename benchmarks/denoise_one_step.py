"""One-step (Tweedie) denoising with the learned score, on the validation split.

Complements benchmarks/evaluate_model.py, whose denoising section minimises the learned energy. Under
denoising score matching the model learns sigma * dE/dx ~ eps for x = x0 + sigma * eps, so the posterior mean
of the native is x - sigma^2 dE/dx (Tweedie's formula). This script applies that one step at the noise level
itself and reports the median frame-atom RMSD to native before and after (Kabsch-superposed), per molecule
type and sigma, on the same seeded chain sample as evaluate_model.py. Torch twin on CPU, float64.

    python benchmarks/denoise_one_step.py [--model PATH] [--max-chains-per-type 12] [--out FILE.md]
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import evaluate_model as em  # noqa: E402  (shares the data set, manifest, chain sample and RMSD)
from openmmflashipa import torch_twin  # noqa: E402


def one_step(model, chain, sigma_index, sigma, seed):
    """(RMSD before, RMSD after) for one chain perturbed with the same noise evaluate_model.py minimises."""
    native = chain.atoms
    noisy = native + em.frame_noise(chain, sigma_index, sigma, seed)
    x = torch.tensor(noisy)[None].requires_grad_(True)
    types = torch.tensor(chain.types)[None].long()
    segments = torch.tensor(chain.segments)[None].long()
    energy = torch_twin.energy(model, x, types, segments, sigma).sum()
    grad, = torch.autograd.grad(energy, x)
    denoised = (x - sigma * sigma * grad)[0].detach().numpy()
    flat = native.reshape(-1, 3)
    return em.kabsch_rmsd(noisy.reshape(-1, 3), flat), em.kabsch_rmsd(denoised.reshape(-1, 3), flat)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the package's default model)")
    p.add_argument("--dataset", default=os.path.join(root, "build", "dataset", "flashipa-dataset.safetensors"))
    p.add_argument("--manifest", default=os.path.join(root, "data", "manifest.tsv"))
    p.add_argument("--max-chains-per-type", type=int, default=12)
    p.add_argument("--max-length", type=int, default=300)
    p.add_argument("--sigmas", default="0.05,0.1,0.2")
    p.add_argument("--seed", type=int, default=2025)
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = p.parse_args()
    data = em.load_dataset(args.dataset)
    rows = em.read_manifest(args.manifest, data)
    model = torch_twin.load_energy_model(args.model, dtype=torch.float64)
    lines = ["| type | sigma (nm) | chains | median RMSD before (nm) | after one step | after/before |",
             "|---|---|---|---|---|---|"]
    for moltype in ("protein", "rna"):
        chains = em.select_chains(data, rows, moltype, args.max_chains_per_type, args.max_length, 10, args.seed)
        for k, sigma in enumerate(float(s) for s in args.sigmas.split(",")):
            pairs = np.array([one_step(model, chain, k, sigma, args.seed) for chain in chains])
            before, after = np.median(pairs[:, 0]), np.median(pairs[:, 1])
            lines.append("| %s | %g | %d | %.3f | %.3f | %.2f |" % (moltype, sigma, len(chains), before, after,
                                                                   after / before))
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write("One-step Tweedie denoising, x - sigma^2 dE/dx at the noise level (model %s, seed %d)\n\n%s\n"
                         % (os.path.basename(args.model or torch_twin.default_model_path()), args.seed, table))


if __name__ == "__main__":
    main()
