"""FlashIPAForce on the CUDA platform with the shipped structures: CUDA against Reference (the oracle),
and a 1000-step amber14 simulation. Skipped where no GPU (or no CUDA plugin) is available."""

import math

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import pytest

import openmmflashipa
from flashipa_testutils import KJ, PROTEIN_PDB, RNA_PDB, amberSystem, groupEnergy


def cudaUsable():
    if not openmmflashipa.hasPlatformKernels("CUDA"):
        return False
    try:
        system = openmm.System()
        system.addParticle(1.0)
        openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CUDA"))
        return True
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not cudaUsable(), reason="no CUDA GPU / CUDA plugin here")

TOLERANCE = {"double": 1e-6, "mixed": 1e-4}


def evaluate(system, positions, platform, properties=None):
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform),
                             properties or {})
    context.setPositions(positions)
    state = context.getState(getEnergy=True, getForces=True, groups={5})
    return state.getPotentialEnergy().value_in_unit(KJ), state.getForces(asNumpy=True).value_in_unit(KJ / unit.nanometer)


@pytest.mark.parametrize("path", [PROTEIN_PDB, RNA_PDB])
@pytest.mark.parametrize("precision", ["double", "mixed"])
def test_cuda_matches_reference_on_shipped_structures(path, precision):
    """The platform's precision modes with the SDPA path ("auto" runs the fused kernels: below)."""
    topology, positions, system = amberSystem(path)
    force = openmmflashipa.createForce(topology, backend="sdpa")
    force.setForceGroup(5)
    system.addForce(force)
    energyRef, forcesRef = evaluate(system, positions, "Reference")
    energyCuda, forcesCuda = evaluate(system, positions, "CUDA", {"Precision": precision})
    tol = TOLERANCE[precision]
    assert abs(energyCuda - energyRef) <= tol * abs(energyRef)
    assert np.linalg.norm(forcesCuda - forcesRef) <= tol * np.linalg.norm(forcesRef)


# Relative tolerances: the fp32 kernels as the SDPA path in mixed precision; "fused" and "auto" (= fused in
# mixed precision) round the attention's scalar operands and probabilities to fp16 (2^-12 per operand): the
# issue's bar for the default, 2e-3 against Reference double (benchmarks/results/attention_precision_cpu.md
# emulates 7-8e-4 for that rounding alone).
FUSED_TOLERANCE = {"fused-fp32": 1e-4, "fused": 2e-3, "auto": 2e-3}


@pytest.mark.parametrize("path", [PROTEIN_PDB, RNA_PDB])
@pytest.mark.parametrize("backend", ["fused-fp32", "fused", "auto"])
def test_fused_backend_matches_reference_on_shipped_structures(path, backend):
    """The project's fused attention kernels (CUDA, mixed precision; "auto", the default, is "fused" there) against
    the Reference platform's sdpa path in double precision, through createForce on real structures."""
    topology, positions, system = amberSystem(path)
    force = openmmflashipa.createForce(topology, backend=backend)
    force.setForceGroup(5)
    system.addForce(force)
    energyCuda, forcesCuda = evaluate(system, positions, "CUDA", {"Precision": "mixed"})
    force.setAttentionBackend("sdpa")  # the oracle
    energyRef, forcesRef = evaluate(system, positions, "Reference")
    tol = FUSED_TOLERANCE[backend]
    print("%s: energy %.3g, forces %.3g relative" % (backend, abs(energyCuda - energyRef) / abs(energyRef),
                                                    np.linalg.norm(forcesCuda - forcesRef) / np.linalg.norm(forcesRef)))
    assert abs(energyCuda - energyRef) <= tol * abs(energyRef)
    assert np.linalg.norm(forcesCuda - forcesRef) <= tol * np.linalg.norm(forcesRef)


def test_amber14_simulation_runs_1000_steps():
    topology, positions, system = amberSystem(PROTEIN_PDB, solvent="obc2")
    force = openmmflashipa.createForce(topology)
    force.setForceGroup(5)
    system.addForce(force)
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 0.002 * unit.picoseconds)
    simulation = app.Simulation(topology, system, integrator, openmm.Platform.getPlatformByName("CUDA"),
                                {"Precision": "mixed"})
    simulation.context.setPositions(positions)
    simulation.minimizeEnergy(maxIterations=100)
    for _ in range(10):
        simulation.step(100)
        state = simulation.context.getState(getEnergy=True)
        assert math.isfinite(state.getPotentialEnergy().value_in_unit(KJ))
        assert math.isfinite(groupEnergy(simulation.context, 5))
