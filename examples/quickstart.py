#!/usr/bin/env python
"""Quick start: add the learned FlashIPA energy to OpenMM simulations of a protein and an RNA.

For each of the two structures shipped in examples/data (see examples/data/README.md):

1. read the PDB file, add hydrogens and build an Amber14 System (amber14-all.xml with the OBC2 implicit
   solvent of implicit/obc2.xml, or vacuum with --solvent vacuum; no cutoff, hydrogen-bond constraints);
2. add a FlashIPAForce built by openmmflashipa.createForce(), which picks the frame atoms of every
   residue (protein N, CA, C; RNA C3', C4', O4'), and put it in its own force group;
3. print the learned energy (kJ/mol) and the norm of its forces, minimise (a few L-BFGS iterations: enough
   to relax the added hydrogens), and run a short Langevin simulation (LangevinMiddleIntegrator, 2 fs,
   300 K) printing energies every 10 steps.

Runtime: FlashIPAForce has kernels for the Reference platform (and CUDA once that plugin is built), and a
Context runs every force on one platform, so Amber runs on Reference too. There the OBC2 solvent
(a CustomGBForce) dominates: about 0.2 s per evaluation for ~900 atoms, against ~0.01 s for the learned
energy; the whole script takes about 1.5-2 minutes on two CPU cores (--solvent vacuum: a few seconds).

The model shipped with the package was trained by the repo's own trainer (denoising score matching on the
repo's protein + RNA data set, 22,500 steps on one H100; card: models/checkpoints/flashipa-default/README.md).

Usage:  python examples/quickstart.py [--steps 100] [--report-every 10] [--platform auto|Reference|CUDA]
                                      [--minimize-iterations 10] [--solvent obc2|vacuum] [--only protein|rna]
"""

import argparse
import os
import sys
import time

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit

import openmmflashipa

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
FLASHIPA_GROUP = 1  # Amber's forces stay in group 0
TEMPERATURE = 300 * unit.kelvin
TIMESTEP = 2 * unit.femtoseconds  # with constraints=HBonds
FRICTION = 1 / unit.picosecond


def choosePlatform(requested):
    """The platform to use: CUDA where the FlashIPA CUDA plugin is loaded, otherwise Reference.

    FlashIPAForce has kernels only for the platforms whose plugin is loaded (today: Reference; CUDA when
    that plugin is built). Amber's forces would run faster on the CPU platform, but one Context runs all
    forces on one platform, so the choice is set by the FlashIPA force.
    """
    if requested != "auto":
        if not openmmflashipa.hasPlatformKernels(requested):
            sys.exit("FlashIPAForce has no kernels for platform %r" % requested)
        return [requested]
    candidates = [name for name in ("CUDA", "Reference") if openmmflashipa.hasPlatformKernels(name)]
    return candidates


def learnedTerms(context):
    """(learned energy in kJ/mol, norm of the learned forces in kJ/mol/nm) from the FlashIPA force group."""
    state = context.getState(getEnergy=True, getForces=True, groups={FLASHIPA_GROUP})
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoules_per_mole)
    forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoules_per_mole / unit.nanometer)
    return energy, float(np.linalg.norm(forces))


def totalEnergy(context):
    state = context.getState(getEnergy=True)
    return (state.getPotentialEnergy().value_in_unit(unit.kilojoules_per_mole),
            state.getKineticEnergy().value_in_unit(unit.kilojoules_per_mole))


def run(label, pdbFile, forcefield, platforms, args):
    print("\n=== %s: %s ===" % (label, os.path.relpath(pdbFile)))
    pdb = app.PDBFile(pdbFile)
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.addHydrogens(forcefield)
    topology = modeller.topology
    system = forcefield.createSystem(topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds)
    force = openmmflashipa.createForce(topology, temperature=TEMPERATURE)
    force.setForceGroup(FLASHIPA_GROUP)
    system.addForce(force)
    print("%d residues, %d atoms; FlashIPA frames: %d residues" % (
        topology.getNumResidues(), topology.getNumAtoms(), force.getNumResidues()))
    print("model: %s (sha256 %s...)" % (os.path.basename(force.getResolvedModelPath()), force.getModelChecksum()[:16]))
    print("global parameters: %s = %g, %s = %g nm, %s = %g K" % (
        force.Scale(), force.getDefaultScale(), force.Sigma(), force.getDefaultSigma(),
        force.Temperature(), force.getDefaultTemperature()))

    simulation = None
    for name in platforms:
        integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE, FRICTION, TIMESTEP)
        integrator.setRandomNumberSeed(2025)
        try:
            simulation = app.Simulation(topology, system, integrator, openmm.Platform.getPlatformByName(name))
            break
        except Exception as error:  # e.g. CUDA plugin loaded but no usable GPU
            print("platform %s unavailable (%s); trying the next one" % (name, error))
    if simulation is None:
        sys.exit("no platform could run the simulation")
    context = simulation.context
    print("platform:", context.getPlatform().getName())
    context.setPositions(modeller.positions)

    energy, forceNorm = learnedTerms(context)
    print("initial   learned energy %12.3f kJ/mol   |F_learned| %12.3f kJ/mol/nm   total potential %12.1f kJ/mol"
          % (energy, forceNorm, totalEnergy(context)[0]))

    start = time.time()
    simulation.minimizeEnergy(maxIterations=args.minimize_iterations)
    energy, forceNorm = learnedTerms(context)
    print("minimised learned energy %12.3f kJ/mol   |F_learned| %12.3f kJ/mol/nm   total potential %12.1f kJ/mol"
          "   (%.1f s)" % (energy, forceNorm, totalEnergy(context)[0], time.time() - start))

    context.setVelocitiesToTemperature(TEMPERATURE, 2025)
    print("%6s %9s %16s %16s %14s" % ("step", "time/ps", "learned kJ/mol", "potential kJ/mol", "kinetic kJ/mol"))
    start = time.time()
    done = 0
    while done < args.steps:
        n = min(args.report_every, args.steps - done)
        simulation.step(n)
        done += n
        energy, _ = learnedTerms(context)
        potential, kinetic = totalEnergy(context)
        if not all(np.isfinite([energy, potential, kinetic])):
            sys.exit("non-finite energy at step %d" % done)
        print("%6d %9.3f %16.3f %16.1f %14.1f" % (done, done * TIMESTEP.value_in_unit(unit.picosecond),
                                                  energy, potential, kinetic))
    elapsed = time.time() - start
    print("%d steps in %.1f s (%.2f ms/step)" % (args.steps, elapsed, 1000 * elapsed / max(args.steps, 1)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="MD steps per system (default 100)")
    parser.add_argument("--report-every", type=int, default=10, help="print energies every N steps (default 10)")
    parser.add_argument("--minimize-iterations", type=int, default=10,
                        help="L-BFGS iterations of the minimisation (default 10; 0 = until converged)")
    parser.add_argument("--solvent", choices=["obc2", "vacuum"], default="obc2",
                        help="obc2 (default): Amber14 with implicit/obc2.xml; vacuum: no solvent model (fast)")
    parser.add_argument("--platform", default="auto", help="auto (default), Reference or CUDA")
    parser.add_argument("--only", choices=["protein", "rna"], help="run only one of the two systems")
    args = parser.parse_args()

    print("openmm-flashipa quick start (OpenMM %s)" % openmm.__version__)
    print("model: the shipped FlashIPA energy model (card: models/checkpoints/flashipa-default/README.md)")
    platforms = choosePlatform(args.platform)
    if not platforms:
        sys.exit("no OpenMM platform has FlashIPA kernels (plugins loaded: %s)" % openmmflashipa.pluginLibraries)

    files = ["amber14-all.xml"] + (["implicit/obc2.xml"] if args.solvent == "obc2" else [])
    forcefield = app.ForceField(*files)
    print("force field: %s" % " + ".join(files))
    start = time.time()
    if args.only in (None, "protein"):
        run("protein (SH3 domain, PDB 1SHG chain A)", os.path.join(DATA, "protein.pdb"), forcefield, platforms, args)
    if args.only in (None, "rna"):
        run("RNA (BWYV pseudoknot, PDB 1L2X chain A)", os.path.join(DATA, "rna.pdb"), forcefield, platforms, args)
    print("\ndone in %.1f s" % (time.time() - start))


if __name__ == "__main__":
    main()
