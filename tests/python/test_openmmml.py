"""MLPotential("flashipa") through openmm-ml's entry point (openmmflashipa.mlpotential): the Systems it makes
against the same force made directly with createForce and evaluated on its own (Reference platform, double
precision), so the oracle is the sum of two independently evaluated Systems."""
import os

import numpy as np
import openmm
import openmm.unit as unit
import pytest

import openmmflashipa
from flashipa_testutils import DATA, amberSystem

openmmml = pytest.importorskip("openmmml")
from openmmml import MLPotential  # noqa: E402

PROTEIN = os.path.join(DATA, "protein.pdb")


def energyAndForces(system, positions):
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    state = context.getState(getEnergy=True, getForces=True)
    return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))


def forceOnly(topology, **args):
    """A System of the topology's particles with only createForce's force (the oracle's learned part)."""
    system = openmm.System()
    for atom in topology.atoms():
        system.addParticle(atom.element.mass if atom.element is not None else 0)
    system.addForce(openmmflashipa.createForce(topology, **args))
    return system


@pytest.fixture(scope="module")
def protein():
    return amberSystem(PROTEIN)


def test_entry_point_finds_the_potential():
    potential = MLPotential("flashipa")
    assert type(potential._impl).__module__ == "openmmflashipa.mlpotential"
    assert "additive" in potential.getSupportedEmbeddings()


def test_mixed_system_adds_the_learned_force_to_the_force_field(protein):
    topology, positions, amber = protein
    atoms = [atom.index for atom in topology.atoms()]
    mixed = MLPotential("flashipa", sigma=0.05).createMixedSystem(topology, amber, atoms, removeConstraints=False)
    # Nothing of the force field is removed: the same constraints, one force more.
    assert mixed.getNumConstraints() == amber.getNumConstraints() > 0
    assert mixed.getNumForces() == amber.getNumForces() + 1
    energy, forces = energyAndForces(mixed, positions)
    amberEnergy, amberForces = energyAndForces(amber, positions)
    learnedEnergy, learnedForces = energyAndForces(forceOnly(topology, sigma=0.05), positions)
    assert learnedEnergy != 0.0
    assert energy == pytest.approx(amberEnergy + learnedEnergy, rel=1e-9, abs=1e-6)
    np.testing.assert_allclose(forces, amberForces + learnedForces, rtol=1e-9, atol=1e-6)


def test_atoms_choose_the_residues_and_forcegroup_is_kept(protein):
    topology, positions, amber = protein
    residues = list(topology.residues())[:5]
    atoms = [atom.index for residue in residues for atom in residue.atoms() if atom.name in ("N", "CA", "C")]
    mixed = MLPotential("flashipa").createMixedSystem(topology, amber, atoms, forceGroup=3)
    added = [openmmflashipa.FlashIPAForce.cast(f) for f in mixed.getForces() if openmmflashipa.FlashIPAForce.isinstance(f)]
    assert len(added) == 1 and added[0].getForceGroup() == 3
    assert added[0].getNumResidues() == 5
    # Frame atoms alone: openmm-ml's removeConstraints (on by default) finds no constraint between two of them.
    assert mixed.getNumConstraints() == amber.getNumConstraints()
    context = openmm.Context(mixed, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    learned = context.getState(getEnergy=True, groups={3}).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    expected, _ = energyAndForces(forceOnly(topology, atoms=atoms), positions)
    assert learned == pytest.approx(expected, rel=1e-9)


def test_interpolate_scales_the_learned_force(protein):
    topology, positions, amber = protein
    atoms = [atom.index for atom in topology.atoms()]
    mixed = MLPotential("flashipa").createMixedSystem(topology, amber, atoms, interpolate=True, removeConstraints=False)
    amberEnergy, _ = energyAndForces(amber, positions)
    learnedEnergy, _ = energyAndForces(forceOnly(topology), positions)
    context = openmm.Context(mixed, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    for value in (1.0, 0.5, 0.0):
        context.setParameter("lambda_interpolate", value)
        energy = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        assert energy == pytest.approx(amberEnergy + value * learnedEnergy, rel=1e-9, abs=1e-6), value


def test_create_system_holds_the_learned_force_alone(protein):
    topology, positions, _ = protein
    system = MLPotential("flashipa").createSystem(topology)
    assert system.getNumParticles() == topology.getNumAtoms()
    energy, forces = energyAndForces(system, positions)
    expectedEnergy, expectedForces = energyAndForces(forceOnly(topology), positions)
    assert energy == pytest.approx(expectedEnergy, rel=1e-9)
    np.testing.assert_allclose(forces, expectedForces, rtol=1e-9, atol=1e-9)


def test_bad_arguments_are_named(protein, tmp_path):
    topology, _, amber = protein
    with pytest.raises(ValueError, match="no model file"):
        MLPotential("flashipa", modelPath=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="unknown argument"):
        MLPotential("flashipa", temperatur=300)
    # openmm-ml passes only the names getSupportedEmbeddings() lists; called directly, another is refused.
    with pytest.raises(ValueError, match="embedding"):
        MLPotential("flashipa")._impl.createMixedSystem(topology, amber, [0, 1, 2], 0, False, "electrostatic")
    with pytest.raises(ValueError, match="no residue has all three frame atoms"):
        MLPotential("flashipa").createMixedSystem(topology, amber, [0])
