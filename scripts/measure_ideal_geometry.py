#!/usr/bin/env python
"""Measure the ideal backbone geometry the Python helpers use, from the training split of the data set.

Writes wrappers/python/openmmflashipa/ideal_geometry.py (a generated module of constants):
- bond lengths and 1-3 distances inside each residue's frame atoms (protein N-CA, CA-C, N..C; RNA C3'-C4',
  C4'-O4', C3'..O4') and the links between consecutive residues (protein C(i)-N(i+1); RNA C4'(i)..C4'(i+1),
  which spans six bonds and is used only as an upper bound);
- the local coordinates, in the residue's own frame (FrameBuilder's: origin at atom b, e1 along c - b, e2 in
  the a-b-c plane towards a), of the backbone atoms that generation places from a frame: protein O and OXT;
  RNA P, OP1, OP2, O5', C5', C2', O2', C1', O3';
- protein only: the trans peptide bond's 1-3 distances CA(i)..N(i+1) and C(i)..CA(i+1) and its 1-4 distance
  CA(i)..CA(i+1) (medians over linked pairs with CA..CA above 0.34 nm, i.e. not cis);

Each value is the median over the train-split chains in data/manifest.tsv (validation chains are not read),
so that the evaluation on the validation split never sees its own geometry. Alternate locations: the first.

    .venv/bin/python scripts/measure_ideal_geometry.py [--data ../shared/data] [--max-files 400]
"""

import argparse
import csv
import datetime
import os
import sys

import gemmi
import numpy as np

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
OUT = os.path.join(ROOT, "wrappers", "python", "openmmflashipa", "ideal_geometry.py")
FRAME = {"protein": ("N", "CA", "C"), "rna": ("C3'", "C4'", "O4'")}
# Protein O is not placed from medians: it lies in the peptide plane, which turns with psi about the
# frame's e1 axis, so generation builds it from C(i), CA(i) and N(i+1) (OXT likewise, at the C terminus).
PLACED = {"protein": ("O",), "rna": ("P", "OP1", "OP2", "O5'", "C5'", "C2'", "O2'", "C1'", "O3'")}
LINK = {"protein": (("C", "N"), "C(i)-N(i+1)"), "rna": (("C4'", "C4'"), "C4'(i)-C4'(i+1)")}
PEPTIDE = (("CA", "N"), ("C", "CA"), ("CA", "CA"))  # protein: atom of residue i, atom of residue i + 1
CIS_CA_CA = 0.34  # nm: a cis peptide's CA..CA is about 0.29, a trans one's 0.38


def local_frame(a, b, c):
    e1 = (c - b) / np.linalg.norm(c - b)
    u = a - b
    e2 = u - np.dot(e1, u) * e1
    e2 /= np.linalg.norm(e2)
    return np.stack([e1, e2, np.cross(e1, e2)], 1), b


def residue_atoms(residue):
    atoms = {}
    for atom in residue:
        name = atom.name.replace("*", "'")
        if name == "O1P":
            name = "OP1"
        if name == "O2P":
            name = "OP2"
        if name not in atoms:
            atoms[name] = np.array([atom.pos.x, atom.pos.y, atom.pos.z]) / 10.0
    return atoms


def measure(path, moltype, sums):
    structure = gemmi.read_structure(path)
    a_name, b_name, c_name = FRAME[moltype]
    (link_a, link_b), _ = LINK[moltype]
    for chain in structure[0]:
        previous = None
        for residue in chain:
            atoms = residue_atoms(residue)
            if not all(n in atoms for n in FRAME[moltype]):
                previous = None
                continue
            a, b, c = atoms[a_name], atoms[b_name], atoms[c_name]
            sums["bond_ab"].append(np.linalg.norm(a - b))
            sums["bond_bc"].append(np.linalg.norm(c - b))
            sums["dist_ac"].append(np.linalg.norm(c - a))
            rotation, origin = local_frame(a, b, c)
            for name in PLACED[moltype]:
                if name in atoms:
                    sums["local:" + name].append((atoms[name] - origin) @ rotation)
            if moltype == "protein" and "O" in atoms:
                sums["bond_co"].append(np.linalg.norm(atoms["O"] - c))
            if moltype == "protein" and "OXT" in atoms:
                sums["local:OXT"].append((atoms["OXT"] - origin) @ rotation)
            if previous is not None and link_a in previous and link_b in atoms:
                length = np.linalg.norm(atoms[link_b] - previous[link_a])
                if length < (0.2 if moltype == "protein" else 0.9):  # a chain break is not a link
                    sums["link"].append(length)
                    if moltype == "protein" and np.linalg.norm(atoms["CA"] - previous["CA"]) > CIS_CA_CA:
                        for k, (x, y) in enumerate(PEPTIDE):
                            sums["peptide%d" % k].append(np.linalg.norm(atoms[y] - previous[x]))
            previous = atoms


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
    p.add_argument("--manifest", default=os.path.join(ROOT, "data", "manifest.tsv"))
    p.add_argument("--max-files", type=int, default=400, help="train files read per molecule type")
    p.add_argument("--out", default=OUT)
    args = p.parse_args(argv)
    with open(args.manifest) as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if r["split"] == "train"]
    result = {}
    for moltype in ("protein", "rna"):
        files = [r["file"] for r in rows if r["moltype"] == moltype][:args.max_files]
        sums = {"bond_ab": [], "bond_bc": [], "dist_ac": [], "link": [], "bond_co": [],
                "peptide0": [], "peptide1": [], "peptide2": []}
        for name in PLACED[moltype] + (("OXT",) if moltype == "protein" else ()):
            sums["local:" + name] = []
        for i, name in enumerate(files):
            measure(os.path.join(args.data, name), moltype, sums)
            if (i + 1) % 50 == 0 or i + 1 == len(files):
                print(f"{moltype}: {i + 1}/{len(files)} files", file=sys.stderr)
        result[moltype] = {
            "files": len(files),
            "residues": len(sums["bond_ab"]),
            "bond_ab": float(np.median(sums["bond_ab"])),
            "bond_bc": float(np.median(sums["bond_bc"])),
            "dist_ac": float(np.median(sums["dist_ac"])),
            "link": float(np.median(sums["link"])),
            "link_p99": float(np.percentile(sums["link"], 99)),
            "bond_co": float(np.median(sums["bond_co"])) if sums["bond_co"] else None,
            "peptide": [float(np.median(sums["peptide%d" % k])) for k in range(3)] if sums["peptide0"] else None,
            "local": {k[6:]: [round(float(x), 4) for x in np.median(np.array(v), 0)]
                      for k, v in sums.items() if k.startswith("local:") and v},
        }
    write(args.out, result, len(rows))


def write(path, result, train_rows):
    p, r = result["protein"], result["rna"]
    lines = [
        '"""Ideal backbone geometry (nm), measured from the training split.',
        "",
        "Generated by scripts/measure_ideal_geometry.py on %s from %d protein and %d RNA train-split files"
        % (datetime.date.today().isoformat(), p["files"], r["files"]),
        "(%d and %d residues); medians. Do not edit by hand: rerun the script." % (p["residues"], r["residues"]),
        "",
        "FRAME_BONDS[moltype]: (frame atom i, frame atom j, length) inside one residue, frame atoms in the",
        "order the force uses (protein N, CA, C; RNA C3', C4', O4'), including the 1-3 distance that fixes the",
        "angle. LINK[moltype]: (atom of residue i, atom of residue i+1, median length, 99th percentile).",
        "LOCAL[moltype][name]: coordinates in the residue frame (origin atom b; e1 along c - b; e2 in the",
        "a-b-c plane towards a). PEPTIDE: (frame atom of residue i, frame atom of residue i + 1, length)",
        "across a trans protein peptide bond.",
        '"""',
        "",
        "FRAME_ATOMS = {'protein': ('N', 'CA', 'C'), 'rna': (\"C3'\", \"C4'\", \"O4'\")}",
        "FRAME_BONDS = {",
    ]
    for moltype, m in result.items():
        lines.append("    %r: ((0, 1, %.4f), (1, 2, %.4f), (0, 2, %.4f))," % (moltype, m["bond_ab"], m["bond_bc"],
                                                                            m["dist_ac"]))
    lines += ["}", "LINK = {"]
    for moltype, m in result.items():
        (a, b), _ = LINK[moltype]
        lines.append("    %r: (%r, %r, %.4f, %.4f)," % (moltype, a, b, m["link"], m["link_p99"]))
    frame = FRAME["protein"]
    peptide = ", ".join("(%d, %d, %.4f)" % (frame.index(x), frame.index(y), v) for (x, y), v in zip(PEPTIDE, p["peptide"]))
    lines += ["}", "PEPTIDE = (%s)" % peptide,
              "CARBONYL_BOND = %.4f  # protein C=O; O bisects the CA-C-N(i+1) exterior angle" % p["bond_co"],
              "LOCAL = {"]
    for moltype, m in result.items():
        lines.append("    %r: {" % moltype)
        for name, xyz in m["local"].items():
            lines.append("        %r: (%.4f, %.4f, %.4f)," % (name, *xyz))
        lines.append("    },")
    lines += ["}", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print("wrote", os.path.relpath(path, ROOT), file=sys.stderr)


if __name__ == "__main__":
    main()
