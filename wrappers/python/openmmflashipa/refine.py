"""Refining structures with the learned energy plus a physical model.

``refine(structure)`` takes a generated :class:`~openmmflashipa.structure.Backbone`, a PDB/mmCIF path, or an
``(openmm.app.Topology, positions)`` pair, and chooses one of two levels:

- **all-atom**: when every nucleotide (if any) has all its heavy atoms. PDBFixer completes missing
  protein heavy atoms and adds hydrogens (pH 7); the System is amber14-all + implicit solvent (OBC2 by
  default) + a FlashIPAForce on every protein and RNA residue; minimise, then a short Langevin run, then a
  final minimisation (the quench: the refined model is the local minimum the run ends near, not a 300 K
  snapshot whose bonds sit up to 0.01 nm off their minimum).
- **backbone**: otherwise (generated RNA, or RNA missing base atoms): only the frame atoms move, under the
  FlashIPAForce plus ideal frame geometry (backbone.addFrameRestraints) and a soft repulsion between frame
  atoms of different residues; minimise, then Langevin, then the quench. The other backbone atoms are placed
  from ideal geometry afterwards.

Generated backbones (:class:`Backbone` inputs) first get their frame geometry repaired (repairGeometry).
Residues the model cannot use (ligands, residues missing a frame atom) are named in a warning (all-atom
level keeps them in the force field if amber can template them). Errors name their cause.
"""

import io
import os

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit

from . import backbone as _backbone
from . import progress as _progress
from .generate import choosePlatform, FRAME_MASSES
from .openmmflashipa import FlashIPAForce
from .structure import Backbone, readStructure, writeOpenMM
from .topology import chainSegments, createForce, positionsNm, selectFrameResidues, reportUnusable

DEFAULT_SIGMA = 0.05       # nm: flashipaSigma during refinement (small: the structure is near the data)
REPULSION_DISTANCE = 0.3   # nm: frame atoms of different residues closer than this are pushed apart
REPULSION_K = 10000.0      # kJ/mol/nm^2
QUENCH_ITERATIONS = 100    # L-BFGS iterations of the final minimisation (bonds relax in a few dozen)


class RefinedStructure:
    """The result of :func:`refine`: ``topology``, ``positions`` (Quantity, nm), ``level`` ('all-atom' or
    'backbone'), ``energies`` (kJ/mol: start, minimized, md (end of the Langevin run), final (the returned
    structure: after the quench, if any)), the ``system`` it was refined in, its
    ``frameResidues``, ``particlePositions`` ([N, 3] nm, the System's particles) and, at backbone level, the
    model chain id of each residue (``segments``; None at all-atom level)."""

    def __init__(self, topology, positions, level, energies, system, frameResidues, particlePositions,
                 segments=None):
        self.topology = topology
        self.positions = positions
        self.level = level
        self.energies = energies
        self.system = system
        self.frameResidues = frameResidues
        self.particlePositions = particlePositions
        self.segments = segments

    def write(self, path):
        """Write the refined structure as .pdb or .cif."""
        writeOpenMM(self.topology, self.positions, path)


def _load(structure):
    if isinstance(structure, Backbone):
        topology, positions = structure.toOpenMM()
        return topology, positions
    if isinstance(structure, (str, os.PathLike)):
        return readStructure(structure)
    if isinstance(structure, tuple) and len(structure) == 2:
        return structure
    if hasattr(structure, "topology") and hasattr(structure, "positions"):
        return structure.topology, structure.positions
    raise TypeError("refine() takes a Backbone, a PDB/mmCIF path, an (openmm.app.Topology, positions) pair or an "
                    "object with .topology and .positions, not %s" % type(structure).__name__)


def _incompleteNucleotides(topology):
    """Names of nucleotides missing heavy atoms that amber's templates require."""
    fixer = _fixer(topology, None)
    fixer.missingResidues = {}
    fixer.findMissingAtoms()
    out = []
    for residue, atoms in fixer.missingAtoms.items():
        if residue.name in ("A", "C", "G", "U") and atoms:
            out.append("%s%s (chain %s): %d atoms" % (residue.name, residue.id, residue.chain.id, len(atoms)))
    return out


def _fixer(topology, positions):
    from pdbfixer import PDBFixer
    if positions is None:
        positions = unit.Quantity(np.zeros((topology.getNumAtoms(), 3)), unit.nanometer)
    text = io.StringIO()
    app.PDBFile.writeFile(topology, positions, text, keepIds=True)
    text.seek(0)
    return PDBFixer(pdbfile=text)


def refine(structure, out=None, platform=None, sigma=DEFAULT_SIGMA, scale=1.0, temperature=300.0,
           minimizeIterations=500, steps=1000, implicitSolvent="obc2", level=None, seed=0, modelPath=None,
           progress=True, quench=True):
    """Refine a structure with amber14 + implicit solvent + the learned force (or at backbone level).

    Parameters
    ----------
    structure : Backbone, path, (Topology, positions) or an object with .topology/.positions
    out : str, optional
        write the refined structure here (.pdb or .cif)
    platform : str, optional
        OpenMM platform (default: CUDA if usable, else CPU, else Reference)
    sigma : float, nm
        flashipaSigma during refinement
    scale : float
        flashipaScale (lambda); 0 refines with the physical model alone
    temperature : float, K
        Langevin temperature (and flashipaTemperature)
    minimizeIterations : int
        L-BFGS iterations (0 = until converged)
    steps : int
        Langevin steps after minimisation (2 fs all-atom, 1 fs backbone)
    implicitSolvent : 'obc2' or 'gbn2'
    level : None (choose), 'all-atom' or 'backbone'
    seed : int
        Langevin random seed
    modelPath : str, optional
        a checkpoint; None = the shipped model
    quench : bool
        end with a short minimisation (default), so that the refined structure is a local minimum rather than
        the last frame of the Langevin run

    Returns
    -------
    RefinedStructure
    """
    if implicitSolvent not in ("obc2", "gbn2"):
        raise ValueError("implicitSolvent must be 'obc2' or 'gbn2', not %r" % (implicitSolvent,))
    if level not in (None, "all-atom", "backbone"):
        raise ValueError("level must be None, 'all-atom' or 'backbone', not %r" % (level,))
    if steps < 0 or minimizeIterations < 0:
        raise ValueError("steps and minimizeIterations must be non-negative")
    if isinstance(structure, Backbone):
        structure = repairGeometry(structure, platform)
    topology, positions = _load(structure)
    frames, unusable = selectFrameResidues(topology)
    if not frames:
        raise ValueError("nothing to refine: no amino acid with N, CA, C or nucleotide with C3', C4', O4'")
    if level is None:
        incomplete = _incompleteNucleotides(topology)
        level = "backbone" if incomplete else "all-atom"
    if level == "all-atom":
        result = _refineAllAtom(topology, positions, platform, sigma, scale, temperature, minimizeIterations, steps,
                                implicitSolvent, seed, modelPath, progress, quench)
    else:
        reportUnusable(unusable, False, stacklevel=3)
        result = _refineBackbone(topology, positions, frames, platform, sigma, scale, temperature,
                                 minimizeIterations, steps, seed, modelPath, progress, quench)
    if out:
        result.write(out)
    return result


def repairGeometry(backbone, platform=None):
    """A generated Backbone with its frame geometry repaired: the frame atoms minimised to convergence under
    ideal frame geometry and the soft repulsion alone (no learned force), as one continuous chain.

    Generated chains can have residues whose atoms sit nanometres apart; an all-atom force field started
    from those explodes. Repairing at the level of frame atoms is cheap and leaves the fold to the model."""
    topology, positions = backbone.toOpenMM()
    frames, _ = selectFrameResidues(topology)
    system, start, _ = backboneSystem(frames, positionsNm(positions), withForce=False, segments=[0] * len(frames))
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), choosePlatform(platform))
    context.setPositions(start)
    openmm.LocalEnergyMinimizer.minimize(context, 1.0, 0)
    final = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    return Backbone(np.asarray(final).reshape(-1, 3, 3), backbone.moltype, backbone.residueNames, backbone.chainId)


def _simulate(system, topology, positions, platform, temperature, stepSize, minimizeIterations, steps, seed,
              progress, label, quench):
    # Relax first without the learned force: generated or damaged structures can have degenerate frames
    # (coincident or collinear frame atoms), which the force refuses; bonds from the physical model fix them.
    physical = withoutFlashIPA(system)
    if physical.getNumForces() < system.getNumForces():
        relax = openmm.Context(physical, openmm.VerletIntegrator(0.001), choosePlatform(platform))
        relax.setPositions(positions)
        openmm.LocalEnergyMinimizer.minimize(relax, 10.0, 200)
        positions = relax.getState(getPositions=True).getPositions(asNumpy=True)
        del relax
    integrator = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, 1.0 / unit.picosecond,
                                                 stepSize * unit.picosecond)
    integrator.setRandomNumberSeed(int(seed))
    context = openmm.Context(system, integrator, choosePlatform(platform))
    context.setPositions(positions)
    energies = {"start": context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)}
    # ("start" is after the physical pre-relaxation: the learned energy is undefined before it.)
    with _progress.spinner("%s: minimising (%s)" % (label, context.getPlatform().getName()), enabled=progress):
        openmm.LocalEnergyMinimizer.minimize(context, 1.0, minimizeIterations)
    energies["minimized"] = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(
        unit.kilojoule_per_mole)
    context.setVelocitiesToTemperature(temperature * unit.kelvin, int(seed))
    bar = _progress.bar(steps, "%s: Langevin" % label, enabled=progress)
    chunk = max(1, steps // 20)
    done = 0
    while done < steps:
        n = min(chunk, steps - done)
        integrator.step(n)
        done += n
        bar.update(n)
    bar.close()
    energies["md"] = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    if quench:
        # At 300 K a backbone bond of amber14 (k ~ 2.8e5 kJ/mol/nm^2) fluctuates by sqrt(kT/k) = 0.003 nm, so
        # a snapshot of a few hundred residues almost always has a bond 0.01 nm off; the minimum does not.
        with _progress.spinner("%s: quench" % label, enabled=progress):
            openmm.LocalEnergyMinimizer.minimize(context, 1.0, QUENCH_ITERATIONS)
    state = context.getState(getEnergy=True, getPositions=True)
    energies["final"] = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    final = np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64)
    for key, value in energies.items():
        if not np.isfinite(value):
            raise RuntimeError("refinement produced a non-finite %s energy" % key)
    return final, energies


def withoutFlashIPA(system):
    """A copy of `system` without its FlashIPAForce(s)."""
    from . import FlashIPAForce
    copied = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    for i in reversed(range(copied.getNumForces())):
        if FlashIPAForce.isinstance(copied.getForce(i)):
            copied.removeForce(i)
    return copied


def allAtomSystem(topology, positions, sigma=DEFAULT_SIGMA, scale=1.0, temperature=300.0, implicitSolvent="obc2",
                  modelPath=None, withForce=True):
    """Complete the structure with PDBFixer and build amber14-all + implicit solvent (+ FlashIPAForce in
    force group 1). Returns (system, topology, positions)."""
    fixer = _fixer(topology, positions)
    fixer.findMissingResidues()
    fixer.missingResidues = {}  # never invent missing loops; terminal and internal gaps stay gaps
    fixer.findNonstandardResidues()
    fixer.replaceNonstandardResidues()
    fixer.removeHeterogens(keepWater=False)
    fixer.findMissingAtoms()
    fixer.addMissingAtoms()
    fixer.addMissingHydrogens(7.0)
    forcefield = app.ForceField("amber14-all.xml", "implicit/%s.xml" % implicitSolvent)
    try:
        system = forcefield.createSystem(fixer.topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds)
    except ValueError as error:
        raise ValueError("amber14 cannot parameterise this structure after PDBFixer: %s" % error) from error
    if withForce:
        force = createForce(fixer.topology, modelPath=modelPath, sigma=sigma, scale=scale, temperature=temperature,
                            positions=fixer.positions)
        force.setForceGroup(1)
        system.addForce(force)
    return system, fixer.topology, fixer.positions


def _refineAllAtom(topology, positions, platform, sigma, scale, temperature, minimizeIterations, steps,
                   implicitSolvent, seed, modelPath, progress, quench):
    system, topology, positions = allAtomSystem(topology, positions, sigma, scale, temperature, implicitSolvent,
                                                modelPath, withForce=scale != 0)
    final, energies = _simulate(system, topology, positions, platform, temperature, 0.002, minimizeIterations,
                                steps, seed, progress, "refine all-atom", quench)
    frames, _ = selectFrameResidues(topology)
    return RefinedStructure(topology, unit.Quantity(final, unit.nanometer), "all-atom", energies, system, frames,
                            final)


def backboneSystem(frames, xyz, sigma=DEFAULT_SIGMA, scale=1.0, temperature=300.0, modelPath=None,
                   withForce=True, segments=None):
    """A System of the frame atoms only (residue i = particles 3i..3i+2): FlashIPAForce (group 1), ideal frame
    geometry per molecule type, and a soft repulsion between frame atoms of different residues. Returns
    (system, start positions [3L, 3] nm, segments)."""
    system = openmm.System()
    start = []
    if segments is None:
        segments = chainSegments(frames, xyz)
    force = FlashIPAForce(modelPath or "")
    force.setDefaultSigma(sigma)
    force.setDefaultScale(scale)
    force.setDefaultTemperature(temperature)
    for i, frame in enumerate(frames):
        moltype = "rna" if frame.residueType >= 21 else "protein"
        for k, mass in enumerate(FRAME_MASSES[moltype]):
            system.addParticle(mass)
            start.append(xyz[frame.atoms[k]])
        force.addResidue(3 * i, 3 * i + 1, 3 * i + 2, frame.residueType, segments[i])
    if withForce:
        force.setForceGroup(1)
        system.addForce(force)
    for moltype in ("protein", "rna"):
        chosen = [i for i, f in enumerate(frames) if (f.residueType >= 21) == (moltype == "rna")]
        if chosen:
            chosenFrames = [(3 * i, 3 * i + 1, 3 * i + 2) for i in chosen]
            chosenSegments = [segments[i] for i in chosen]
            _backbone.addFrameRestraints(system, chosenFrames, moltype, chosenSegments)
            if moltype == "protein":
                _backbone.addPeptideRestraints(system, chosenFrames, chosenSegments)
    repulsion = openmm.CustomNonbondedForce("0.5*kRep*step(rRep-r)*(rRep-r)^2")
    repulsion.setName("FrameRepulsion")
    repulsion.addGlobalParameter("kRep", REPULSION_K)
    repulsion.addGlobalParameter("rRep", REPULSION_DISTANCE)
    repulsion.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffNonPeriodic)
    repulsion.setCutoffDistance(REPULSION_DISTANCE)
    for _ in range(system.getNumParticles()):
        repulsion.addParticle([])
    for i in range(len(frames)):  # not within a residue, nor with the neighbouring residue
        for j in range(i, min(i + 2, len(frames))):
            for a in range(3):
                for b in range(3):
                    if i != j or a < b:
                        repulsion.addExclusion(3 * i + a, 3 * j + b)
    system.addForce(repulsion)
    return system, np.array(start), segments


def _refineBackbone(topology, positions, frames, platform, sigma, scale, temperature, minimizeIterations, steps,
                    seed, modelPath, progress, quench):
    xyz = positionsNm(positions)
    system, start, segments = backboneSystem(frames, xyz, sigma, scale, temperature, modelPath, scale != 0)
    final, energies = _simulate(system, None, start, platform, temperature, 0.001, minimizeIterations, steps, seed,
                                progress, "refine backbone", quench)
    topology_out, positions_out = backboneTopology(frames, final.reshape(-1, 3, 3), segments)
    return RefinedStructure(topology_out, positions_out, "backbone", energies, system, frames, final, segments)


def backboneTopology(frames, frameXyz, segments):
    """Rebuild chains (one per segment) with the ideal-geometry backbone atoms: (Topology, positions)."""
    topology = app.Topology()
    positions = []
    order = sorted(set(segments))
    for s in order:
        members = [i for i, seg in enumerate(segments) if seg == s]
        moltype = "rna" if frames[members[0]].residueType >= 21 else "protein"
        names = [frames[i].residue.name for i in members]
        chain_id = frames[members[0]].residue.chain.id or "A"
        sub_topology, sub_positions = Backbone(frameXyz[members], moltype, names, chain_id).toOpenMM()
        chain = topology.addChain(chain_id)
        atom_map = {}
        for residue, i in zip(sub_topology.residues(), members):
            new_residue = topology.addResidue(residue.name, chain, frames[i].residue.id)
            for atom in residue.atoms():
                atom_map[atom] = topology.addAtom(atom.name, atom.element, new_residue)
        for a, b in sub_topology.bonds():
            topology.addBond(atom_map[a], atom_map[b])
        positions.extend(sub_positions.value_in_unit(unit.nanometer))
    return topology, unit.Quantity(np.array(positions), unit.nanometer)
