"""refine() on real structures: the native OBC2 force, gaps that stay gaps, protocols, and refinement that brings
a perturbed native closer to itself (CPU; each test well under a minute on two cores).

Oracles: amber14's own implicit/obc2.xml CustomGBForce (energy and forces), distances and residue lists read from
the input files, and the native structure itself (RMSD by an independent Kabsch in numpy)."""

import io

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import pytest

import openmmflashipa
from openmmflashipa import refine as refine_module
from openmmflashipa.refine import allAtomSystem, refine
from openmmflashipa.structure import readStructure
from openmmflashipa.topology import selectFrameResidues

from flashipa_testutils import PROTEIN_PDB, RNA_PDB

NOISE = 0.1  # nm per coordinate, as in benchmarks/refinement_benchmark.py


def _kabsch_rmsd(x, y):
    x, y = x - x.mean(0), y - y.mean(0)
    u, _, vt = np.linalg.svd(x.T @ y)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    rotation = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return float(np.sqrt(np.mean(np.sum((x @ rotation.T - y) ** 2, axis=1))))


def _backbone(topology, positions):
    """{(chain id, residue id, atom name): xyz nm} of N, CA, C."""
    xyz = np.asarray(positions.value_in_unit(unit.nanometer))
    return {(a.residue.chain.id, a.residue.id, a.name): xyz[a.index] for a in topology.atoms()
            if a.name in ("N", "CA", "C")}


def _rmsd_to(native, topology, positions):
    mine = _backbone(topology, positions)
    keys = [k for k in native if k in mine]
    assert len(keys) == len(native)
    return _kabsch_rmsd(np.array([mine[k] for k in keys]), np.array([native[k] for k in keys]))


def _residues(topology):
    return [(r.chain.id, r.id, r.name) for r in topology.residues()]


def test_all_atom_preparation_is_reproducible():
    """The same input gives the same all-atom system and positions (PDBFixer's added atoms and Modeller's hydrogens,
    which start from Python's global random numbers): before this was seeded, the hydrogens of a perturbed protein
    moved by up to 0.23 nm between two calls, so two refinement routes started from different structures. The
    caller's random state is left as it was."""
    import random
    pdb = app.PDBFile(PROTEIN_PDB)
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.delete([a for a in modeller.topology.atoms() if a.element == app.element.hydrogen])
    xyz = np.asarray(modeller.positions.value_in_unit(unit.nanometer))
    noisy = unit.Quantity(xyz + np.random.default_rng(3).normal(0.0, NOISE, xyz.shape), unit.nanometer)
    random.seed(11)
    expected = [random.random() for _ in range(3)]
    random.seed(11)
    runs = [allAtomSystem(modeller.topology, noisy, withForce=False) for _ in range(2)]
    assert [random.random() for _ in range(3)] == expected
    first, second = (np.asarray(r[2].value_in_unit(unit.nanometer)) for r in runs)
    assert runs[0][1].getNumAtoms() == runs[1][1].getNumAtoms() > modeller.topology.getNumAtoms()  # hydrogens added
    assert np.array_equal(first, second)


def test_native_obc2_equals_amber14_obc2_xml():
    """refine's OBC2 is openmm.GBSAOBCForce with mbondi2 radii; amber14's implicit/obc2.xml is a CustomGBForce
    of the same model. Measured on this protein (955 atoms) on the Reference platform: energies 0.0009 kJ/mol
    apart (2e-7 relative, surface-area term included: both use 2.25936 kJ/mol/nm^2 and a 0.14 nm probe),
    forces at most 2e-4 kJ/mol/nm apart. Tolerances: 0.01 kJ/mol and 0.01 kJ/mol/nm."""
    pdb = app.PDBFile(PROTEIN_PDB)
    system, topology, positions = allAtomSystem(pdb.topology, pdb.positions, withForce=False)
    assert sum(isinstance(f, openmm.GBSAOBCForce) for f in system.getForces()) == 1
    assert not any(isinstance(f, openmm.CustomGBForce) for f in system.getForces())
    custom = app.ForceField("amber14-all.xml", "implicit/obc2.xml").createSystem(
        topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds)

    def gb(s, kind):
        for f in s.getForces():
            f.setForceGroup(1 if isinstance(f, kind) else 0)
        context = openmm.Context(s, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
        context.setPositions(positions)
        state = context.getState(getEnergy=True, getForces=True, groups={1})
        return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
                state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))

    native_energy, native_forces = gb(system, openmm.GBSAOBCForce)
    custom_energy, custom_forces = gb(custom, openmm.CustomGBForce)
    assert abs(custom_energy) > 1000  # the premise: a sizeable solvation energy
    assert native_energy == pytest.approx(custom_energy, abs=0.01)
    assert np.max(np.abs(native_forces - custom_forces)) < 0.01
    # The rest of the System is amber14-all itself.
    other = [f for f in custom.getForces() if not isinstance(f, openmm.CustomGBForce)]
    assert sorted(type(f).__name__ for f in other) == sorted(
        type(f).__name__ for f in system.getForces() if not isinstance(f, openmm.GBSAOBCForce))


def test_refine_keeps_a_gap_open_and_the_residues_as_they_were(tmp_path, monkeypatch):
    """Residues 30-33 of the SH3 domain deleted and the file written without a TER at the gap: openmm.app bonds
    C29 to N34 on reading, which amber14 would pull to 0.13 nm (measured without the split: 80 L-BFGS
    iterations took C29-N34 from 1.27 to 0.18 nm). refine, given those 80 iterations, must split the chain
    there (own termini) and keep the ends apart. Tolerance: the C29-N34 distance moves by less than 0.15 nm
    and stays above 0.5 nm (a peptide bond is 0.133 nm)."""
    monkeypatch.setattr(refine_module, "PRERELAX_ITERATIONS", 50)
    pdb = app.PDBFile(PROTEIN_PDB)
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.delete([r for r in modeller.topology.residues() if 30 <= int(r.id) <= 33])
    path = tmp_path / "gapped.pdb"
    with open(path, "w") as handle:
        app.PDBFile.writeFile(modeller.topology, modeller.positions, handle, keepIds=True)
    before = app.PDBFile(str(path))

    def gap(topology, positions):
        xyz = np.asarray(positions.value_in_unit(unit.nanometer))
        c = [a.index for a in topology.atoms() if a.residue.id == "29" and a.name == "C"]
        n = [a.index for a in topology.atoms() if a.residue.id == "34" and a.name == "N"]
        return float(np.linalg.norm(xyz[c[0]] - xyz[n[0]]))

    start = gap(before.topology, before.positions)
    assert start > 0.5
    assert any({a.residue.id, b.residue.id} == {"29", "34"} for a, b in before.topology.bonds())  # the premise
    result = refine(str(path), minimizeIterations=30, platform="CPU", progress=False)
    end = gap(result.topology, result.positions)
    assert abs(end - start) < 0.15 and end > 0.5, (start, end)
    assert [(c, i, n) for c, i, n in _residues(result.topology)] == _residues(before.topology)
    assert len(result.gaps) == 1 and "29" in result.gaps[0][0] and "34" in result.gaps[0][1]
    assert len(set(result.segments)) == 2
    # Each piece has its own termini: OXT on residue 29, and residue 34 starts a chain.
    names29 = {a.name for r in result.topology.residues() if r.id == "29" for a in r.atoms()}
    assert "OXT" in names29
    assert [next(c.residues()).id for c in result.topology.chains()] == ["6", "34"]


def test_refine_brings_a_perturbed_native_closer_to_it():
    """The SH3 domain (57 residues) with 0.1 nm of Gaussian noise per heavy-atom coordinate: refine() with its
    default protocol must end much closer to the native than the start (measured 0.17 -> about 0.10 nm)."""
    pdb = app.PDBFile(PROTEIN_PDB)
    native = _backbone(pdb.topology, pdb.positions)
    xyz = np.asarray(pdb.positions.value_in_unit(unit.nanometer))
    noisy = unit.Quantity(xyz + np.random.default_rng(11).normal(0.0, NOISE, xyz.shape), unit.nanometer)
    start = _rmsd_to(native, pdb.topology, noisy)
    assert start > 0.15
    result = refine((pdb.topology, noisy), minimizeIterations=200, platform="CPU", progress=False)
    assert result.protocol == refine_module.DEFAULT_PROTOCOL
    end = _rmsd_to(native, result.topology, result.positions)
    assert end < 0.75 * start, (start, end)


def test_protocol_arguments(monkeypatch):
    monkeypatch.setattr(refine_module, "PRERELAX_ITERATIONS", 10)  # arguments only: keep it short
    monkeypatch.setattr(refine_module, "QUENCH_ITERATIONS", 5)
    pdb = app.PDBFile(PROTEIN_PDB)
    with pytest.raises(ValueError, match="protocol"):
        refine((pdb.topology, pdb.positions), protocol="heat", progress=False)
    with pytest.raises(ValueError, match="runs no MD"):
        refine((pdb.topology, pdb.positions), protocol="minimize", steps=10, progress=False)
    result = refine((pdb.topology, pdb.positions), protocol="restrained", steps=10, minimizeIterations=20,
                    platform="CPU", progress=False)
    assert result.protocol == "restrained" and set(result.energies) == {"start", "minimized", "md", "final"}
    # The restraint lived in a copy: the returned System is amber14 + OBC2 + the learned force only.
    assert not any(f.getName() == "BackboneRestraint" for f in result.system.getForces())


def _edited_pdb(path, edit):
    """The SH3 domain's PDB text with `edit(line) -> list of lines` applied to each ATOM line."""
    lines = []
    for line in open(PROTEIN_PDB).read().splitlines():
        lines.extend(edit(line) if line.startswith("ATOM") else [line])
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return str(path)


def test_selenomethionine_is_named_when_it_becomes_methionine(tmp_path):
    # MET 25 rewritten as MSE (HETATM, SD -> SE): PDBFixer replaces it by MET, which was silent. Oracle: the
    # residue this test changed.
    def to_mse(line):
        if line[17:20] != "MET":
            return [line]
        line = "HETATM" + line[6:17] + "MSE" + line[20:]
        if line[12:16] == " SD ":
            line = line[:12] + "SE  " + line[16:76] + "SE" + line[78:]
        return [line]

    topology, positions = readStructure(_edited_pdb(tmp_path / "mse.pdb", to_mse))
    assert [r.name for r in topology.residues() if r.id == "25"] == ["MSE"]  # the premise
    notes = []
    with pytest.warns(UserWarning, match=r"MSE 25 \(chain A\) refined as MET"):
        _, fixed, _ = allAtomSystem(topology, positions, withForce=False, notes=notes)
    assert any("MSE 25 (chain A) refined as MET" in note for note in notes)
    assert [r.name for r in fixed.residues() if r.id == "25"] == ["MET"]


def test_a_duplicate_ca_is_an_error_naming_the_residue(tmp_path):
    # A second CA in LEU 10 (no altloc id) was dropped without a word by gemmi's altloc resolution and by
    # PDBFixer. Oracle: the residue this test changed.
    def second_ca(line):
        if line[22:26].strip() == "10" and line[12:16] == " CA ":
            return [line, line[:30] + "%8.3f" % (float(line[30:38]) + 0.9) + line[38:]]
        return [line]

    path = _edited_pdb(tmp_path / "dup.pdb", second_ca)
    with pytest.raises(ValueError, match=r"LEU 10 \(chain A\): 2 atoms named CA"):
        readStructure(path)
    with pytest.raises(ValueError, match=r"LEU 10 \(chain A\)"):
        refine(path, platform="CPU", progress=False)
    # The same as an (openmm.app.Topology, positions) pair, built here (openmm.app's readers drop the copy).
    pdb = app.PDBFile(PROTEIN_PDB)
    topology, xyz = app.Topology(), []
    for chain in pdb.topology.chains():
        new_chain = topology.addChain(chain.id)
        for residue in chain.residues():
            new_residue = topology.addResidue(residue.name, new_chain, residue.id)
            for atom in residue.atoms():
                copies = 2 if residue.id == "10" and atom.name == "CA" else 1
                for k in range(copies):
                    topology.addAtom(atom.name, atom.element, new_residue)
                    xyz.append(pdb.positions[atom.index].value_in_unit(unit.nanometer) + np.array([0.09 * k, 0, 0]))
    with pytest.raises(ValueError, match=r"LEU 10 \(chain A\): 2 atoms named CA"):
        refine((topology, unit.Quantity(np.array(xyz), unit.nanometer)), platform="CPU", progress=False)
    frames, unusable = selectFrameResidues(topology)
    assert [(r.id, "CA" in reason) for r, reason in unusable] == [("10", True)]
    assert "10" not in [f.residue.id for f in frames]


# ---- Heterogens and RNA termini (issue: refinement of the structures users have). Inputs are hand-made from the
# shipped structures; oracles are the atoms this test added or removed, read back from the files.

def _pdb_atoms(path):
    """[(record, atom name, residue name, chain, residue number, xyz Angstrom)] of ATOM/HETATM lines."""
    out = []
    for line in open(path):
        if line.startswith(("ATOM", "HETATM")):
            out.append((line[:6].strip(), line[12:16].strip(), line[17:20].strip(), line[21], int(line[22:26]),
                        np.array([float(line[30:38]), float(line[38:46]), float(line[46:54])])))
    return out


def _write_pdb(path, atoms):
    with open(path, "w") as handle:
        for k, (record, name, residue, chain, number, xyz) in enumerate(atoms):
            element = name.lstrip("0123456789")[0] if residue not in ("NA",) else "NA"
            padded = (" " + name) if len(name) < 4 and len(element) == 1 else name
            handle.write("%-6s%5d %-4s %3s %s%4d    %8.3f%8.3f%8.3f  1.00  0.00          %2s\n"
                         % (record, k + 1, padded, residue.rjust(3), chain, number, *xyz, element))
        handle.write("END\n")
    return str(path)


def _rna(first=2, last=9):
    """The shipped RNA cut to nucleotides first..last (a short chain: fast to refine)."""
    return [a for a in _pdb_atoms(RNA_PDB) if first <= a[4] <= last]


def _xyz(atoms, number, name):
    return next(a[5] for a in atoms if a[4] == number and a[1] == name)


def _unit(v):
    return v / np.linalg.norm(v)


def _phosphate(origin, away, names, residue, number, chain="A", record="ATOM"):
    """P 1.6 A from `origin` along `away`, its oxygens 1.5 A from P around that axis."""
    p = origin + 1.6 * away
    side = _unit(np.cross(away, [0.3, 0.5, 0.8]))
    other = np.cross(away, side)
    oxygens = [p + 1.5 * _unit(0.35 * away + d) for d in (side, -0.5 * side + 0.87 * other, -0.5 * side - 0.87 * other)]
    return [(record, names[0], residue, "A", number, p)] + [(record, n, residue, chain, number, x)
                                                           for n, x in zip(names[1:], oxygens)]


def _fast(monkeypatch):
    monkeypatch.setattr(refine_module, "PRERELAX_ITERATIONS", 20)
    return dict(minimizeIterations=10, platform="CPU", progress=False)


def _names(topology, number):
    return {a.name for r in topology.residues() if r.id == str(number) for a in r.atoms()}


def test_rna_with_a_5prime_phosphate_is_refined_all_atom(tmp_path, monkeypatch):
    # Before: "No template found for residue 0 (G) ... missing 1 P atom and has 1 O atom too many", no refinement.
    atoms = _rna()
    away = _unit(_xyz(atoms, 2, "O5'") - _xyz(atoms, 2, "C5'"))
    atoms = _phosphate(_xyz(atoms, 2, "O5'"), away, ["P", "OP1", "OP2", "OP3"], "G", 2) + atoms
    result = refine(_write_pdb(tmp_path / "p5.pdb", atoms), **_fast(monkeypatch))
    assert result.level == "all-atom"
    assert not _names(result.topology, 2) & {"P", "OP1", "OP2", "OP3"}
    assert any("G 2 (chain A)" in line and "5' phosphate" in line for line in result.leftOut), result.leftOut
    assert result.topology.getNumChains() == 1


def test_rna_with_a_5prime_triphosphate_is_refined_all_atom(tmp_path, monkeypatch):
    atoms = _rna()
    origin, away = _xyz(atoms, 2, "O5'"), _unit(_xyz(atoms, 2, "O5'") - _xyz(atoms, 2, "C5'"))
    added = []
    for k, (p, bridge) in enumerate((("PA", "O3A"), ("PB", "O3B"), ("PG", None))):
        group = _phosphate(origin + 3.2 * k * away, away, [p, "O1" + p[1], "O2" + p[1]] + ([bridge] if bridge else
                                                                                          ["O3G"]), "GTP", 2)
        added += group
    atoms = added + [(r, n, "GTP" if num == 2 else res, c, num, x) for r, n, res, c, num, x in atoms]
    result = refine(_write_pdb(tmp_path / "ppp5.pdb", atoms), **_fast(monkeypatch))
    assert result.level == "all-atom"
    first = [r for r in result.topology.residues() if r.id == "2"]
    assert [r.name for r in first] == ["G"] and not _names(result.topology, 2) & {"PA", "PB", "PG"}
    assert any("triphosphate" in line and "refined as G" in line for line in result.leftOut), result.leftOut


def test_rna_with_a_3prime_phosphate_keeps_it_fixed(tmp_path, monkeypatch):
    # A phosphate after the last nucleotide, written as a residue of its own: not a nucleotide to invent (PDBFixer
    # would build its sugar and base), but kept where it is and written back unchanged.
    atoms = _rna()
    away = _unit(_xyz(atoms, 9, "O3'") - _xyz(atoms, 9, "C3'"))
    phosphate = _phosphate(_xyz(atoms, 9, "O3'"), away, ["P", "OP1", "OP2", "OP3"], "C", 10)
    result = refine(_write_pdb(tmp_path / "p3.pdb", atoms + phosphate), **_fast(monkeypatch))
    assert result.level == "all-atom"
    assert _names(result.topology, 10) == {"P", "OP1", "OP2", "OP3"}
    xyz = np.asarray(result.positions.value_in_unit(unit.nanometer))
    written = {a.name: xyz[a.index] for a in result.topology.atoms() if a.residue.id == "10"}
    for _, name, _, _, _, position in phosphate:
        assert np.allclose(written[name], position / 10.0, atol=1e-4)  # the file keeps 3 decimals in Angstrom
    assert any("C 10 (chain A)" in line and "phosphate" in line for line in result.leftOut), result.leftOut


def test_rna_missing_terminal_atoms_is_completed_all_atom(tmp_path, monkeypatch):
    # Before: any missing nucleotide atom sent the whole chain to backbone level.
    atoms = [a for a in _rna() if not (a[4] == 2 and a[1] == "O5'") and not (a[4] == 9 and a[1] == "O3'")]
    result = refine(_write_pdb(tmp_path / "ends.pdb", atoms), **_fast(monkeypatch))
    assert result.level == "all-atom"
    assert "O5'" in _names(result.topology, 2) and "O3'" in _names(result.topology, 9)
    assert any("PDBFixer added" in note and "O3'" in note for note in result.notes), result.notes


def test_rna_with_a_modified_nucleotide_is_refined_as_its_parent(tmp_path, monkeypatch):
    # C 5 as 5-methylcytidine (5MC: C 5 plus a methyl carbon C5M on C5).
    atoms = _rna()
    c5 = _xyz(atoms, 5, "C5")
    methyl = c5 + 1.5 * _unit(c5 - _xyz(atoms, 5, "N1"))
    atoms = [("HETATM" if num == 5 else r, n, "5MC" if num == 5 else res, c, num, x) for r, n, res, c, num, x in atoms]
    atoms.insert(max(k for k, a in enumerate(atoms) if a[4] == 5) + 1, ("HETATM", "C5M", "5MC", "A", 5, methyl))
    with pytest.warns(UserWarning, match=r"5MC 5 \(chain A\) refined as C"):
        result = refine(_write_pdb(tmp_path / "5mc.pdb", atoms), **_fast(monkeypatch))
    assert result.level == "all-atom" and result.topology.getNumChains() == 1
    assert [r.name for r in result.topology.residues() if r.id == "5"] == ["C"]
    assert any("5MC 5 (chain A) refined as C" in note for note in result.notes)


def test_rna_with_a_pseudouridine_is_refined_as_uridine_with_its_ring_mapped(tmp_path, monkeypatch):
    # U 13 rewritten as pseudouridine (PSU): the same atoms, named as in PSU, whose ring is bound to C1' through
    # C5 (the uridine's N1 position). A rename by names alone would put U's N1 where PSU's N1 is, 0.28 nm away.
    u_to_psu = {"N1": "C5", "C2": "C4", "O2": "O4", "N3": "N3", "C4": "C2", "O4": "O2", "C5": "N1", "C6": "C6"}
    atoms = _rna(11, 16)
    original = {a[1]: a[5] for a in atoms if a[4] == 13}
    atoms = [("HETATM", u_to_psu.get(n, n), "PSU", c, num, x) if num == 13 else (r, n, res, c, num, x)
             for r, n, res, c, num, x in atoms]
    with pytest.warns(UserWarning, match=r"PSU 13 \(chain A\)"):
        result = refine(_write_pdb(tmp_path / "psu.pdb", atoms), **_fast(monkeypatch))
    assert result.level == "all-atom" and result.topology.getNumChains() == 1
    assert [r.name for r in result.topology.residues() if r.id == "13"] == ["U"]
    assert any("pseudouridine" in note and "PSU 13 (chain A)" in note for note in result.notes), result.notes
    xyz = np.asarray(result.positions.value_in_unit(unit.nanometer))
    written = {a.name: xyz[a.index] for a in result.topology.atoms() if a.residue.id == "13"}
    for name in ("N1", "C2", "O2", "N3", "C4", "O4", "C5", "C6"):
        assert np.linalg.norm(written[name] - original[name] / 10.0) < 0.05, name  # a short minimisation


def test_rna_with_an_unknown_modified_nucleotide_mid_chain_is_refined_around_it(tmp_path, monkeypatch):
    # A nucleotide neither amber14 nor PDBFixer knows (here U 13 renamed ZZU) is set aside; the chain continues
    # after it with a nucleotide whose 5' phosphate no amber14 template holds. Before: "No template found for
    # residue ... (C)", no refinement.
    atoms = [("HETATM", n, "ZZU", c, num, x) if num == 13 else (r, n, res, c, num, x)
             for r, n, res, c, num, x in _rna(11, 16)]
    result = refine(_write_pdb(tmp_path / "zzu.pdb", atoms), **_fast(monkeypatch))
    assert result.level == "all-atom"
    assert any("ZZU 13 (chain A)" in line for line in result.leftOut), result.leftOut
    assert any("C 14 (chain A): 5' phosphate" in line for line in result.leftOut), result.leftOut


def test_a_ligand_ion_and_waters_are_kept_fixed_or_removed_never_a_level_drop(tmp_path, monkeypatch):
    # Before: the protein's ligand (benzene) was dropped (or the whole protein went to backbone level) with only a
    # warning. Now the protein stays all-atom; the others are written back unchanged (default) or removed, and
    # leftOut names them.
    protein = _pdb_atoms(PROTEIN_PDB)
    xyz = np.array([a[5] for a in protein])
    centre = xyz[np.argmax(xyz[:, 0])] + np.array([4.5, 0.0, 0.0])
    ring = [("HETATM", "C%d" % (k + 1), "BNZ", "B", 101,
             centre + 1.39 * np.array([0.0, np.cos(k * np.pi / 3), np.sin(k * np.pi / 3)])) for k in range(6)]
    others = ring + [("HETATM", "O", "HOH", "B", 201, centre + [0, 0, 5.0]),
                     ("HETATM", "O", "HOH", "B", 202, centre + [3.0, 0, 5.0]),
                     ("HETATM", "NA", "NA", "B", 301, centre + [0, 0, -5.0])]
    path = _write_pdb(tmp_path / "complex.pdb", protein + others)
    fixed = refine(path, hetero="fixed", **_fast(monkeypatch))
    assert fixed.level == "all-atom"
    assert any(f.getName() == "HeteroWall" for f in fixed.system.getForces())
    xyz = np.asarray(fixed.positions.value_in_unit(unit.nanometer))
    written = {(a.residue.name, a.residue.id, a.name): xyz[a.index] for a in fixed.topology.atoms()
               if a.residue.chain.id == "B"}
    assert len(written) == len(others)
    for _, name, residue, _, number, position in others:
        assert np.allclose(written[(residue, str(number), name)], position / 10.0, atol=1e-4)  # the file keeps 3 decimals in Angstrom
    # The polymer was held off the fixed atoms: no heavy atom closer than the wall's contact distance.
    heavy = np.array([xyz[a.index] for a in fixed.topology.atoms() if a.residue.chain.id == "A"
                      and a.element.symbol != "H"])
    fixed_xyz = np.array([p / 10.0 for *_, p in others])
    assert np.min(np.linalg.norm(heavy[:, None] - fixed_xyz[None], axis=2)) > 0.28
    assert sum("kept fixed" in line for line in fixed.leftOut) == 3  # benzene, the ion, one line for the waters
    assert any("BNZ 101 (chain B)" in line for line in fixed.leftOut)
    removed = refine(path, hetero="remove", **_fast(monkeypatch))
    assert removed.level == "all-atom"
    assert {r.chain.id for r in removed.topology.residues()} == {"A"}
    assert sum("removed" in line for line in removed.leftOut) == 3
    with pytest.raises(ValueError, match="hetero"):
        refine(path, hetero="drop", **_fast(monkeypatch))


def _backbone_level_protein(length=8):
    """A backbone-level System (refine_module.backboneSystem) of the first `length` residues of the test protein,
    and the frame atoms' start positions [3 length, 3] nm."""
    topology, positions = readStructure(PROTEIN_PDB)[:2]
    frames, _ = selectFrameResidues(topology)
    frames = frames[:length]
    xyz = positions.value_in_unit(unit.nanometer)
    system, start, _ = refine_module.backboneSystem(frames, np.asarray(xyz), segments=[0] * length)
    return system, start


def _collinear(start, residue):
    """`start` with the third frame atom of `residue` moved onto the line through its first two."""
    bad = np.array(start)
    a, b = bad[3 * residue], bad[3 * residue + 1]
    bad[3 * residue + 2] = b + 1.0 * (b - a)
    return bad


def test_backbone_level_leaves_a_degenerate_frame_out_of_the_learned_energy():
    # Backbone level holds frames with restraints only; a frame passing through a collinear shape for a step
    # must not stop the run (the CI machine's minimiser did exactly that on a 5-nt generated RNA).
    system, start = _backbone_level_protein()
    learned = [f for f in system.getForces() if openmmflashipa.FlashIPAForce.isinstance(f)]
    assert len(learned) == 1 and learned[0].getForceGroup() == 1
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(_collinear(start, 3))
    state = context.getState(getEnergy=True, getForces=True, groups={1})
    forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoules_per_mole / unit.nanometer)
    assert np.isfinite(state.getPotentialEnergy().value_in_unit(unit.kilojoules_per_mole))
    assert np.all(forces[9:12] == 0.0) and np.any(forces[:9] != 0.0)  # residue 3 is out, the others are not
    assert refine_module.skippedEvaluations(context, system) == 1
    context.setPositions(start)  # a valid frame is evaluated again, and the count stays
    context.getState(getEnergy=True, groups={1})
    assert refine_module.skippedEvaluations(context, system) == 1


def test_run_protocol_refuses_a_result_that_ends_with_a_degenerate_frame():
    # Only the learned force is left, so nothing mends the collinear residue (it gets no force while skipped):
    # the result would carry a frame the model cannot read, and runProtocol must say so rather than return it.
    system, start = _backbone_level_protein()
    for i in reversed(range(system.getNumForces())):
        if not openmmflashipa.FlashIPAForce.isinstance(system.getForce(i)):
            system.removeForce(i)
    with pytest.raises(RuntimeError, match="ended with degenerate frame atoms .* in 1 residue"):
        refine_module.runProtocol(system, _collinear(start, 3), platform="Reference", protocol="minimize",
                                  minimizeIterations=5)
    diagnostics = {}
    final, _ = refine_module.runProtocol(system, start, platform="Reference", protocol="minimize",
                                         minimizeIterations=5, diagnostics=diagnostics)
    assert diagnostics == {"skippedFrameEvaluations": 0} and np.all(np.isfinite(final))
