"""The plugin inside OpenMM's Python wrappers: a Python MinimizationReporter (OpenMM keeps the GIL during that
minimize(), which LibTorch's autograd engine refuses unless the plugin releases it), and C++ errors reaching
Python as exceptions (checked in a subprocess, so that a crash fails this test instead of the whole run)."""

import os
import subprocess
import sys
import textwrap

import openmm
import openmm.unit as unit
import pytest

import openmmflashipa
from flashipa_testutils import PROTEIN_PDB, amberSystem


def cuda_usable():
    try:
        import torch
        return openmmflashipa.hasPlatformKernels("CUDA") and torch.cuda.is_available()
    except Exception:
        return False


PLATFORMS = ["Reference", pytest.param("CUDA", marks=pytest.mark.skipif(not cuda_usable(), reason="no CUDA GPU"))]


class CountingReporter(openmm.MinimizationReporter):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.energies = []

    def report(self, iteration, x, grad, args):
        self.calls += 1
        self.energies.append(args["system energy"])
        return False


@pytest.mark.parametrize("platform", PLATFORMS)
def test_minimizer_with_a_python_reporter_runs_the_learned_force(platform):
    topology, positions, system = amberSystem(PROTEIN_PDB, solvent="vacuum")
    force = openmmflashipa.createForce(topology)
    force.setForceGroup(1)
    system.addForce(force)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform))
    context.setPositions(positions)
    before = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    reporter = CountingReporter()
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 20, reporter)
    after = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    assert reporter.calls >= 1
    assert after < before


ERROR_SCRIPT = textwrap.dedent("""
    import numpy as np, openmm, openmmflashipa
    system = openmm.System()
    force = openmmflashipa.FlashIPAForce()
    for i in range(4):
        for _ in range(3):
            system.addParticle(12.0)
        force.addResidue(3 * i, 3 * i + 1, 3 * i + 2, 0, 0)
    system.addForce(force)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("{platform}"))
    x = np.array([[0.0, 0.0, 0.0], [0.15, 0.0, 0.0], [0.2, 0.14, 0.0]])
    positions = np.concatenate([x + [0.38 * i, 0.0, 0.0] for i in range(4)])
    positions[7] = positions[6]  # residue 2: c on b
    context.setPositions(positions)
    try:
        context.getState(getEnergy=True, getForces=True)
    except openmm.OpenMMException as error:
        print("RAISED:", error)
""")


def run_error_script(platform):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return subprocess.run([sys.executable, "-c", ERROR_SCRIPT.format(platform=platform)], capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_degenerate_frames_raise_openmm_exception_in_python(platform):
    result = run_error_script(platform)
    assert result.returncode == 0, "crashed (rc %d): %s" % (result.returncode, result.stderr[-2000:])
    assert "RAISED:" in result.stdout and "residue 2" in result.stdout and "coincident" in result.stdout
