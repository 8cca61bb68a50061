"""The SWIG wrapper of FlashIPAForce: getters/setters, cast/isinstance, XML round trips, global
parameters in a Context, C++ exceptions as Python exceptions, and a short Amber simulation."""

import copy
import os

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import pytest

import openmmflashipa
from openmmflashipa import FlashIPAForce, ResidueType, createForce

from flashipa_testutils import (DOCUMENTED_TYPES, KJ, PROTEIN_PDB, RNA_PDB, amberSystem, groupEnergy,
                                massOnlySystem, referenceContext)

GROUP = 3


@pytest.fixture(scope="module")
def protein():
    topology, positions, system = amberSystem(PROTEIN_PDB)
    return topology, positions, system


def flashipaSystem(topology, **kwargs):
    system = massOnlySystem(topology)
    force = createForce(topology, **kwargs)
    force.setForceGroup(GROUP)
    system.addForce(force)
    return system


def allGetters(force):
    return {
        "modelPath": force.getModelPath(),
        "resolvedModelPath": force.getResolvedModelPath(),
        "checksum": force.getModelChecksum(),
        "numResidues": force.getNumResidues(),
        "residues": [force.getResidueParameters(i) for i in range(force.getNumResidues())],
        "backend": force.getAttentionBackend(),
        "properties": force.getProperties(),
        "scale": force.getDefaultScale(),
        "sigma": force.getDefaultSigma(),
        "temperature": force.getDefaultTemperature(),
        "group": force.getForceGroup(),
        "name": force.getName(),
        "periodic": force.usesPeriodicBoundaryConditions(),
    }


def test_version_is_the_repository_version_file():
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    with open(os.path.join(root, "VERSION")) as handle:
        version = handle.readline().strip()
    assert version and openmmflashipa.__version__ == version


def test_plugin_loaded_for_reference():
    assert any(path.endswith("libOpenMMFlashIPAReference.so") for path in openmmflashipa.pluginLibraries)
    assert openmmflashipa.hasPlatformKernels("Reference")
    assert openmm.Platform.getPlatformByName("Reference").supportsKernels(["CalcFlashIPAForce"])


def test_is_an_openmm_force_and_setters_round_trip():
    force = FlashIPAForce()
    assert isinstance(force, openmm.Force)
    assert force.getModelPath() == ""
    assert len(force.getModelChecksum()) == 64
    assert force.getNumResidues() == 0
    index = force.addResidue(0, 1, 2, 5, 0)
    assert index == 0
    params = force.getResidueParameters(0)
    assert isinstance(params, tuple) and params == (0, 1, 2, 5, 0)
    force.setResidueParameters(0, 3, 4, 5, 22, 1)
    assert force.getResidueParameters(0) == (3, 4, 5, 22, 1)
    force.setDefaultScale(0.25)
    force.setDefaultSigma(0.2 * unit.nanometer)
    force.setDefaultTemperature(350 * unit.kelvin)
    assert (force.getDefaultScale(), force.getDefaultSigma(), force.getDefaultTemperature()) == (0.25, 0.2, 350.0)
    force.setDefaultSigma(1.5 * unit.angstrom)
    assert force.getDefaultSigma() == pytest.approx(0.15, rel=1e-12)
    assert force.getAttentionBackend() == "auto"
    for name in ("fused", "fused-fp32", "sdpa", "auto", "math"):
        force.setAttentionBackend(name)
        assert force.getAttentionBackend() == name
    force.setProperty("useCUDAGraphs", "false")
    assert force.getProperties() == {"useCUDAGraphs": "false"}
    assert (FlashIPAForce.Scale(), FlashIPAForce.Sigma(), FlashIPAForce.Temperature()) == \
        ("flashipaScale", "flashipaSigma", "flashipaTemperature")
    assert force.usesPeriodicBoundaryConditions() is False


def test_residue_type_functions_match_documentation():
    assert ResidueType.Count == 26
    assert (ResidueType.NumAminoAcids, ResidueType.UnknownAminoAcid, ResidueType.FirstNucleotide,
            ResidueType.UnknownNucleotide) == (20, 20, 21, 25)
    for name, index in DOCUMENTED_TYPES.items():
        assert ResidueType.name(index) == name
        assert ResidueType.fromName(name) == index
        assert ResidueType.fromName(name.lower()) == index
    assert ResidueType.fromName("HIE") == DOCUMENTED_TYPES["HIS"]
    assert ResidueType.fromName("NOT-A-RESIDUE") == -1
    assert [ResidueType.isNucleotide(i) for i in (0, 20, 21, 25, 26)] == [False, False, True, True, False]


def test_cast_and_isinstance_after_get_force(protein):
    topology, positions, system = protein
    system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))  # private copy
    created = createForce(topology)
    expected = allGetters(created)
    index = system.addForce(created)
    del created
    generic = system.getForce(index)
    assert FlashIPAForce.isinstance(generic)
    assert not any(FlashIPAForce.isinstance(system.getForce(i)) for i in range(system.getNumForces()) if i != index)
    force = FlashIPAForce.cast(generic)
    del generic
    assert allGetters(force) == {**expected, "group": 0}
    force.setDefaultScale(3.0)  # the cast object is the System's force, not a copy
    assert FlashIPAForce.cast(system.getForce(index)).getDefaultScale() == 3.0
    with pytest.raises(openmm.OpenMMException, match="not a FlashIPAForce"):
        FlashIPAForce.cast(system.getForce(0))
    assert not FlashIPAForce.isinstance(openmm.HarmonicBondForce())


def test_xml_round_trip_of_force_and_system(protein):
    topology, positions, _ = protein
    system = flashipaSystem(topology, sigma=0.08, scale=1.5, temperature=290)
    original = FlashIPAForce.cast(system.getForce(0))
    original.setProperty("useCUDAGraphs", "true")
    original.setAttentionBackend("math")
    expected = allGetters(original)
    energy = groupEnergy(referenceContext(system, positions), GROUP)

    # The force alone.
    restored = FlashIPAForce.cast(openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(original)))
    assert FlashIPAForce.isinstance(restored)
    assert allGetters(restored) == expected
    # copy.deepcopy goes through the same serialisation.
    assert allGetters(copy.deepcopy(original)) == expected

    # The whole System, evaluated in a new Context.
    system2 = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    found = [i for i in range(system2.getNumForces()) if FlashIPAForce.isinstance(system2.getForce(i))]
    assert found == [0]
    assert allGetters(FlashIPAForce.cast(system2.getForce(0))) == expected
    energy2 = groupEnergy(referenceContext(system2, positions), GROUP)
    assert np.isfinite(energy) and energy != 0.0
    assert energy2 == pytest.approx(energy, rel=1e-12, abs=0)


@pytest.mark.parametrize("path", [PROTEIN_PDB, RNA_PDB], ids=["protein", "rna"])
def test_global_parameters_scale_the_energy(path):
    pdb = app.PDBFile(path)
    system = flashipaSystem(pdb.topology)
    context = referenceContext(system, pdb.positions)
    base = groupEnergy(context, GROUP)
    assert np.isfinite(base) and base != 0.0
    context.setParameter(FlashIPAForce.Scale(), 0.0)
    state = context.getState(getEnergy=True, getForces=True, groups={GROUP})
    assert state.getPotentialEnergy().value_in_unit(KJ) == 0.0
    assert np.all(state.getForces(asNumpy=True)._value == 0.0)
    context.setParameter(FlashIPAForce.Scale(), 2.0)
    assert groupEnergy(context, GROUP) == pytest.approx(2.0 * base, rel=1e-12)
    # U = scale * kT * E, kT proportional to T: doubling T doubles U too.
    context.setParameter(FlashIPAForce.Scale(), 1.0)
    defaultTemperature = FlashIPAForce.cast(system.getForce(0)).getDefaultTemperature()
    context.setParameter(FlashIPAForce.Temperature(), 2.0 * defaultTemperature)
    assert groupEnergy(context, GROUP) == pytest.approx(2.0 * base, rel=1e-12)


def test_update_parameters_in_context():
    pdb = app.PDBFile(PROTEIN_PDB)
    system = flashipaSystem(pdb.topology)
    force = FlashIPAForce.cast(system.getForce(0))
    context = referenceContext(system, pdb.positions)
    base = groupEnergy(context, GROUP)
    a, b, c, residueType, chain = force.getResidueParameters(0)
    force.setResidueParameters(0, a, b, c, ResidueType.UnknownAminoAcid, chain)
    force.updateParametersInContext(context)
    changed = groupEnergy(context, GROUP)
    assert changed != base
    # The same force in a fresh Context gives the updated energy.
    assert groupEnergy(referenceContext(system, pdb.positions), GROUP) == pytest.approx(changed, rel=1e-12)
    force.setResidueParameters(0, a, b, c, residueType, chain)
    force.updateParametersInContext(context)
    assert groupEnergy(context, GROUP) == pytest.approx(base, rel=1e-12)


def _contextError(residue):
    pdb = app.PDBFile(PROTEIN_PDB)
    system = massOnlySystem(pdb.topology)
    force = FlashIPAForce()
    force.addResidue(*residue)
    system.addForce(force)
    with pytest.raises(openmm.OpenMMException) as info:
        referenceContext(system, pdb.positions)
    return str(info.value)


def test_cpp_errors_become_python_exceptions():
    assert "99" in _contextError((0, 1, 2, 99, 0))
    assert "100000" in _contextError((0, 1, 100000, 0, 0))
    force = FlashIPAForce()
    with pytest.raises(openmm.OpenMMException, match="range"):
        force.getResidueParameters(0)
    with pytest.raises(openmm.OpenMMException, match="range"):
        force.setResidueParameters(3, 0, 1, 2, 0, 0)
    with pytest.raises(openmm.OpenMMException, match="bogus"):
        force.setAttentionBackend("bogus")
    with pytest.raises(openmm.OpenMMException, match="sigma"):
        force.setDefaultSigma(-1.0)
    with pytest.raises(openmm.OpenMMException, match="no-such-model.safetensors"):
        FlashIPAForce("no-such-model.safetensors")
    # The process is still fine afterwards.
    pdb = app.PDBFile(PROTEIN_PDB)
    assert np.isfinite(groupEnergy(referenceContext(flashipaSystem(pdb.topology), pdb.positions), GROUP))


# OBC2 (a CustomGBForce) costs ~0.2 s per evaluation on Reference: no minimisation there.
@pytest.mark.parametrize("path, solvent, minimize", [(PROTEIN_PDB, "obc2", False), (PROTEIN_PDB, "vacuum", True),
                                                     (RNA_PDB, "vacuum", True)],
                         ids=["protein-obc2", "protein-vacuum", "rna-vacuum"])
def test_amber_simulation_with_the_force(path, solvent, minimize):
    topology, positions, system = amberSystem(path, solvent=solvent)
    force = createForce(topology)
    force.setForceGroup(GROUP)
    system.addForce(force)
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 0.002 * unit.picoseconds)
    integrator.setRandomNumberSeed(7)
    simulation = app.Simulation(topology, system, integrator, openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions(positions)
    if minimize:
        simulation.minimizeEnergy(maxIterations=20)
    simulation.context.setVelocitiesToTemperature(300 * unit.kelvin, 7)
    learned = [groupEnergy(simulation.context, GROUP)]
    for _ in range(5):
        simulation.step(2)
        state = simulation.context.getState(getEnergy=True, getPositions=True)
        assert np.isfinite(state.getPotentialEnergy().value_in_unit(KJ))
        assert np.isfinite(state.getKineticEnergy().value_in_unit(KJ))
        assert np.all(np.isfinite(state.getPositions(asNumpy=True)._value))
        learned.append(groupEnergy(simulation.context, GROUP))
    assert simulation.currentStep == 10
    assert np.all(np.isfinite(learned)) and all(e != 0.0 for e in learned)
    # The learned term is part of the total potential energy: total = other groups + learned group.
    others = {g for g in range(32) if g != GROUP}
    total = simulation.context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(KJ)
    parts = groupEnergy(simulation.context, GROUP) + simulation.context.getState(
        getEnergy=True, groups=others).getPotentialEnergy().value_in_unit(KJ)
    assert total == pytest.approx(parts, rel=1e-9, abs=1e-6)


def test_sigma_outside_the_trained_range_is_warned_about_once(capfd):
    """flashipaSigma = 1e-12 nm evaluates (the energy grows as 1/sigma) but says, once per Context, that the model was
    trained on another range; a sigma inside the range says nothing."""
    pdb = app.PDBFile(PROTEIN_PDB)
    system = openmm.System()
    for atom in pdb.topology.atoms():
        system.addParticle(atom.element.mass)
    system.addForce(createForce(pdb.topology))
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(pdb.positions)
    context.getState(getEnergy=True)
    assert "outside the range" not in capfd.readouterr().err
    context.setParameter("flashipaSigma", 1e-12)
    energies = [context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(KJ) for _ in range(2)]
    assert all(np.isfinite(energies))
    err = capfd.readouterr().err
    assert err.count("lies outside the range the model was trained on") == 1, err
