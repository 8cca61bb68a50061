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


# Every kind of bad input, through Python, one subprocess per platform: each case must come back as the
# named Python exception with its cause, never a crash (a crash ends the subprocess; the cases it printed
# before show where). The GPU machine runs this file too (scripts/device-check.sh).
BAD_INPUT_SCRIPT = textwrap.dedent("""
    import os, sys, tempfile, warnings
    import numpy as np, openmm, openmm.app as app, openmm.unit as unit, openmmflashipa
    platform = openmm.Platform.getPlatformByName("{platform}")
    x = np.array([[0.0, 0.0, 0.0], [0.15, 0.0, 0.0], [0.2, 0.14, 0.0]])
    good = np.concatenate([x + [0.38 * i, 0.0, 0.0] for i in range(4)])

    def chain(policy="error"):
        system = openmm.System()
        force = openmmflashipa.FlashIPAForce()
        force.setDegenerateFramePolicy(policy)
        for i in range(4):
            for _ in range(3):
                system.addParticle(12.0)
            force.addResidue(3 * i, 3 * i + 1, 3 * i + 2, 0, 0)
        system.addForce(force)
        return system, force

    def evaluate(positions, parameters=(), policy="error"):
        system, force = chain(policy)
        context = openmm.Context(system, openmm.VerletIntegrator(0.001), platform)
        for name, value in parameters:
            context.setParameter(name, value)
        context.setPositions(positions)
        state = context.getState(getEnergy=True, getForces=True)
        return state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole), force, context

    def case(name, action):
        try:
            action()
            print("NOT RAISED:", name, flush=True)
        except Exception as error:
            print("RAISED:", name, "|", type(error).__name__, "|", str(error).replace("\\n", " "), flush=True)

    nan = good.copy(); nan[4, 1] = np.nan
    case("nan coordinate", lambda: evaluate(nan))
    huge = good + 1e30
    case("huge coordinates", lambda: evaluate(huge))
    case("negative sigma", lambda: evaluate(good, [("flashipaSigma", -0.1)]))
    case("infinite sigma", lambda: evaluate(good, [("flashipaSigma", float("inf"))]))
    case("nan scale", lambda: evaluate(good, [("flashipaScale", float("nan"))]))
    with tempfile.TemporaryDirectory() as folder:
        shipped = openmmflashipa.FlashIPAForce().getResolvedModelPath()
        data = open(shipped, "rb").read()
        truncated = os.path.join(folder, "truncated.safetensors")
        open(truncated, "wb").write(data[: len(data) // 2])
        def context_with(path):
            system = openmm.System()
            force = openmmflashipa.FlashIPAForce(path)
            for i in range(4):
                for _ in range(3):
                    system.addParticle(12.0)
                force.addResidue(3 * i, 3 * i + 1, 3 * i + 2, 0, 0)
            system.addForce(force)
            openmm.Context(system, openmm.VerletIntegrator(0.001), platform)
        case("truncated checkpoint", lambda: context_with(truncated))
        header = int.from_bytes(data[:8], "little")
        tampered = os.path.join(folder, "tampered.safetensors")
        open(tampered, "wb").write(data[:8] + data[8:8 + header].replace(b"config.numBlocks", b"config.numBlockz") + data[8 + header:])
        case("tampered checkpoint", lambda: context_with(tampered))
    water = app.Topology()
    residue = water.addResidue("HOH", water.addChain())
    water.addAtom("O", app.element.oxygen, residue)
    case("no usable residue", lambda: openmmflashipa.createForce(water))
    missing = app.Topology()
    residue = missing.addResidue("ALA", missing.addChain())
    for name, element in [("N", app.element.nitrogen), ("C", app.element.carbon)]:
        missing.addAtom(name, element, residue)
    case("residue missing a frame atom", lambda: openmmflashipa.createForce(missing, strict=True))
    collapsed = good.copy(); collapsed[7] = collapsed[6]
    energy, force, context = evaluate(collapsed, policy="skip")
    print("SKIPPED:", force.getNumSkippedResidues(context), "finite" if np.isfinite(energy) else "NOT FINITE", flush=True)
""")

BAD_INPUT_EXPECTED = {
    "nan coordinate": ("OpenMMException", "non-finite"),
    "huge coordinates": ("OpenMMException", "cannot build a frame"),
    "negative sigma": ("OpenMMException", "flashipaSigma must be a positive"),
    "infinite sigma": ("OpenMMException", "flashipaSigma must be a positive"),
    "nan scale": ("OpenMMException", "flashipaScale must be finite"),
    "truncated checkpoint": ("OpenMMException", "truncated.safetensors"),
    "tampered checkpoint": ("OpenMMException", "config.numBlocks"),
    "no usable residue": ("ValueError", "no amino-acid"),
    "residue missing a frame atom": ("ValueError", "missing frame atom(s) CA"),
}


@pytest.mark.parametrize("platform", PLATFORMS)
def test_bad_input_raises_python_exceptions(platform):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    result = subprocess.run([sys.executable, "-c", BAD_INPUT_SCRIPT.format(platform=platform)], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, "crashed (rc %d) after:\n%s\n%s" % (result.returncode, result.stdout, result.stderr[-2000:])
    raised = {}
    for line in result.stdout.splitlines():
        assert not line.startswith("NOT RAISED"), line
        if line.startswith("RAISED:"):
            name, kind, message = [part.strip() for part in line[len("RAISED:"):].split("|", 2)]
            raised[name] = (kind, message)
    for name, (kind, text) in BAD_INPUT_EXPECTED.items():
        assert name in raised, "%s: no exception reported\n%s" % (name, result.stdout)
        assert raised[name][0] == kind and text in raised[name][1], (name, raised[name])
    assert "SKIPPED: 1 finite" in result.stdout, result.stdout
