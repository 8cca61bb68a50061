#!/usr/bin/env python
"""Generate a protein and an RNA backbone with the shipped model, then refine both.

- protein: poly-glycine backbone -> PDBFixer adds hydrogens (and OXT) -> amber14-all + OBC2 + FlashIPAForce
  -> minimise -> short Langevin run (all-atom level);
- RNA: poly-U backbone without bases -> backbone level: frame atoms under the FlashIPAForce, ideal frame
  geometry and a soft repulsion -> minimise -> Langevin; the other backbone atoms are placed afterwards.

Writes generated_*.pdb/.cif and refined_*.pdb in --out and prints the frame-bond lengths before and after.

    .venv/bin/python examples/refine_generated.py [--protein-length 40] [--rna-length 24] [--out refine-demo]
"""
import argparse
import os

import numpy as np
import openmm.unit as unit

import openmmflashipa
from openmmflashipa import ideal_geometry
from openmmflashipa.generate import generate
from openmmflashipa.refine import refine


def frame_bond_error(frames, moltype):
    """Median |bond - ideal| (nm) over the bonds inside each residue's frame atoms."""
    errors = [np.abs(np.linalg.norm(frames[:, i] - frames[:, j], axis=1) - d)
              for i, j, d in ideal_geometry.FRAME_BONDS[moltype] if (i, j) != (0, 2)]
    return float(np.median(np.concatenate(errors)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protein-length", type=int, default=40)
    parser.add_argument("--rna-length", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--platform", default=None, help="CUDA, CPU or Reference (default: fastest available)")
    parser.add_argument("--out", default="refine-demo")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for moltype, length in (("protein", args.protein_length), ("rna", args.rna_length)):
        backbone = generate(moltype, length, 1, seed=args.seed)[0]
        backbone.write(os.path.join(args.out, "generated_%s.pdb" % moltype))
        backbone.write(os.path.join(args.out, "generated_%s.cif" % moltype))
        refined = refine(backbone, out=os.path.join(args.out, "refined_%s.pdb" % moltype), platform=args.platform,
                         minimizeIterations=300, protocol="md", steps=500, seed=args.seed)
        atoms = ideal_geometry.FRAME_ATOMS[moltype]
        xyz = np.asarray(refined.positions.value_in_unit(unit.nanometer))
        index = {(a.residue.index, a.name): a.index for a in refined.topology.atoms()}
        frames = np.array([[xyz[index[(r.index, n)]] for n in atoms] for r in refined.topology.residues()
                           if all((r.index, n) in index for n in atoms)])
        print("%s: %d residues, %s level; median frame-bond error %.4f nm generated -> %.4f nm refined; "
              "energy %.0f -> %.0f kJ/mol" % (moltype, length, refined.level, frame_bond_error(backbone.frames, moltype),
                                              frame_bond_error(frames, moltype), refined.energies["start"],
                                              refined.energies["final"]))
    print("structures in %s/" % args.out)


if __name__ == "__main__":
    main()
