"""openmmflashipa.createForce: frame-atom selection from an openmm.app.Topology.

Oracles: gemmi's reading of the same files (which residues have the frame atoms), atom names in the
topology, and the residue vocabulary as documented (not the plugin's own name tables)."""

import warnings

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import pytest

import openmmflashipa
from openmmflashipa import FlashIPAForce, createForce

from flashipa_testutils import (DOCUMENTED_TYPES, PROTEIN_FRAME, PROTEIN_PDB, RNA_FRAME, RNA_PDB, amberSystem,
                                gemmiFrameResidues, massOnlySystem, referenceContext)


def residueParameters(force):
    return [force.getResidueParameters(i) for i in range(force.getNumResidues())]


@pytest.mark.parametrize("path, frame", [(PROTEIN_PDB, PROTEIN_FRAME), (RNA_PDB, RNA_FRAME)], ids=["protein", "rna"])
@pytest.mark.parametrize("hydrogens", [False, True], ids=["heavy", "withH"])
def test_frames_of_shipped_structures(path, frame, hydrogens):
    expected = gemmiFrameResidues(path, frame)
    assert len(expected) > 10
    if hydrogens:
        topology, _, _ = amberSystem(path)
    else:
        topology = app.PDBFile(path).topology
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every residue is usable: no warning at all
        force = createForce(topology)
    assert force.getNumResidues() == len(expected)
    atoms = list(topology.atoms())
    for (a, b, c, residueType, chain), (name, number) in zip(residueParameters(force), expected):
        picked = [atoms[a], atoms[b], atoms[c]]
        assert tuple(atom.name for atom in picked) == frame
        residue = picked[0].residue
        assert all(atom.residue is residue for atom in picked)
        assert residue.name == name and int(residue.id) == number
        assert residueType == DOCUMENTED_TYPES[name]
        assert chain == residue.chain.index


def test_learned_force_acts_only_on_frame_atoms():
    """The model sees only the frame atoms, so every other atom feels exactly zero learned force."""
    topology, positions, _ = amberSystem(PROTEIN_PDB)
    force = createForce(topology)
    system = massOnlySystem(topology)
    system.addForce(force)
    context = referenceContext(system, positions)
    forces = context.getState(getForces=True).getForces(asNumpy=True).value_in_unit(
        unit.kilojoules_per_mole / unit.nanometer)
    frameAtoms = {atom.index for atom in topology.atoms() if atom.name in PROTEIN_FRAME}
    others = [i for i in range(topology.getNumAtoms()) if i not in frameAtoms]
    assert np.all(np.isfinite(forces))
    assert np.all(forces[others] == 0.0)
    assert np.linalg.norm(forces[sorted(frameAtoms)]) > 0.0


def _mixedTopology():
    """The shipped protein plus a ligand, a residue missing CA, two waters and two ions, in new chains."""
    pdb = app.PDBFile(PROTEIN_PDB)
    topology = app.Topology()
    positions = []
    protein = topology.addChain("A")
    for residue in pdb.topology.residues():
        new = topology.addResidue(residue.name, protein, residue.id)
        for atom in residue.atoms():
            topology.addAtom(atom.name, atom.element, new)
            positions.append(pdb.positions[atom.index])
    other = topology.addChain("B")
    ligand = topology.addResidue("LIG", other, "301")
    for name, element in [("C1", "C"), ("C2", "C"), ("O1", "O")]:
        topology.addAtom(name, app.element.get_by_symbol(element), ligand)
    broken = topology.addResidue("ALA", other, "302")  # no CA
    for name, element in [("N", "N"), ("C", "C"), ("O", "O"), ("CB", "C")]:
        topology.addAtom(name, app.element.get_by_symbol(element), broken)
    for resname, number in [("HOH", "401"), ("WAT", "402")]:
        water = topology.addResidue(resname, other, number)
        for name, element in [("O", "O"), ("H1", "H"), ("H2", "H")]:
            topology.addAtom(name, app.element.get_by_symbol(element), water)
    for resname, element in [("NA", "Na"), ("CL", "Cl")]:
        ion = topology.addResidue(resname, other, "50%d" % len(resname))
        topology.addAtom(resname, app.element.get_by_symbol(element), ion)
    return topology, pdb


def test_unusable_residues_are_named_in_a_warning():
    topology, pdb = _mixedTopology()
    with pytest.warns(UserWarning) as record:
        force = createForce(topology)
    messages = " ".join(str(w.message) for w in record)
    assert "LIG" in messages and "301" in messages
    assert "302" in messages  # the ALA without CA
    for silent in ("HOH", "WAT", "CL"):
        assert silent not in messages
    assert force.getNumResidues() == pdb.topology.getNumResidues()


def test_strict_raises_with_the_names():
    topology, _ = _mixedTopology()
    with pytest.raises(ValueError, match="LIG"):
        createForce(topology, strict=True)


def test_water_and_ions_only_is_an_error():
    topology = app.Topology()
    chain = topology.addChain()
    water = topology.addResidue("HOH", chain)
    topology.addAtom("O", app.element.oxygen, water)
    ion = topology.addResidue("NA", chain)
    topology.addAtom("NA", app.element.sodium, ion)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError):
            createForce(topology)


def _nucleotideTopology(names, atomNames=("C3'", "C4'", "O4'")):
    topology = app.Topology()
    chain = topology.addChain()
    for i, name in enumerate(names):
        residue = topology.addResidue(name, chain, str(i + 1))
        for atomName in ("P",) + tuple(atomNames):
            topology.addAtom(atomName, app.element.get_by_symbol(atomName[0]), residue)
    return topology


def test_nucleotide_names_and_old_atom_names():
    names = ["A", "C", "G", "U", "RA5", "RU3", "DA", "DG", "DT", "PSU"]
    expected = [21, 22, 23, 24, 21, 24, 21, 23, 25, 25]  # thymine and modified bases: unknown nucleotide
    for atomNames in [("C3'", "C4'", "O4'"), ("C3*", "C4*", "O4*")]:
        topology = _nucleotideTopology(names, atomNames)
        force = createForce(topology)
        atoms = list(topology.atoms())
        params = residueParameters(force)
        assert [p[3] for p in params] == expected
        for a, b, c, _, _ in params:
            assert [atoms[i].name for i in (a, b, c)] == list(atomNames)


def test_amino_acid_variants_and_unknowns():
    topology = app.Topology()
    chain = topology.addChain()
    names = ["HIE", "CYX", "NALA", "CGLY", "MSE", "XYZ"]
    for name in names:
        residue = topology.addResidue(name, chain)
        for atomName in ("N", "CA", "C", "O"):
            topology.addAtom(atomName, app.element.get_by_symbol(atomName[0]), residue)
    force = createForce(topology)
    expected = [DOCUMENTED_TYPES[n] for n in ("HIS", "CYS", "ALA", "GLY", "MET")] + [20]
    assert [p[3] for p in residueParameters(force)] == expected


def test_chains_follow_topology_chain_index():
    topology = app.Topology()
    for chainIndex in range(3):
        chain = topology.addChain()
        for _ in range(2):
            residue = topology.addResidue("GLY", chain)
            for atomName in ("N", "CA", "C"):
                topology.addAtom(atomName, app.element.get_by_symbol(atomName[0]), residue)
    force = createForce(topology)
    assert [p[4] for p in residueParameters(force)] == [0, 0, 1, 1, 2, 2]


def test_parameters_accept_quantities_and_plain_numbers():
    topology = app.PDBFile(PROTEIN_PDB).topology
    force = createForce(topology, sigma=0.3 * unit.angstrom, temperature=310 * unit.kelvin, scale=0.5,
                        backend="math")
    assert force.getDefaultSigma() == pytest.approx(0.03, rel=1e-12)
    assert force.getDefaultTemperature() == pytest.approx(310.0, rel=1e-12)
    assert force.getDefaultScale() == 0.5
    assert force.getAttentionBackend() == "math"
    force = createForce(topology, sigma=0.1, temperature=280)
    assert force.getDefaultSigma() == 0.1 and force.getDefaultTemperature() == 280.0
    with pytest.raises(TypeError):
        createForce(topology, sigma=300 * unit.kelvin)


def test_model_path_is_passed_on(tmp_path):
    topology = app.PDBFile(PROTEIN_PDB).topology
    default = createForce(topology)
    assert default.getModelPath() == ""
    explicit = createForce(topology, modelPath=default.getResolvedModelPath())
    assert explicit.getModelPath() == default.getResolvedModelPath()
    assert explicit.getModelChecksum() == default.getModelChecksum()
    with pytest.raises(Exception, match="missing.safetensors"):
        createForce(topology, modelPath=tmp_path / "missing.safetensors")


def _chainIds(force):
    return [force.getResidueParameters(i)[4] for i in range(force.getNumResidues())]


def _peptideLinks(topology, xyz):
    """C(i)-N(i+1) distances (nm) of consecutive residues of each chain, from the atom names."""
    lengths = []
    for chain in topology.chains():
        residues = list(chain.residues())
        for previous, residue in zip(residues[:-1], residues[1:]):
            c = [a.index for a in previous.atoms() if a.name == "C"]
            n = [a.index for a in residue.atoms() if a.name == "N"]
            lengths.append(np.linalg.norm(xyz[n[0]] - xyz[c[0]]))
    return np.array(lengths)


def test_perturbed_real_protein_is_one_segment():
    """0.1 nm of Gaussian noise per coordinate stretches many C-N links past the training data's 0.2 nm break
    distance (the oracle counts them); the chain is whole, and the bonds say so."""
    pdb = app.PDBFile(PROTEIN_PDB)
    xyz = np.asarray(pdb.positions.value_in_unit(unit.nanometer))
    noisy = xyz + np.random.default_rng(7).normal(0.0, 0.1, xyz.shape)
    assert np.sum(_peptideLinks(pdb.topology, noisy) > 0.2) >= 10  # the premise: distances would cut it
    assert set(_chainIds(createForce(pdb.topology, positions=noisy))) == {0}
    assert set(_chainIds(createForce(pdb.topology))) == {0}


def test_residues_removed_from_the_middle_give_two_segments():
    """Residues cut out of the middle of a chain (a gap of four residues) start a new model chain, with or
    without positions: Modeller.delete leaves no bond across the gap. The oracle measures the gap directly
    from the file's C and N atoms."""
    pdb = app.PDBFile(PROTEIN_PDB)
    modeller = app.Modeller(pdb.topology, pdb.positions)
    residues = list(modeller.topology.residues())
    modeller.delete(residues[20:24])
    xyz = np.asarray(modeller.positions.value_in_unit(unit.nanometer))
    kept = len(list(modeller.topology.residues()))
    links = _peptideLinks(modeller.topology, xyz)
    assert [i + 1 for i in np.flatnonzero(links > 0.2)] == [20]  # exactly one break, before the 21st residue
    expected = [0] * 20 + [1] * (kept - 20)
    assert _chainIds(createForce(modeller.topology)) == expected
    assert _chainIds(createForce(modeller.topology, positions=modeller.positions)) == expected


def _withoutBonds(topology, ids=None):
    """A copy of `topology` without bonds, optionally with new residue ids."""
    copy = app.Topology()
    for chain in topology.chains():
        newChain = copy.addChain(chain.id)
        for k, residue in enumerate(chain.residues()):
            newResidue = copy.addResidue(residue.name, newChain, residue.id if ids is None else ids[k])
            for atom in residue.atoms():
                copy.addAtom(atom.name, atom.element, newResidue)
    return copy


def test_without_bonds_the_numbering_decides_and_positions_come_last():
    pdb = app.PDBFile(PROTEIN_PDB)
    n = pdb.topology.getNumResidues()
    xyz = np.asarray(pdb.positions.value_in_unit(unit.nanometer))
    noisy = xyz + np.random.default_rng(7).normal(0.0, 0.1, xyz.shape)
    # Consecutive numbers: one chain whatever the positions say.
    assert set(_chainIds(createForce(_withoutBonds(pdb.topology), positions=noisy))) == {0}
    # A jump in the numbering (10 -> 15) is a break, positions or not.
    ids = [str(k + 1) if k < 10 else str(k + 5) for k in range(n)]
    assert _chainIds(createForce(_withoutBonds(pdb.topology, ids), positions=xyz)) == [0] * 10 + [1] * (n - 10)
    # Ids that are not numbers leave the positions to decide: the native's links are all bonds (one chain),
    # a residue moved 1 nm away is cut off on both sides; without positions the chain stays whole.
    names = ["r%d" % k for k in range(n)]
    assert set(_chainIds(createForce(_withoutBonds(pdb.topology, names), positions=xyz))) == {0}
    moved = xyz.copy()
    moved[[a.index for a in list(pdb.topology.residues())[30].atoms()]] += 1.0
    assert _chainIds(createForce(_withoutBonds(pdb.topology, names), positions=moved)) == \
        [0] * 30 + [1] + [2] * (n - 31)
    assert set(_chainIds(createForce(_withoutBonds(pdb.topology, names)))) == {0}


def test_gaps_are_found_from_numbering_and_distance_not_from_bonds():
    """openmm.app bonds consecutive residues of a chain across a gap; findGaps does not trust those bonds, and
    splitAtGaps gives each piece its own chain with no bond across."""
    import io
    from openmmflashipa.topology import findGaps, splitAtGaps, GAP_DISTANCE
    pdb = app.PDBFile(PROTEIN_PDB)
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.delete(list(modeller.topology.residues())[20:24])
    text = io.StringIO()
    app.PDBFile.writeFile(modeller.topology, modeller.positions, text, keepIds=True)
    reread = app.PDBFile(io.StringIO(text.getvalue()))
    residues = list(reread.topology.residues())
    assert any({a.residue, b.residue} == {residues[19], residues[20]} for a, b in reread.topology.bonds())
    gaps = findGaps(reread.topology, reread.positions)
    assert [(a.id, b.id) for a, b in gaps] == [(residues[19].id, residues[20].id)]
    split, _ = splitAtGaps(reread.topology, reread.positions)
    assert [len(list(c.residues())) for c in split.chains()] == [20, len(residues) - 20]
    assert {c.id for c in split.chains()} == {residues[0].chain.id}
    assert not any(a.residue.chain is not b.residue.chain for a, b in split.bonds())
    assert split.getNumBonds() == reread.topology.getNumBonds() - 1
    # Noise does not open gaps: 0.1 nm per coordinate stays far below GAP_DISTANCE.
    xyz = np.asarray(pdb.positions.value_in_unit(unit.nanometer))
    noisy = xyz + np.random.default_rng(3).normal(0.0, 0.1, xyz.shape)
    assert findGaps(pdb.topology, noisy) == [] and GAP_DISTANCE >= 0.8
    # Consecutive numbers with the link far beyond a bond (a generated backbone written before repair) stay
    # linked: cutting there left single residues amber14 has no template for.
    far = xyz.copy()
    far[[a.index for r in list(pdb.topology.residues())[40:] for a in r.atoms()]] += 1.0
    assert findGaps(pdb.topology, far) == []


def test_errors_name_residues_as_the_input_file_does():
    """createForce labels every residue after its Topology, so a degenerate frame is reported with the file's
    residue name, number and chain rather than the force's internal index alone."""
    import openmm
    pdb = app.PDBFile(PROTEIN_PDB)
    force = createForce(pdb.topology)
    residues = [r for r in pdb.topology.residues()]
    assert force.getResidueLabel(3) == "%s %s of chain %s" % (residues[3].name, residues[3].id, residues[3].chain.id)
    system = openmm.System()
    for atom in pdb.topology.atoms():
        system.addParticle(atom.element.mass)
    system.addForce(force)
    positions = np.array(pdb.positions.value_in_unit(unit.nanometer))
    a, b, c, _, _ = force.getResidueParameters(3)
    positions[c] = positions[b]
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    with pytest.raises(openmm.OpenMMException, match=r"residue 3 \(%s %s of chain %s\) are coincident" % (
            residues[3].name, residues[3].id, residues[3].chain.id)):
        context.getState(getEnergy=True, getForces=True)
