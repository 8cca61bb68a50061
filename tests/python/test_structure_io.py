"""Reading and writing structures (openmmflashipa.structure): what goes in comes out, with nothing invented."""

import gemmi
import numpy as np
import openmm.app as app
import openmm.unit as unit

from openmmflashipa.generate import generate
from openmmflashipa.structure import readStructure
from flashipa_testutils import PROTEIN_PDB


def test_two_character_chain_ids_survive_reading(tmp_path):
    # PDB columns hold one character; reading through them merged chains "AA" and "AB" into one.
    structure = gemmi.read_structure(PROTEIN_PDB)
    first = structure[0][0]
    atoms = first.count_atom_sites()
    second = first.clone()
    first.name, second.name = "AA", "AB"
    for residue in second:
        for atom in residue:
            atom.pos = gemmi.Position(atom.pos.x + 40.0, atom.pos.y, atom.pos.z)
    structure[0].add_chain(second)  # may move the chains: `first` is not used after this
    structure.setup_entities()
    path = tmp_path / "two_chains.cif"
    structure.make_mmcif_document().write_file(str(path))
    topology, positions = readStructure(path)
    assert [chain.id for chain in topology.chains()] == ["AA", "AB"]
    assert topology.getNumAtoms() == 2 * atoms
    xyz = np.array(positions.value_in_unit(unit.nanometer))
    assert np.allclose(xyz[topology.getNumAtoms() // 2:, 0] - xyz[:topology.getNumAtoms() // 2, 0], 4.0, atol=1e-3)


def test_generated_mmcif_is_not_periodic(tmp_path):
    # gemmi's placeholder cell (1 A) was written, and openmm.app read it as a periodic box.
    backbone = generate("protein", 12, numSamples=1, seed=3, progress=False)[0]
    path = tmp_path / "generated.cif"
    backbone.write(path)
    assert app.PDBxFile(str(path)).topology.getUnitCellDimensions() is None
    topology, positions = readStructure(path)
    assert topology.getUnitCellDimensions() is None and topology.getNumResidues() == 12
    assert np.allclose(np.array(positions.value_in_unit(unit.nanometer)).reshape(-1, 3)[:3],
                       backbone.toOpenMM()[1].value_in_unit(unit.nanometer)[:3], atol=1e-3)
