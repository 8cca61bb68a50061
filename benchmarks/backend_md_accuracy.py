"""What the attention backend costs a simulation: force accuracy and energy conservation on the CUDA platform.

The default backend ("auto") runs the project's fused kernels on CUDA in single and mixed precision, with the
attention's scalar operands (q, k, v, bias and pair factors) rounded to fp16 for the tensor cores and the point
coordinates split into fp16 high and low parts (22 bits). This measures what that rounding does to MD, next to the fp32 paths, on the shipped structures
(examples/data: protein and RNA) with amber14 + OBC2 + FlashIPAForce, NoCutoff, HBonds constraints:

1. energy and forces of the learned force per backend (CUDA, mixed precision) against the Reference platform
   (sdpa, double precision): relative error of the energy and relative RMS error of the force vectors;
2. energy conservation: minimise, 2 ps Langevin at 300 K (seeded), then --nve-ps of NVE (Verlet, 1 fs) from
   the same state for every backend and for the system without the learned force. Reported: the drift of the
   total energy (least-squares slope, kJ/mol per ns per degree of freedom) and its RMS fluctuation about the fit.
   A non-conservative or noisy force shows as a drift above the no-learned-force row.

A benchmark, not a test (the tests bound the errors: tests/cpp/TestCudaFlashIPAForce.cpp,
tests/python/test_cuda_platform.py). Writes a Markdown table (--out) and prints it.

    python benchmarks/backend_md_accuracy.py --nve-ps 10 --out benchmarks/results/backend_md_accuracy_h100.md
"""

import argparse
import datetime
import os
import sys

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit

import openmmflashipa

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "examples", "data")
KJ = unit.kilojoules_per_mole
BACKENDS = ["auto", "fused", "fused-fp32", "sdpa"]
LEARNED_GROUP = 5
PLATFORM, PROPERTIES = "CUDA", {"Precision": "mixed"}


def build(path, withForce, backend="auto"):
    """(topology, positions, system, force): amber14 + OBC2 with hydrogens, optionally with FlashIPAForce in group 5
    (force None without it)."""
    forcefield = app.ForceField("amber14-all.xml", "implicit/obc2.xml")
    pdb = app.PDBFile(path)
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.addHydrogens(forcefield)
    system = forcefield.createSystem(modeller.topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds)
    force = None
    if withForce:
        force = openmmflashipa.createForce(modeller.topology, backend=backend)
        force.setForceGroup(LEARNED_GROUP)
        system.addForce(force)
    return modeller.topology, modeller.positions, system, force


def learnedForce(system, positions, platform, properties=None):
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform), properties or {})
    context.setPositions(positions)
    state = context.getState(getEnergy=True, getForces=True, groups={LEARNED_GROUP})
    return state.getPotentialEnergy().value_in_unit(KJ), state.getForces(asNumpy=True).value_in_unit(KJ / unit.nanometer)


def accuracy(path):
    """Rows (backend, energy error, force error) against Reference sdpa double."""
    topology, positions, system, force = build(path, True, "sdpa")
    energyRef, forcesRef = learnedForce(system, positions, "Reference")
    rows = []
    for backend in BACKENDS:
        force.setAttentionBackend(backend)  # read when the next Context is made
        energy, forces = learnedForce(system, positions, PLATFORM, PROPERTIES)
        rows.append((backend, abs(energy - energyRef) / abs(energyRef), np.linalg.norm(forces - forcesRef) / np.linalg.norm(forcesRef)))
    return rows


def equilibrated(path, seed):
    """Positions and velocities after minimisation and 2 ps of Langevin at 300 K, with the learned force (sdpa)."""
    topology, positions, system, _ = build(path, True, "sdpa")
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 0.002 * unit.picoseconds)
    integrator.setRandomNumberSeed(seed)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(PLATFORM), PROPERTIES)
    context.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 500)
    context.setVelocitiesToTemperature(300 * unit.kelvin, seed)
    integrator.step(1000)
    state = context.getState(getPositions=True, getVelocities=True)
    return state.getPositions(asNumpy=True), state.getVelocities(asNumpy=True)


def conservation(path, backend, positions, velocities, picoseconds, samples=200):
    """(drift kJ/mol/ns/dof, RMS fluctuation kJ/mol, dof) of NVE from the given state; backend None = no learned force."""
    topology, _, system, _ = build(path, backend is not None, backend or "sdpa")
    integrator = openmm.VerletIntegrator(0.001 * unit.picoseconds)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(PLATFORM), PROPERTIES)
    context.setPositions(positions)
    context.setVelocities(velocities)
    steps = int(round(picoseconds / 0.001))
    every = max(1, steps // samples)
    times, energies = [], []
    for done in range(0, steps + 1, every):
        if done:
            integrator.step(every)
        state = context.getState(getEnergy=True)
        times.append(done * 0.001e-3)  # ns
        energies.append((state.getPotentialEnergy() + state.getKineticEnergy()).value_in_unit(KJ))
    times, energies = np.array(times), np.array(energies)
    slope, intercept = np.polyfit(times, energies, 1)
    dof = 3 * system.getNumParticles() - system.getNumConstraints() - 3
    return slope / dof, float(np.sqrt(np.mean((energies - (slope * times + intercept)) ** 2))), dof


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nve-ps", type=float, default=10.0, help="NVE length per backend (ps)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=None, help="Markdown file to write")
    args = parser.parse_args()
    if not openmmflashipa.hasPlatformKernels("CUDA"):
        sys.exit("backend_md_accuracy: needs the CUDA platform with the plugin's CUDA kernels")
    import torch
    lines = ["# The attention backend in MD: force accuracy and energy conservation (CUDA, mixed precision)", "",
             "- GPU: %s; OpenMM %s; torch %s; %s" % (torch.cuda.get_device_name(0), openmm.__version__, torch.__version__,
                                                    datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
             "- command: `python benchmarks/backend_md_accuracy.py --nve-ps %g --seed %d`" % (args.nve_ps, args.seed),
             "- systems: examples/data protein.pdb and rna.pdb, amber14 + OBC2 + FlashIPAForce (shipped model), NoCutoff, HBonds;"
             " auto = the default (fused kernels, fp16 scalar operands, points as fp16 hi + lo), fused-fp32 = the same kernels in fp32,"
             " sdpa = the published algorithm (fp32 memory-efficient attention)", ""]
    for name in ("protein", "rna"):
        path = os.path.join(DATA, name + ".pdb")
        lines += ["## %s" % name, "", "| backend | learned energy rel. error | learned force rel. RMS error | NVE drift (kJ/mol/ns/dof) | NVE RMS fluctuation (kJ/mol) |",
                  "|---|---:|---:|---:|---:|"]
        errors = {backend: (e, f) for backend, e, f in accuracy(path)}
        positions, velocities = equilibrated(path, args.seed)
        for backend in BACKENDS + [None]:
            drift, rms, dof = conservation(path, backend, positions, velocities, args.nve_ps)
            e, f = errors.get(backend, (None, None))
            cell = lambda x: "—" if x is None else "%.2e" % x
            lines.append("| %s | %s | %s | %+.4f | %.3f |" % (backend or "no learned force", cell(e), cell(f), drift, rms))
            print(lines[-1], flush=True)
        lines += ["", "%d degrees of freedom; %g ps NVE (Verlet 1 fs) from one equilibrated state." % (dof, args.nve_ps), ""]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
