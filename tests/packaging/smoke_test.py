"""Smoke test of an installed openmmflashipa (scripts/check-wheel.sh runs it in a new virtual environment):
the package imports from the environment's site-packages, reports the repository's version, and evaluates one
FlashIPAForce with the shipped default model on the Reference platform; the openmm-ml entry point is declared.

    python smoke_test.py EXPECTED_VERSION
"""
import math
import os
import sys

import numpy as np
import openmm

import openmmflashipa


def main(expectedVersion):
    package = os.path.dirname(os.path.abspath(openmmflashipa.__file__))
    assert "site-packages" in package, "imported from %s, not from an installed package" % package
    assert openmmflashipa.__version__ == expectedVersion, (openmmflashipa.__version__, expectedVersion)
    for library in openmmflashipa.pluginLibraries:
        assert os.path.dirname(library) == os.path.join(package, "lib"), library

    # Eight alanines: N, CA, C of each, on a gently curved chain (residue type 0 = ALA, one chain).
    system = openmm.System()
    force = openmmflashipa.FlashIPAForce()  # the default model shipped in the package
    positions = []
    frame = np.array([[0.0, 0.0, 0.0], [0.146, 0.0, 0.0], [0.2, 0.142, 0.0]])
    for i in range(8):
        angle = 0.3 * i
        rotation = np.array([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0], [0, 0, 1]])
        origin = np.array([1.2 * math.sin(angle), 1.2 * (1 - math.cos(angle)), 0.15 * i])
        for atom in frame @ rotation.T + origin:
            system.addParticle(12.0)
            positions.append(atom)
        force.addResidue(3 * i, 3 * i + 1, 3 * i + 2, 0, 0)
    system.addForce(force)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(np.array(positions))
    state = context.getState(getEnergy=True, getForces=True)
    energy = state.getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)
    forces = state.getForces(asNumpy=True).value_in_unit(openmm.unit.kilojoule_per_mole / openmm.unit.nanometer)
    assert math.isfinite(energy) and np.all(np.isfinite(forces)), (energy, forces)
    assert np.abs(forces).max() > 0.0
    # openmm-ml finds the potential through the installed distribution's entry point (openmmml need not be
    # installed for the entry point to be declared).
    from importlib.metadata import entry_points
    declared = {e.name: e.value for e in entry_points(group="openmmml.potentials")}
    assert declared.get("flashipa") == "openmmflashipa.mlpotential:FlashIPAPotentialImplFactory", declared
    print("smoke test: openmmflashipa %s from %s, Reference energy %.6f kJ/mol" % (
        openmmflashipa.__version__, package, energy))


if __name__ == "__main__":
    main(sys.argv[1])
