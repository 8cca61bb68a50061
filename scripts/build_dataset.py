#!/usr/bin/env python3
"""Build the FlashIPA training set (frame atoms of protein and RNA chains) as one safetensors file.

Input: a data folder with manifest.tsv (file, moltype, source, structure, chain, ...) and the gzipped mmCIF
files it lists, one chain per file (default: ../shared/data relative to the repository root). Output: a
safetensors file (default build/dataset/flashipa-dataset.safetensors) plus data/manifest.tsv (one row per
kept chain). The train/validation split by structure id is fixed in data/split.tsv; --resplit regenerates it.
See data/README.md for the rules and the format. The same inputs always give the same bytes.

    .venv/bin/python scripts/build_dataset.py [--data DIR] [--out FILE] [--limit N | --files F ...]
"""

import argparse
import csv
import hashlib
import json
import math
import os
import struct
import sys
import time

import gemmi
import numpy as np

from openmmflashipa import ResidueType
from openmmflashipa.checksums import fileSha256
from openmmflashipa.topology import C4_BREAK, LINK_BREAK

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data")
DEFAULT_OUT = os.path.join(ROOT, "build", "dataset", "flashipa-dataset.safetensors")
DEFAULT_SPLIT = os.path.join(ROOT, "data", "split.tsv")
DEFAULT_MANIFEST_OUT = os.path.join(ROOT, "data", "manifest.tsv")

FORMAT = "openmm-flashipa-dataset"
VERSION = "1"

# The residue vocabulary and its accepted variants are the plugin's (ResidueTypes.cpp, through the package):
# 0-19 amino acids (alphabetical three-letter names), 20 unknown amino acid, 21-24 A C G U, 25 unknown
# nucleotide. Names the plugin does not know go through gemmi's table of modified residues below.
AMINO_ACIDS = tuple(ResidueType.name(i) for i in range(ResidueType.NumAminoAcids))
NUCLEOTIDES = tuple(ResidueType.name(i) for i in range(ResidueType.FirstNucleotide, ResidueType.UnknownNucleotide))
UNKNOWN_AMINO_ACID = ResidueType.UnknownAminoAcid
FIRST_NUCLEOTIDE = ResidueType.FirstNucleotide
UNKNOWN_NUCLEOTIDE = ResidueType.UnknownNucleotide
# gemmi names a modified residue's parent by its one-letter code; the standard codes, from gemmi's own table.
ONE_LETTER_AA = {gemmi.find_tabulated_residue(name).one_letter_code.upper(): name for name in AMINO_ACIDS}

PROTEIN_FRAME = ("N", "CA", "C")
RNA_FRAME = ("C3'", "C4'", "O4'")
# Older files name the phosphate oxygens O1P/O2P; only P and O3' matter for the break test.
RNA_NAME_ALIASES = {"O1P": "OP1", "O2P": "OP2"}

# Chain breaks: the package's rule (openmmflashipa.topology: LINK_BREAK, C4_BREAK), here in Angstrom.
PROTEIN_BREAK_A = 10.0 * LINK_BREAK    # C(i)-N(i+1)
RNA_BREAK_A = 10.0 * LINK_BREAK        # O3'(i)-P(i+1)
RNA_C4_BREAK_A = 10.0 * C4_BREAK       # C4'(i)-C4'(i+1) when O3' or P is missing
MIN_SEGMENT = 3
VAL_FRACTION = 0.10
FORCED_TRAIN_RNA = 3         # structures of the largest RNA chains (the ribosomal RNAs) stay in train
MIN_VAL_RNA = 15


def residue_type(name, is_rna):
    """Vocabulary index of a residue name (standard, alias, or modified residue via gemmi's table)."""
    upper = name.strip().upper()
    known = ResidueType.fromName(upper)
    if is_rna:
        if FIRST_NUCLEOTIDE <= known < UNKNOWN_NUCLEOTIDE:
            return known
        info = gemmi.find_tabulated_residue(upper)
        # gemmi's table gives a modified residue the lower-case one-letter code of its parent (PSU -> 'u');
        # DNA residues and anything else are the unknown nucleotide.
        if info is not None and info.found() and info.kind == gemmi.ResidueKind.RNA:
            code = info.one_letter_code
            if code.islower() and code.upper() in NUCLEOTIDES:
                return ResidueType.fromName(code.upper())
        return UNKNOWN_NUCLEOTIDE
    if 0 <= known < UNKNOWN_AMINO_ACID:
        return known
    info = gemmi.find_tabulated_residue(upper)
    if info is not None and info.found() and info.is_amino_acid():
        code = info.one_letter_code
        if code.islower() and code.upper() in ONE_LETTER_AA:
            return ResidueType.fromName(ONE_LETTER_AA[code.upper()])
    return UNKNOWN_AMINO_ACID


def pick_atoms(residue, is_rna):
    """{atom name: position in Angstrom (tuple)} of one residue: hydrogens ignored; of alternate locations the
    conformer with the highest occupancy (first one on ties), atoms without altloc always kept."""
    heavy = [atom for atom in residue if not atom.is_hydrogen()]
    occupancy, order = {}, []
    for atom in heavy:
        if atom.altloc != "\0":
            if atom.altloc not in occupancy:
                occupancy[atom.altloc] = []
                order.append(atom.altloc)
            occupancy[atom.altloc].append(atom.occ)
    chosen = None
    if order:
        best = -1.0
        for altloc in order:
            mean = sum(occupancy[altloc]) / len(occupancy[altloc])
            if mean > best:
                best, chosen = mean, altloc
    atoms, rank = {}, {}
    for atom in heavy:
        name = atom.name
        if is_rna:
            name = RNA_NAME_ALIASES.get(name, name).replace("*", "'")
        # 0: no altloc, 1: the chosen conformer, 2: any other conformer (only when neither of the first has it)
        r = 0 if atom.altloc == "\0" else (1 if atom.altloc == chosen else 2)
        if name not in atoms or r < rank[name]:
            atoms[name] = (atom.pos.x, atom.pos.y, atom.pos.z)
            rank[name] = r
    return atoms


def distance(a, b):
    return math.sqrt((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 + (a[2] - b[2]) ** 2)


def is_break(prev, cur, is_rna):
    """True when the chain is broken between two consecutive kept residues (atoms dicts, Angstrom)."""
    if not is_rna:
        return distance(prev["C"], cur["N"]) > PROTEIN_BREAK_A
    if "O3'" in prev and "P" in cur:
        return distance(prev["O3'"], cur["P"]) > RNA_BREAK_A
    return distance(prev["C4'"], cur["C4'"]) > RNA_C4_BREAK_A


def read_chain(path, is_rna):
    """Segments of the first model's first chain: list of lists of (type, atoms dict). Also returns the
    number of residues with all frame atoms and the number dropped for missing frame atoms and for short
    segments."""
    structure = gemmi.read_structure(path)
    if len(structure) == 0 or len(structure[0]) == 0:
        return None, 0, 0, 0
    chain = structure[0][0]
    frame = RNA_FRAME if is_rna else PROTEIN_FRAME
    segments, current, previous = [], [], None
    missing = 0
    for residue in chain.first_conformer():
        atoms = pick_atoms(residue, is_rna)
        if not all(name in atoms for name in frame):
            if any(name in atoms for name in frame) or residue_has_polymer_name(residue.name, is_rna):
                missing += 1
            if current:
                segments.append(current)
            current, previous = [], None
            continue
        if previous is not None and is_break(previous, atoms, is_rna):
            segments.append(current)
            current = []
        current.append((residue_type(residue.name, is_rna), atoms))
        previous = atoms
    if current:
        segments.append(current)
    complete = sum(len(s) for s in segments)
    short = sum(len(s) for s in segments if len(s) < MIN_SEGMENT)
    return [s for s in segments if len(s) >= MIN_SEGMENT], complete, missing, short


def residue_has_polymer_name(name, is_rna):
    """Whether a residue without frame atoms counts as a dropped polymer residue (waters and ions do not)."""
    info = gemmi.find_tabulated_residue(name)
    if info is None or not info.found():
        return False
    return info.is_nucleic_acid() if is_rna else info.is_amino_acid()


def split_hash(structure):
    """Deterministic number in [0, 1) for a structure id."""
    return int(hashlib.sha256(structure.encode("utf-8")).hexdigest()[:16], 16) / float(1 << 64)


def make_split(all_structures, chains, min_val_rna):
    """structure id -> 'train' | 'val' (see data/README.md)."""
    split = {s: ("val" if split_hash(s) < VAL_FRACTION else "train") for s in all_structures}
    rna = [c for c in chains if c["is_rna"]]
    largest = sorted(rna, key=lambda c: (-c["residues"], c["index"]))[:FORCED_TRAIN_RNA]
    forced = {c["structure"] for c in largest}
    for s in forced:
        split[s] = "train"
    rna_val = sum(1 for c in rna if split[c["structure"]] == "val")
    candidates = sorted({c["structure"] for c in rna if split[c["structure"]] == "train"} - forced,
                        key=lambda s: (split_hash(s), s))
    for s in candidates:
        if rna_val >= min_val_rna:
            break
        split[s] = "val"
        rna_val += sum(1 for c in rna if c["structure"] == s)
    return split


def read_split(path):
    split = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if row["split"] not in ("train", "val"):
                raise SystemExit(f"{path}: bad split {row['split']!r} for {row['structure']!r}")
            split[row["structure"]] = row["split"]
    return split


def write_split(path, split):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        f.write("structure\tsplit\n")
        for s in sorted(split):
            f.write(f"{s}\t{split[s]}\n")


DTYPES = {np.dtype("<f4"): "F32", np.dtype("<i8"): "I64", np.dtype("uint8"): "U8"}


def write_safetensors(path, tensors, metadata):
    """Minimal safetensors writer: u64 LE header size, JSON header (space-padded to a multiple of 8), then
    the tensors' little-endian bytes back to back. Tensors are laid out in decreasing element size so
    every tensor starts aligned to its element size; the header lists them in that order."""
    names = sorted(tensors, key=lambda n: (-tensors[n].dtype.itemsize, list(tensors).index(n)))
    header = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
    blobs, offset = [], 0
    for name in names:
        array = np.ascontiguousarray(tensors[name])
        dtype = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
        array = array.astype(dtype, copy=False)
        data = array.tobytes()
        header[name] = {"dtype": DTYPES[np.dtype(dtype)], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    text += b" " * (-len(text) % 8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for data in blobs:
            f.write(data)
    os.replace(tmp, path)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="data folder with manifest.tsv (default ../shared/data)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output safetensors file")
    p.add_argument("--split", default=None, help="split file (default data/split.tsv)")
    p.add_argument("--resplit", action="store_true", help="regenerate the split file instead of reading it")
    p.add_argument("--min-val-rna", type=int, default=MIN_VAL_RNA,
                   help="with --resplit: move RNA structures to val until this many RNA chains are there")
    p.add_argument("--manifest-out", default=None,
                   help="per-chain manifest to write (default: data/manifest.tsv for a full build of the default "
                        "data folder, none otherwise)")
    subset = p.add_mutually_exclusive_group()
    subset.add_argument("--limit", type=int, default=None, help="only the first N rows of the manifest")
    subset.add_argument("--files", nargs="+", default=None, help="only these manifest files (paths as listed)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    # The committed data/split.tsv and data/manifest.tsv are only ever written by a full build of the
    # default data folder; subsets and other folders need explicit --split (to resplit) and --manifest-out.
    full_default = (args.limit is None and args.files is None
                    and os.path.realpath(args.data) == os.path.realpath(DEFAULT_DATA))
    split_path = args.split or DEFAULT_SPLIT
    if args.resplit and not full_default and args.split is None:
        raise SystemExit("--resplit on a subset or another data folder would overwrite data/split.tsv: "
                         "pass --split explicitly")
    manifest_out = args.manifest_out or (DEFAULT_MANIFEST_OUT if full_default else None)

    manifest_path = os.path.join(args.data, "manifest.tsv")
    with open(manifest_path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    all_structures = sorted({r["structure"] for r in rows})
    if args.limit is not None:
        rows = rows[:args.limit]
    if args.files is not None:
        wanted = set(args.files)
        unknown = wanted - {r["file"] for r in rows}
        if unknown:
            raise SystemExit(f"not in {manifest_path}: {sorted(unknown)}")
        rows = [r for r in rows if r["file"] in wanted]

    chains, seen = [], set()
    empty, duplicates, fewer, missing_total, short_total = [], [], [], 0, 0
    files_digest = hashlib.sha256()
    for row in rows:
        if row["moltype"] not in ("protein", "rna"):
            raise SystemExit(f"{row['file']}: unknown moltype {row['moltype']!r}")
        is_rna = row["moltype"] == "rna"
        path = os.path.join(args.data, row["file"])
        files_digest.update(row["file"].encode() + b"\0" + fileSha256(path).encode() + b"\n")
        segments, complete, missing, short = read_chain(path, is_rna)
        claimed = row.get("residues_with_frame_atoms", "")
        if claimed.isdigit() and complete < int(claimed):
            fewer.append((row["file"], complete, int(claimed)))
        if not segments:
            empty.append(row["file"])
            continue
        types = tuple(t for s in segments for t, _ in s)
        key = (row["structure"], types)
        if key in seen:
            duplicates.append(row["file"])
            continue
        seen.add(key)
        missing_total += missing
        short_total += short
        chains.append({"index": len(chains), "file": row["file"], "moltype": row["moltype"], "is_rna": is_rna,
                       "source": row["source"], "structure": row["structure"], "chain": row["chain"],
                       "segments": segments, "residues": len(types)})

    if args.resplit or (not os.path.exists(split_path) and (full_default or args.split is not None)):
        split = make_split(all_structures, chains, args.min_val_rna)
        write_split(split_path, split)
    else:
        if not os.path.exists(split_path):
            raise SystemExit(f"no split file {split_path} (pass --split, with --resplit to create one)")
        split = read_split(split_path)
        missing_ids = sorted({c["structure"] for c in chains} - set(split))
        if missing_ids:
            raise SystemExit(f"{split_path} has no entry for {len(missing_ids)} structure(s): "
                             f"{missing_ids[:10]} (rebuild it with --resplit)")

    n = sum(c["residues"] for c in chains)
    atoms = np.full((n, 3, 3), np.nan, dtype=np.float64)
    oxygen = np.full((n, 3), np.nan, dtype=np.float64)
    types = np.zeros(n, dtype="<i8")
    segment = np.zeros(n, dtype="<i8")
    offsets = np.zeros(len(chains) + 1, dtype="<i8")
    is_rna = np.zeros(len(chains), dtype=np.uint8)
    split_flag = np.zeros(len(chains), dtype=np.uint8)
    i = 0
    for c, chain in enumerate(chains):
        frame = RNA_FRAME if chain["is_rna"] else PROTEIN_FRAME
        for s, seg in enumerate(chain["segments"]):
            for t, res in seg:
                atoms[i] = [res[name] for name in frame]
                if not chain["is_rna"] and "O" in res:
                    oxygen[i] = res["O"]
                types[i] = t
                segment[i] = s
                i += 1
        offsets[c + 1] = i
        is_rna[c] = chain["is_rna"]
        split_flag[c] = split[chain["structure"]] == "val"
    atoms = (atoms / 10.0).astype("<f4")   # Angstrom -> nm
    oxygen = (oxygen / 10.0).astype("<f4")

    summary = {}
    for chain in chains:
        key = f"{chain['moltype']}/{split[chain['structure']]}"
        entry = summary.setdefault(key, {"chains": 0, "residues": 0, "segments": 0})
        entry["chains"] += 1
        entry["residues"] += chain["residues"]
        entry["segments"] += len(chain["segments"])
    counts = {"chains": len(chains), "residues": int(n), "segments": sum(len(c["segments"]) for c in chains),
              "by_type_and_split": {k: summary[k] for k in sorted(summary)},
              "files_read": len(rows), "files_without_residues": len(empty), "duplicate_chains": len(duplicates),
              "residues_missing_frame_atoms": missing_total, "residues_in_short_segments": short_total,
              "files_with_fewer_residues_than_source_manifest": len(fewer),
              "residues_short_of_source_manifest": sum(b - a for _, a, b in fewer)}
    metadata = {
        "format": FORMAT, "version": VERSION, "units": "nm",
        "source_manifest_sha256": fileSha256(manifest_path),
        "source_files_sha256": files_digest.hexdigest(),
        "split_sha256": hashlib.sha256("".join(f"{s}\t{split[s]}\n" for s in sorted(split)).encode()).hexdigest(),
        "frame_atoms": "protein N,CA,C; rna C3',C4',O4'",
        "residue_types": ",".join(AMINO_ACIDS) + ",UNK," + ",".join(NUCLEOTIDES) + ",N",
        "counts": json.dumps(counts, separators=(",", ":"), sort_keys=True),
    }
    tensors = {"atoms": atoms, "types": types, "segment": segment, "chain_offsets": offsets,
               "is_rna": is_rna, "split": split_flag, "protein_O": oxygen}
    write_safetensors(args.out, tensors, metadata)

    if manifest_out:
        os.makedirs(os.path.dirname(os.path.abspath(manifest_out)), exist_ok=True)
        with open(manifest_out, "w", newline="") as f:
            f.write("index\tfile\tmoltype\tsource\tstructure\tchain\tresidues\tsegments\tsplit\n")
            for chain in chains:
                f.write(f"{chain['index']}\t{chain['file']}\t{chain['moltype']}\t{chain['source']}\t"
                        f"{chain['structure']}\t{chain['chain']}\t{chain['residues']}\t{len(chain['segments'])}\t"
                        f"{split[chain['structure']]}\n")

    if not args.quiet:
        print(f"{'type/split':<14}{'chains':>8}{'residues':>10}{'segments':>10}")
        for k in sorted(summary):
            e = summary[k]
            print(f"{k:<14}{e['chains']:>8}{e['residues']:>10}{e['segments']:>10}")
        print(f"{'total':<14}{counts['chains']:>8}{counts['residues']:>10}{counts['segments']:>10}")
        print(f"files read {len(rows)}; without usable residues {len(empty)}; duplicate chains dropped "
              f"{len(duplicates)}; residues dropped: missing frame atoms {missing_total}, in segments < "
              f"{MIN_SEGMENT} residues {short_total}")
        if fewer:
            print(f"{len(fewer)} file(s) hold fewer residues with frame atoms than the source manifest says "
                  f"({sum(a for _, a, _ in fewer)} instead of {sum(b for _, _, b in fewer)}; truncated files?), "
                  f"largest shortfalls:")
            for name, a, b in sorted(fewer, key=lambda x: (x[1] - x[2], x[0]))[:10]:
                print(f"  {name}: {a} of {b}")
        for name in empty:
            print(f"  no usable residues: {name}")
        for name in duplicates:
            print(f"  duplicate: {name}")
        print(f"wrote {os.path.relpath(args.out)} ({os.path.getsize(args.out)} bytes, sha256 "
              f"{fileSha256(args.out)}) in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
