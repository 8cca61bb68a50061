"""Tests of scripts/build_dataset.py (the training-set builder). Oracles: the structures read with gemmi here,
the documented residue vocabulary, small structures with known breaks written by the test itself, and the
safetensors layout parsed by hand. Fast (a few small files); the tests on real files are skipped where the
shared data folder (../shared/data from the repository root) is absent."""

import csv
import hashlib
import json
import os
import struct
import subprocess
import sys

import gemmi
import numpy as np
import safetensors
import pytest

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
BUILDER = os.path.join(ROOT, "scripts", "build_dataset.py")
SHARED = os.path.join(ROOT, "..", "shared", "data")
SPLIT = os.path.join(ROOT, "data", "split.tsv")
MANIFEST = os.path.join(ROOT, "data", "manifest.tsv")
needs_shared = pytest.mark.skipif(not os.path.exists(os.path.join(SHARED, "manifest.tsv")),
                                  reason="shared data folder not present")

AMINO_ACIDS = ["ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE",
               "LEU", "LYS", "MET", "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL"]
VOCAB = {name: i for i, name in enumerate(AMINO_ACIDS)}
VOCAB.update({"A": 21, "C": 22, "G": 23, "U": 24})
PROTEIN_FRAME = ("N", "CA", "C")
RNA_FRAME = ("C3'", "C4'", "O4'")
DTYPE = {"F32": np.dtype("<f4"), "I64": np.dtype("<i8"), "U8": np.dtype("u1")}
# Real files with known traits: two antibody-like chains merged under one id (BM5), alternate locations and
# a microheterogeneous residue (crambin), modified nucleotides and a chain break (tRNA).
REAL = ["protein/BM5-clean_1BGX_A.cif.gz", "protein/PDownB_1EJG_A.cif.gz",
        "rna/rsRNASP_1YFG_A.cif.gz"]


def run_builder(*args, check=True):
    result = subprocess.run([sys.executable, BUILDER, "--quiet", *args], capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_safetensors(path):
    """Parse the file by hand, checking the layout on the way: (tensors, metadata)."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    assert n % 8 == 0
    text = blob[8:8 + n]
    header = json.loads(text.decode("utf-8"))
    assert text.rstrip(b" ") + b" " * (n - len(text.rstrip(b" "))) == text  # padding is spaces only
    metadata = header.pop("__metadata__")
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    base, end, tensors = 8 + n, 0, {}
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        start, stop = info["data_offsets"]
        dtype = DTYPE[info["dtype"]]
        assert start == end, "tensors must be contiguous"
        assert start % dtype.itemsize == 0, "tensor not aligned to its element size"
        assert stop - start == dtype.itemsize * int(np.prod(info["shape"], dtype=np.int64))
        tensors[name] = np.frombuffer(blob[base + start:base + stop], dtype=dtype).reshape(info["shape"])
        end = stop
    assert base + end == len(blob), "data must end the file"
    # The format's own library reads the same (the writer is the project's; docs/DESIGN-DECISIONS.md says why).
    with safetensors.safe_open(path, framework="np") as f:
        assert f.metadata() == metadata and sorted(f.keys()) == sorted(tensors)
        for name in f.keys():
            np.testing.assert_array_equal(f.get_tensor(name), tensors[name], err_msg=name)  # NaN equals NaN
    return tensors, metadata


def chain_slices(t):
    offsets = t["chain_offsets"]
    return [slice(int(offsets[c]), int(offsets[c + 1])) for c in range(len(offsets) - 1)]


def check_invariants(t):
    n, c = t["types"].shape[0], t["is_rna"].shape[0]
    assert t["atoms"].shape == (n, 3, 3) and t["protein_O"].shape == (n, 3) and t["segment"].shape == (n,)
    assert t["chain_offsets"].shape == (c + 1,) and t["split"].shape == (c,)
    assert t["chain_offsets"][0] == 0 and t["chain_offsets"][-1] == n and np.all(np.diff(t["chain_offsets"]) > 0)
    assert np.all(np.isfinite(t["atoms"]))
    for ci, s in enumerate(chain_slices(t)):
        seg, types = t["segment"][s], t["types"][s]
        assert seg[0] == 0 and np.all(np.isin(np.diff(seg), (0, 1)))
        assert np.bincount(seg).min() >= 3
        if t["is_rna"][ci]:
            assert np.all((types >= 21) & (types <= 25)) and np.all(np.isnan(t["protein_O"][s]))
        else:
            assert np.all((types >= 0) & (types <= 20))


def oracle_chain(path, is_rna):
    """Independent reading: residues in file order (first of a microheterogeneous group), per atom name the
    highest-occupancy copy; the residues with all frame atoms, their coordinates in nm, and for each one
    whether a new segment starts there (after a dropped residue or across a gap)."""
    frame = RNA_FRAME if is_rna else PROTEIN_FRAME
    chain = gemmi.read_structure(path)[0][0]
    residues, last_seqid = [], None
    for residue in chain:
        if residue.seqid == last_seqid:
            continue
        last_seqid = residue.seqid
        best = {}
        for atom in residue:
            if atom.name not in best or atom.occ > best[atom.name].occ:
                best[atom.name] = atom
        residues.append((residue.name, {k: np.array(a.pos.tolist()) for k, a in best.items()}))
    kept, starts, previous = [], [], None
    for name, atoms in residues:
        if not all(f in atoms for f in frame):
            previous = None
            continue
        if previous is None:
            start = True
        elif is_rna:
            start = (np.linalg.norm(previous["O3'"] - atoms["P"]) > 2.0 if "O3'" in previous and "P" in atoms
                     else np.linalg.norm(previous["C4'"] - atoms["C4'"]) > 8.0)
        else:
            start = np.linalg.norm(previous["C"] - atoms["N"]) > 2.0
        kept.append((name, np.stack([atoms[f] for f in frame]) / 10.0, atoms.get("O")))
        starts.append(start)
        previous = atoms
    return kept, starts


# ---- synthetic structures with known breaks ---------------------------------------------------------------

def add_atom(residue, name, element, pos, altloc="\0", occ=1.0):
    atom = gemmi.Atom()
    atom.name, atom.element, atom.pos, atom.altloc, atom.occ = name, gemmi.Element(element), gemmi.Position(*pos), altloc, occ
    residue.add_atom(atom)


def write_structure(path, chain_id, residues):
    """residues: list of (name, [(atom name, element, (x, y, z), altloc, occ), ...])."""
    structure = gemmi.Structure()
    structure.name = "synthetic"
    model = gemmi.Model(1)
    chain = gemmi.Chain(chain_id)
    for i, (name, atoms) in enumerate(residues):
        residue = gemmi.Residue()
        residue.name, residue.seqid = name, gemmi.SeqId(i + 1, " ")
        residue.het_flag = "H" if name == "HOH" else "A"
        for atom in atoms:
            add_atom(residue, *atom)
        chain.add_residue(residue)
    model.add_chain(chain)
    structure.add_model(model)
    structure.setup_entities()
    structure.make_mmcif_document().write_file(path)


def protein_residue(name, x, y, skip=(), ca_alt=None):
    t = np.array([x, y, 0.0])
    atoms = [("N", "N", tuple(t), "\0", 1.0)]
    if "CA" not in skip:
        if ca_alt is None:
            atoms.append(("CA", "C", tuple(t + [1.2, 0.8, 0.0]), "\0", 1.0))
        else:  # two conformers of CA: A (occupancy 0.3) and B (0.7), B 0.5 A away
            atoms.append(("CA", "C", tuple(t + [1.2, 0.8, 0.0]), "A", 0.3))
            atoms.append(("CA", "C", tuple(t + [1.2, 0.8, 0.5]), "B", 0.7))
    atoms += [("C", "C", tuple(t + [2.47, 0.0, 0.0]), "\0", 1.0), ("O", "O", tuple(t + [2.9, 1.1, 0.0]), "\0", 1.0),
              ("H", "H", tuple(t + [-0.5, -0.8, 0.0]), "\0", 1.0)]
    return name, atoms


def synthetic_protein():
    """15 residues, 3.8 A apart (C(i)-N(i+1) = 1.33 A) in pieces shifted 10 A apart. Expected segments:
    residues 1-4, 5-8 (gap before 5), 12-15 (residue 9 lacks CA; 10-11 are too short; gap before 12)."""
    names = ["ALA", "MSE", "SEP", "HIE", "GLY", "XYZ", "TRP", "LYS", "SER", "THR", "VAL", "ILE", "LEU", "PHE", "CYS"]
    residues = []
    for k, name in enumerate(names, start=1):
        y = 0.0 if k <= 4 else (10.0 if k <= 11 else 20.0)
        residues.append(protein_residue(name, 3.8 * k, y, skip=("CA",) if k == 9 else (), ca_alt=6 if k == 6 else None))
    residues.append(("HOH", [("O", "O", (0.0, 50.0, 0.0), "\0", 1.0)]))
    kept = [1, 2, 3, 4, 5, 6, 7, 8, 12, 13, 14, 15]
    types = [VOCAB["ALA"], VOCAB["MET"], VOCAB["SER"], VOCAB["HIS"], VOCAB["GLY"], 20, VOCAB["TRP"], VOCAB["LYS"],
             VOCAB["ILE"], VOCAB["LEU"], VOCAB["PHE"], VOCAB["CYS"]]
    segments = [0] * 4 + [1] * 4 + [2] * 4
    return residues, kept, types, segments


def rna_residue(name, x, p_offset=1.6, with_p=True):
    t = np.array([x, 0.0, 0.0])
    atoms = [("C3'", "C", tuple(t)), ("C4'", "C", tuple(t + [1.0, 1.1, 0.0])), ("O4'", "O", tuple(t + [2.0, 0.5, 0.0])),
             ("O3'", "O", tuple(t + [0.0, -1.4, 0.0]))]
    if with_p:  # P of this residue p_offset A from O3' of a residue 6 A before
        atoms.append(("P", "P", tuple(t + [-6.0 + p_offset, -1.4, 0.0])))
    return name, [(n, e, p, "\0", 1.0) for n, e, p in atoms]


def synthetic_rna():
    """Residues 6 A apart (O3'(i)-P(i+1) = 1.6 A). Residue 5's P is 3 A from O3'(4): a break although C4'-C4' is
    only 6 A. Residues 8 and 9 lack P: 8 follows at 6 A (no break), 9 at 12 A (a break)."""
    spec = [("A", 0, True), ("C", 6, True), ("PSU", 12, True), ("DA", 18, True),
            ("G", 24, "far"), ("U", 30, True), ("2MG", 36, True), ("A", 42, False), ("C", 54, False),
            ("G", 60, True), ("U", 66, True)]
    residues = [rna_residue(name, x, p_offset=3.0 if p == "far" else 1.6, with_p=bool(p)) for name, x, p in spec]
    types = [21, 22, 24, 25, 23, 24, 23, 21, 22, 23, 24]
    segments = [0] * 4 + [1] * 4 + [2] * 3
    return residues, types, segments


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A data folder with the two synthetic chains, a duplicate of the protein (same structure id: dropped)
    and a copy under another structure id (kept)."""
    folder = tmp_path_factory.mktemp("synthetic")
    os.makedirs(folder / "protein")
    os.makedirs(folder / "rna")
    protein, kept, ptypes, psegments = synthetic_protein()
    rna, rtypes, rsegments = synthetic_rna()
    write_structure(str(folder / "protein" / "gap.cif"), "A", protein)
    write_structure(str(folder / "protein" / "gap_copy.cif"), "A", protein)
    write_structure(str(folder / "rna" / "gap.cif"), "B", rna)
    rows = [("protein/gap.cif", "protein", "test", "SYNP", "A"), ("rna/gap.cif", "rna", "test", "SYNR", "B"),
            ("protein/gap_copy.cif", "protein", "test", "SYNP", "A"),
            ("protein/gap_copy.cif", "protein", "test", "SYNQ", "A")]
    with open(folder / "manifest.tsv", "w") as f:
        f.write("file\tmoltype\tsource\tstructure\tchain\tresidues_with_frame_atoms\n")
        for row in rows:
            f.write("\t".join(row) + "\t0\n")
    out = folder / "out.safetensors"
    run_builder("--data", str(folder), "--out", str(out), "--split", str(folder / "split.tsv"), "--resplit",
                "--min-val-rna", "0", "--manifest-out", str(folder / "chains.tsv"))
    return {"folder": folder, "out": out, "protein": protein, "kept": kept, "ptypes": ptypes, "psegments": psegments,
            "rna": rna, "rtypes": rtypes, "rsegments": rsegments}


def test_synthetic_breaks_types_and_altlocs(synthetic):
    t, metadata = load_safetensors(synthetic["out"])
    check_invariants(t)
    assert metadata["format"] == "openmm-flashipa-dataset" and metadata["version"] == "1" and metadata["units"] == "nm"
    assert metadata["source_manifest_sha256"] == sha256(synthetic["folder"] / "manifest.tsv")
    with open(synthetic["folder"] / "chains.tsv") as f:
        chains = list(csv.DictReader(f, delimiter="\t"))
    assert [(c["file"], c["structure"]) for c in chains] == [
        ("protein/gap.cif", "SYNP"), ("rna/gap.cif", "SYNR"), ("protein/gap_copy.cif", "SYNQ")]
    assert list(t["is_rna"]) == [0, 1, 0]
    assert json.loads(metadata["counts"])["duplicate_chains"] == 1
    s = chain_slices(t)

    # protein: kept residues, segments, types; frame atoms in nm, the higher-occupancy CA, O
    assert list(t["segment"][s[0]]) == synthetic["psegments"]
    assert list(t["types"][s[0]]) == synthetic["ptypes"]
    atoms = {name: dict((a[0], a) for a in alist if a[3] in ("\0", "B")) for name, alist in
             [(k, synthetic["protein"][k - 1][1]) for k in synthetic["kept"]]}
    for row, k in enumerate(synthetic["kept"]):
        expected = np.array([atoms[k][n][2] for n in PROTEIN_FRAME]) / 10.0
        np.testing.assert_allclose(t["atoms"][s[0]][row], expected, atol=1e-6)
        np.testing.assert_allclose(t["protein_O"][s[0]][row], np.array(atoms[k]["O"][2]) / 10.0, atol=1e-6)
    assert t["atoms"][s[0]][5, 1, 2] == pytest.approx(0.05, abs=1e-6)  # conformer B of residue 6's CA

    # RNA: O3'-P break first, then the C4'-C4' fallback; modified and DNA residues
    assert list(t["segment"][s[1]]) == synthetic["rsegments"]
    assert list(t["types"][s[1]]) == synthetic["rtypes"]
    for row, (_, alist) in enumerate(synthetic["rna"]):
        pos = {a[0]: a[2] for a in alist}
        np.testing.assert_allclose(t["atoms"][s[1]][row], np.array([pos[n] for n in RNA_FRAME]) / 10.0, atol=1e-6)

    # the copy under another structure id is the same chain again
    np.testing.assert_array_equal(t["atoms"][s[2]], t["atoms"][s[0]])


def test_deterministic(synthetic, tmp_path):
    again = tmp_path / "again.safetensors"
    run_builder("--data", str(synthetic["folder"]), "--out", str(again), "--split", str(synthetic["folder"] / "split.tsv"),
                "--manifest-out", str(tmp_path / "chains.tsv"))
    assert sha256(again) == sha256(synthetic["out"])


def test_missing_split_entry_fails(synthetic, tmp_path):
    partial = tmp_path / "split.tsv"
    partial.write_text("structure\tsplit\nSYNP\ttrain\nSYNQ\tval\n")
    result = run_builder("--data", str(synthetic["folder"]), "--out", str(tmp_path / "x.safetensors"),
                         "--split", str(partial), "--manifest-out", str(tmp_path / "chains.tsv"), check=False)
    assert result.returncode != 0 and "SYNR" in result.stderr


@needs_shared
def test_real_files_against_gemmi(tmp_path):
    out = tmp_path / "real.safetensors"
    out2 = tmp_path / "real2.safetensors"
    chains_tsv = tmp_path / "chains.tsv"
    run_builder("--files", *REAL, "--out", str(out), "--manifest-out", str(chains_tsv))
    run_builder("--files", *REAL, "--out", str(out2), "--manifest-out", str(tmp_path / "chains2.tsv"))
    assert sha256(out) == sha256(out2)
    t, metadata = load_safetensors(out)
    check_invariants(t)
    assert metadata["source_manifest_sha256"] == sha256(os.path.join(SHARED, "manifest.tsv"))
    with open(SPLIT) as f:
        split = {r["structure"]: r["split"] for r in csv.DictReader(f, delimiter="\t")}
    with open(chains_tsv) as f:
        chains = list(csv.DictReader(f, delimiter="\t"))
    assert [c["file"] for c in chains] == REAL
    for ci, (s, chain) in enumerate(zip(chain_slices(t), chains)):
        is_rna = chain["moltype"] == "rna"
        kept, starts = oracle_chain(os.path.join(SHARED, chain["file"]), is_rna)
        assert t["split"][ci] == (split[chain["structure"]] == "val")
        assert s.stop - s.start == len(kept) == int(chain["residues"])
        assert list(np.flatnonzero(np.diff(t["segment"][s])) + 1) == [i for i, st in enumerate(starts) if st and i > 0]
        np.testing.assert_allclose(t["atoms"][s], np.stack([k[1] for k in kept]), atol=1e-6)
        for row, (name, _, oxygen) in enumerate(kept):
            if name in VOCAB:
                assert t["types"][s][row] == VOCAB[name]
            if not is_rna and oxygen is not None:
                np.testing.assert_allclose(t["protein_O"][s][row], oxygen / 10.0, atol=1e-6)
    bm5, crambin, trna = chains
    assert int(bm5["segments"]) == 2  # heavy and light chain merged under one id (C-N 5.3 nm apart) are split
    assert int(crambin["segments"]) == 1 and int(crambin["residues"]) == 46
    types = t["types"][chain_slices(t)[2]]
    names = [k[0] for k in oracle_chain(os.path.join(SHARED, trna["file"]), True)[0]]
    for name, parent in (("1MA", "A"), ("2MG", "G"), ("7MG", "G"), ("H2U", "U"), ("PSU", "U")):
        for row in [i for i, n in enumerate(names) if n == name]:
            assert types[row] == VOCAB[parent], name


@needs_shared
def test_committed_split_and_manifest():
    with open(SPLIT) as f:
        split = {r["structure"]: r["split"] for r in csv.DictReader(f, delimiter="\t")}
    with open(os.path.join(SHARED, "manifest.tsv")) as f:
        source = list(csv.DictReader(f, delimiter="\t"))
    assert {r["structure"] for r in source} <= set(split)
    with open(MANIFEST) as f:
        chains = list(csv.DictReader(f, delimiter="\t"))
    assert [int(c["index"]) for c in chains] == list(range(len(chains)))
    assert all(c["split"] == split[c["structure"]] for c in chains)
    rna = sorted((c for c in chains if c["moltype"] == "rna"), key=lambda c: -int(c["residues"]))
    assert all(c["split"] == "train" for c in rna[:3])    # the ribosomal RNAs
    assert sum(c["split"] == "val" for c in rna) >= 15
    val = sum(c["split"] == "val" for c in chains) / len(chains)
    assert 0.05 < val < 0.15
