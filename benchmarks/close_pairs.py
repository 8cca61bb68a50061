"""Which frame-atom pairs of native proteins come close? (docs/MODEL.md, "Generated samples clash": what the
geometry prior's exclusion term assumes)

The exclusion term treats every pair of frame atoms (N, CA, C) of two residues that are neither the same nor linked
neighbours as a contact whose true separation is spread uniformly outside a ball of radius r0. This counts, over
training protein chains of the built data set, the pairs closer than a few thresholds by sequence separation
(pairs across segments apart), the distance distribution of each i, i+2 atom pair, and the closest pairs once
the i, i+2 pairs are left out.

    python benchmarks/close_pairs.py [--dataset build/dataset/flashipa-dataset.safetensors] [--chains 150] [--seed 0]
"""
import argparse

import numpy as np
from safetensors.numpy import load_file

ATOMS = ("N", "CA", "C")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="build/dataset/flashipa-dataset.safetensors")
    parser.add_argument("--chains", type=int, default=150, help="training protein chains drawn at random")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = load_file(args.dataset)
    offsets = data["chain_offsets"]
    train = [c for c in range(len(offsets) - 1) if not data["is_rna"][c] and data["split"][c] == 0]
    chosen = np.random.default_rng(args.seed).choice(train, min(args.chains, len(train)), replace=False)

    thresholds = (0.30, 0.35)
    bySeparation = {t: {} for t in thresholds}   # threshold -> separation label -> count
    second = {(p, q): [] for p in range(3) for q in range(3)}
    withoutSecond = []
    residues = 0
    for c in chosen:
        atoms = data["atoms"][offsets[c]:offsets[c + 1]].astype(np.float64)
        segment = data["segment"][offsets[c]:offsets[c + 1]]
        length = len(atoms)
        residues += length
        x = atoms.reshape(-1, 3)
        residue = np.repeat(np.arange(length), 3)
        seg = np.repeat(segment, 3)
        distance = np.linalg.norm(x[:, None] - x[None], axis=-1)
        separation = np.abs(residue[:, None] - residue[None])
        sameSegment = seg[:, None] == seg[None]
        upper = np.triu(np.ones_like(distance, dtype=bool), 1)
        counted = upper & (~sameSegment | (separation >= 2))   # the exclusion term's pairs
        for t in thresholds:
            close = counted & (distance < t)
            for label, where in (("across segments", ~sameSegment),
                                 *((f"i, i+{k}", sameSegment & (separation == k)) for k in range(2, 6)),
                                 ("i, i+6 or further", sameSegment & (separation >= 6))):
                bySeparation[t][label] = bySeparation[t].get(label, 0) + int((close & where).sum())
        linked = segment[2:] == segment[:-2]
        for p in range(3):
            for q in range(3):
                second[(p, q)].append(np.linalg.norm(atoms[:-2, p] - atoms[2:, q], axis=-1)[linked])
        rest = counted & ~(sameSegment & (separation == 2))
        withoutSecond.append(np.sort(distance[rest])[:50])

    print(f"{len(chosen)} training protein chains, {residues} residues (seed {args.seed})\n")
    print("Pairs of the exclusion term closer than a threshold, per 100 residues\n")
    print("| pairs | " + " | ".join(f"< {t:.2f} nm" for t in thresholds) + " |")
    print("|---|" + "---:|" * len(thresholds))
    for label in bySeparation[thresholds[0]]:
        print(f"| {label} | " + " | ".join(f"{100.0 * bySeparation[t][label] / residues:.1f}" for t in thresholds) + " |")
    print("\nEach i, i+2 atom pair (same segment)\n")
    print("| pair | min (nm) | 1st percentile | fraction < 0.30 nm | fraction < 0.35 nm |")
    print("|---|---:|---:|---:|---:|")
    for (p, q), values in second.items():
        v = np.concatenate(values)
        print(f"| {ATOMS[p]}(i)–{ATOMS[q]}(i+2) | {v.min():.3f} | {np.percentile(v, 1):.3f} | {(v < 0.30).mean():.3f} | {(v < 0.35).mean():.3f} |")
    closest = np.sort(np.concatenate(withoutSecond))
    print(f"\nWithout the i, i+2 pairs: closest {', '.join(f'{d:.3f}' for d in closest[:3])} nm; "
          f"{100.0 * (closest < 0.35).sum() / residues:.2f} pairs per 100 residues below 0.35 nm")


if __name__ == "__main__":
    main()
