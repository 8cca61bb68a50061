"""Refining structures with the learned energy plus a physical model.

``refine(structure)`` takes a generated :class:`~openmmflashipa.structure.Backbone`, a PDB/mmCIF path, or an
``(openmm.app.Topology, positions)`` pair, and chooses one of two levels:

- **all-atom**: unless a nucleotide lacks base atoms. Everything that is not the polymer (ligands, ions,
  waters, ...) is set aside first (splitHetero) and kept fixed or removed (``hetero``). Chains are split at gaps
  (missing residues: :func:`~openmmflashipa.topology.findGaps`), so that each piece gets its own termini and
  nothing pulls the ends of a gap together; PDBFixer then completes missing heavy atoms (never missing
  residues) and adds hydrogens (pH 7). The System is amber14-all + implicit solvent (OBC2 by default, as
  OpenMM's native ``GBSAOBCForce`` with mbondi2 radii; GBn2 as amber14's ``CustomGBForce``) + a FlashIPAForce
  on every protein and RNA residue.
- **backbone**: otherwise (generated RNA, or RNA missing base atoms): only the frame atoms move, under the
  FlashIPAForce plus ideal frame geometry (backbone.addFrameRestraints) and a soft repulsion between frame
  atoms of different residues. The other backbone atoms are placed from ideal geometry afterwards.

Both levels run the same protocol: a minimisation without the learned force (it refuses degenerate frames),
a minimisation with it, and then, by ``protocol``: nothing more (``'minimize'``, the default: on perturbed
native proteins it ends closest to the native, ``docs/WORKFLOWS.md``), a short Langevin run with the backbone
heavy atoms restrained to the minimised positions (``'restrained'``), a Langevin run cooled from 100 K to 0 K
(``'anneal'``) or an unrestrained Langevin run at ``temperature`` (``'md'``); the three with MD end with a
quench (a short minimisation).

Generated backbones (:class:`Backbone` inputs, and files that hold one: looksGenerated) first get their frame
geometry repaired (repairGeometry, repairFrames). The result says what was left out (``leftOut``), what was
changed (``notes``), how far the structure moved (``rmsdFromInput``) and each force's energy (``energyTerms``).
Errors name their cause.
"""

import collections
import io
import os
import random
import warnings

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit

from . import backbone as _backbone
from . import progress as _progress
from .generate import choosePlatform, FRAME_MASSES
from .openmmflashipa import FlashIPAForce
from .structure import Backbone, readStructure, writeOpenMM
from .topology import (chainSegments, createForce, positionsNm, selectFrameResidues, reportUnusable,
                       splitAtGaps, _isWaterOrIon, _polymerType, FIRST_NUCLEOTIDE)
# flashipaSigma during refinement: the force's default, small because the structure is near the data.
from .topology import DEFAULT_SIGMA
REPULSION_DISTANCE = 0.3   # nm: frame atoms of different residues closer than this are pushed apart
REPULSION_K = 10000.0      # kJ/mol/nm^2
QUENCH_ITERATIONS = 100    # L-BFGS iterations of the final minimisation (bonds relax in a few dozen)
PRERELAX_ITERATIONS = 200  # L-BFGS iterations without the learned force before it is switched on
PRERELAX_TOLERANCE = 10.0  # kJ/mol/nm
MINIMIZE_TOLERANCE = 1.0   # kJ/mol/nm

#: Refinement protocols (see refine). Every one starts with the two minimisations.
PROTOCOLS = ("minimize", "restrained", "anneal", "md")
DEFAULT_PROTOCOL = "minimize"
#: MD steps each protocol runs by default (2 fs all-atom, 1 fs backbone).
DEFAULT_STEPS = {"minimize": 0, "restrained": 1000, "anneal": 1000, "md": 1000}
RESTRAINT_K = 1000.0       # kJ/mol/nm^2: 'restrained' protocol, backbone heavy atoms to the minimised positions
ANNEAL_TEMPERATURE = 100.0  # K: 'anneal' protocol starts here and cools linearly to 0 K
#: Backbone heavy atoms held by the 'restrained' protocol (all particles at backbone level).
BACKBONE_ATOMS = frozenset(["N", "CA", "C", "O", "OXT", "P", "OP1", "OP2", "O5'", "C5'", "C4'", "O4'", "C3'",
                            "O3'", "C2'", "C1'"])
#: What refine does with heterogens (ligands, ions, waters, ...): see refine(hetero=).
HETERO_POLICIES = ("fixed", "remove")
DEFAULT_HETERO = "fixed"
HETERO_CONTACT = 0.3   # nm: polymer heavy atoms are held at least min(this, input distance) from fixed heterogens
HETERO_LIST = 0.6      # nm: polymer-heterogen heavy-atom pairs closer than this in the input get a wall
HETERO_WALL_K = 50000.0  # kJ/mol/nm^2
#: Implicit solvent constants of the native OBC2 force (amber14's implicit/obc2.xml uses the same).
SOLVENT_DIELECTRIC = 78.5
SOLUTE_DIELECTRIC = 1.0


class RefinedStructure:
    """The result of :func:`refine`: ``topology``, ``positions`` (Quantity, nm), ``level`` ('all-atom' or
    'backbone'), ``protocol``, ``energies`` (kJ/mol: start (after the pre-relaxation without the learned
    force), minimized, md (end of the Langevin run; protocols with MD only), final (the returned structure)),
    the ``system`` it was refined in, its ``frameResidues``, ``particlePositions`` ([N, 3] nm, the System's
    particles), the model chain id of each frame residue (``segments``), the input's ``gaps`` (pairs of
    residue descriptions where a chain was split, see topology.findGaps), ``notes`` (what refine changed
    in the input before refining it, in words), ``leftOut`` (residues and atoms not refined: kept fixed, removed,
    or outside the learned force, each with the reason), ``rmsdFromInput`` (nm, polymer heavy atoms matched by
    chain, residue and atom name, no superposition) over ``rmsdAtoms`` atoms, and ``energyTerms`` ({'start' |
    'final': {force name: kJ/mol}}, the System's forces one by one), and ``skippedFrameEvaluations`` (backbone
    level: residue evaluations the learned force left out because a frame passed through a degenerate shape
    on the way; the result itself has none)."""

    def __init__(self, topology, positions, level, energies, system, frameResidues, particlePositions,
                 segments=None, protocol=None, gaps=(), notes=()):
        self.topology = topology
        self.positions = positions
        self.level = level
        self.energies = energies
        self.system = system
        self.frameResidues = frameResidues
        self.particlePositions = particlePositions
        self.segments = segments
        self.protocol = protocol
        self.gaps = list(gaps)
        self.notes = list(notes)
        self.leftOut = []
        self.rmsdFromInput = None
        self.rmsdAtoms = 0
        self.energyTerms = {}
        self.skippedFrameEvaluations = 0

    def write(self, path):
        """Write the refined structure as .pdb or .cif."""
        writeOpenMM(self.topology, self.positions, path)


def _load(structure, keepWater=False):
    if isinstance(structure, Backbone):
        topology, positions = structure.toOpenMM()
        return topology, positions
    if isinstance(structure, (str, os.PathLike)):
        return readStructure(structure, keepWater=keepWater)
    if isinstance(structure, tuple) and len(structure) == 2:
        return structure
    if hasattr(structure, "topology") and hasattr(structure, "positions"):
        return structure.topology, structure.positions
    raise TypeError("refine() takes a Backbone, a PDB/mmCIF path, an (openmm.app.Topology, positions) pair or an "
                    "object with .topology and .positions, not %s" % type(structure).__name__)


#: Sugar-phosphate atoms of a nucleotide: PDBFixer may add these when missing; a missing base atom (anything
#: else) means the nucleotide has no base to refine all-atom (generated RNA), and PDBFixer would invent one.
NUCLEOTIDE_BACKBONE_ATOMS = frozenset(["P", "OP1", "OP2", "OP3", "O5'", "C5'", "C4'", "O4'", "C3'", "O3'", "C2'",
                                       "O2'", "C1'"])


def _incompleteNucleotides(topology):
    """Descriptions of nucleotides missing base atoms (which amber's templates require and PDBFixer would have to
    invent): their presence sends refine to backbone level."""
    fixer = _fixer(topology, None)
    fixer.missingResidues = {}
    fixer.findMissingAtoms()
    out = []
    for residue, atoms in fixer.missingAtoms.items():
        base = [a.name for a in atoms if a.name not in NUCLEOTIDE_BACKBONE_ATOMS]
        if residue.name in ("A", "C", "G", "U") and base:
            out.append("%s%s (chain %s): %d base atom(s) missing" % (residue.name, residue.id, residue.chain.id,
                                                                    len(base)))
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
           minimizeIterations=500, steps=None, implicitSolvent="obc2", level=None, seed=0, modelPath=None,
           progress=True, quench=True, protocol=None, restraintK=RESTRAINT_K, annealTemperature=ANNEAL_TEMPERATURE,
           hetero=DEFAULT_HETERO):
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
        flashipaTemperature, and the Langevin temperature of protocol 'md' and of 'restrained'
    minimizeIterations : int
        L-BFGS iterations of the minimisation with the learned force (0 = until converged)
    steps : int, optional
        Langevin steps (2 fs all-atom, 1 fs backbone); default DEFAULT_STEPS[protocol] (1000; 0 for
        'minimize', which takes no other value)
    implicitSolvent : 'obc2' (native GBSAOBCForce) or 'gbn2' (amber14's CustomGBForce)
    level : None (choose), 'all-atom' or 'backbone'
    seed : int
        seeds the Langevin steps and the all-atom preparation (the hydrogens and heavy atoms PDBFixer adds), so
        the same input and seed give the same starting structure
    modelPath : str, optional
        a checkpoint; None = the shipped model
    quench : bool
        end the protocols with MD with a short minimisation (default), so that the refined structure is a local
        minimum rather than the last frame of the Langevin run
    protocol : None or one of PROTOCOLS
        after the two minimisations: 'minimize' (stop; the default, DEFAULT_PROTOCOL), 'restrained' (Langevin at
        `temperature` with the backbone heavy atoms held to the minimised positions by `restraintK`),
        'anneal' (Langevin cooled linearly from `annealTemperature` to 0 K) or 'md' (unrestrained Langevin at
        `temperature`: this moves a native structure away from its native; kept for generated backbones)
    restraintK : float, kJ/mol/nm^2
        'restrained' protocol only
    annealTemperature : float, K
        'anneal' protocol only
    hetero : 'fixed' (default, DEFAULT_HETERO) or 'remove'
        what happens to everything that is not the polymer (ligands, ions, waters, phosphates without their
        nucleotide, residues neither amber14 nor PDBFixer knows): 'fixed' keeps them where they are, writes them
        back unchanged and holds the polymer off them (a wall at each polymer-heterogen heavy-atom distance of
        the input, up to HETERO_CONTACT; no charges, no solvation: amber14 cannot parameterise arbitrary
        ligands); 'remove' leaves them out of the result. Either way ``leftOut`` names them. The polymer stays
        all-atom whatever else is in the file.

    Returns
    -------
    RefinedStructure
    """
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError("sigma must be a positive number of nm (the model was trained on 0.01-2 nm), not %r"
                         % (sigma,))
    if not (np.isfinite(scale) and scale >= 0):
        raise ValueError("scale must be a finite number >= 0, not %r" % (scale,))
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError("temperature must be a positive number of K, not %r" % (temperature,))
    if implicitSolvent not in ("obc2", "gbn2"):
        raise ValueError("implicitSolvent must be 'obc2' or 'gbn2', not %r" % (implicitSolvent,))
    if hetero not in HETERO_POLICIES:
        raise ValueError("hetero must be one of %s, not %r" % (", ".join(HETERO_POLICIES), hetero))
    if level not in (None, "all-atom", "backbone"):
        raise ValueError("level must be None, 'all-atom' or 'backbone', not %r" % (level,))
    protocol = DEFAULT_PROTOCOL if protocol is None else protocol
    if protocol not in PROTOCOLS:
        raise ValueError("protocol must be one of %s, not %r" % (", ".join(PROTOCOLS), protocol))
    steps = DEFAULT_STEPS[protocol] if steps is None else int(steps)
    if steps < 0 or minimizeIterations < 0:
        raise ValueError("steps and minimizeIterations must be non-negative")
    if protocol == "minimize" and steps != 0:
        raise ValueError("protocol 'minimize' runs no MD, but steps=%d was given: pass protocol='restrained', "
                         "'anneal' or 'md' to run Langevin steps" % steps)
    settings = dict(temperature=temperature, minimizeIterations=minimizeIterations, steps=steps, seed=seed,
                    progress=progress, quench=quench, protocol=protocol, restraintK=restraintK,
                    annealTemperature=annealTemperature, platform=platform)
    notes = []
    if isinstance(structure, Backbone):
        structure = repairGeometry(structure, platform)
    topology, positions = _load(structure, keepWater=True)
    inputTopology, inputPositions = topology, positions
    topology, gaps = splitAtGaps(topology, positions)
    if not isinstance(structure, Backbone) and looksGenerated(topology):
        # A generated backbone read back from its file: repair it as a Backbone would be (its links can be
        # nanometres long and its peptides cis; amber14 started from that keeps them cis).
        topology, positions = repairFrames(topology, positions, platform)
        notes.append("the input is a generated backbone (poly-GLY / base-less poly-U, backbone atoms only): its "
                     "frame geometry was repaired first (ideal bonds, trans peptides), as for a Backbone")
    checkDuplicateAtoms(topology)
    checkCoincidentAtoms(topology, positions)
    frames, unusable = selectFrameResidues(topology)
    if not frames:
        raise ValueError("nothing to refine: no amino acid with N, CA, C or nucleotide with C3', C4', O4'")
    polymer, others, stripped = splitHetero(topology, positions)
    if level is None:
        incomplete = _incompleteNucleotides(polymer[0])
        level = "backbone" if incomplete else "all-atom"
        if incomplete:
            message = ("refined at backbone level (frame atoms only), not all-atom: %d nucleotide(s) have no complete "
                       "base, which amber14 needs and PDBFixer would have to invent: %s" % (
                           len(incomplete), "; ".join(incomplete[:10]) + (" ..." if len(incomplete) > 10 else "")))
            if not looksGenerated(topology):  # generated RNA has no bases by design: nothing to warn about
                warnings.warn(message, stacklevel=2)
            notes.append(message)
    if level == "all-atom":
        result = _refineAllAtom(polymer, others, sigma, scale, implicitSolvent, modelPath, settings, hetero)
    else:
        reportUnusable(unusable, False, stacklevel=3)
        result = _refineBackbone(topology, positions, frames, sigma, scale, modelPath, settings)
        result.leftOut += _describeOthers(others[0], hetero, "kept unchanged, not refined at backbone level")
        if hetero == "fixed" and others[0]:
            result.topology, result.positions = _appendResidues(result.topology, result.positions, others)
    result.gaps = [(_describeResidue(a), _describeResidue(b)) for a, b in gaps]
    result.notes = notes + result.notes
    if level == "all-atom":
        result.leftOut = stripped + result.leftOut
    result.rmsdFromInput, result.rmsdAtoms = rmsdFromInput(inputTopology, inputPositions, result.topology,
                                                           result.positions)
    if out:
        result.write(out)
    return result


#: Atoms closer than this (nm) are taken as coincident (one point written twice); noisy input (0.1 nm per
#: coordinate) brings atoms to 0.01-0.05 nm now and then, which minimisation mends.
COINCIDENT_DISTANCE = 0.001


def checkCoincidentAtoms(topology, positions, distance=COINCIDENT_DISTANCE):
    """ValueError naming the first pairs of atoms (atom, residue, chain) closer than `distance` (nm): no force
    field or hydrogen placement survives two atoms at one point (PDBFixer divided by zero on them)."""
    xyz = positionsNm(positions)
    atoms = list(topology.atoms())
    cells = {}
    for i, key in enumerate(map(tuple, np.floor(xyz / distance).astype(np.int64))):
        cells.setdefault(key, []).append(i)
    pairs = []
    offsets = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)]
    for (x, y, z), members in cells.items():
        for dx, dy, dz in offsets:
            for j in cells.get((x + dx, y + dy, z + dz), ()):
                for i in members:
                    if i < j and np.linalg.norm(xyz[i] - xyz[j]) < distance:
                        pairs.append((i, j))
    if pairs:
        pairs.sort()
        listed = "; ".join("%s of %s and %s of %s, %.3f nm apart" % (
            atoms[i].name, _describeResidue(atoms[i].residue), atoms[j].name, _describeResidue(atoms[j].residue),
            np.linalg.norm(xyz[i] - xyz[j])) for i, j in pairs[:5])
        more = "" if len(pairs) <= 5 else " (and %d more pairs)" % (len(pairs) - 5)
        raise ValueError("%d pair(s) of atoms closer than %g nm: %s%s" % (len(pairs), distance, listed, more))


def checkDuplicateAtoms(topology):
    """ValueError naming every residue (name, number, chain) with two atoms of one name: PDBFixer and amber14 keep
    one of them without a word (a second CA, from alternate locations without ids or two residues under one
    number, was dropped), so which one is refined would be an accident of the file's order."""
    found = []
    for residue in topology.residues():
        counts = collections.Counter(atom.name for atom in residue.atoms())
        twice = sorted(name for name, count in counts.items() if count > 1)
        if twice:
            found.append("%s: %s" % (_describeResidue(residue), ", ".join("%d atoms named %s" % (counts[n], n)
                                                                         for n in twice)))
    if found:
        more = "" if len(found) <= 10 else "; ... and %d more residues" % (len(found) - 10)
        raise ValueError("residue(s) with duplicate atom names (alternate locations without altloc ids, or two "
                         "residues under one number?): %s%s; keep one of each" % ("; ".join(found[:10]), more))


def _describeResidue(residue):
    return "%s %s%s (chain %s)" % (residue.name, residue.id, getattr(residue, "insertionCode", "").strip(),
                                   residue.chain.id)


#: Atoms of residues as Backbone.write writes them (generated naming, see structure.py).
_GENERATED_ATOMS = {"GLY": frozenset(["N", "CA", "C", "O", "OXT"]),
                    "U": frozenset(["P", "OP1", "OP2", "O5'", "C5'", "C4'", "O4'", "C3'", "O3'", "C2'", "O2'",
                                    "C1'"])}


#: Modified nucleotides refined as their parent (PDBFixer maps nucleotides only through MODRES records, which
#: do not survive the way structures reach it): methylations and similar changes that keep the parent's atom
#: names where the parent has them. PDBFixer then deletes the extra atoms and adds missing ones. Pseudouridine
#: (PSU) is not here: its base is attached through C5, so U's atoms by name would be a different molecule
#: (PSEUDOURIDINE_AS_URIDINE renames it instead).
MODIFIED_NUCLEOTIDES = {"5MC": "C", "OMC": "C", "5MU": "U", "OMU": "U", "H2U": "U", "4SU": "U", "OMG": "G",
                        "2MG": "G", "M2G": "G", "7MG": "G", "1MG": "G", "1MA": "A", "A2M": "A", "6MA": "A"}

#: Pseudouridine (PSU) is uridine's isomer with the ring attached to C1' through C5 instead of N1. Walking
#: the ring from the glycosidic atom, PSU's C5-C4-N3-C2-N1-C6 is U's N1-C2-N3-C4-C5-C6, with O4 and O2 (and
#: the hydrogen on N1) exchanging places likewise; so a PSU is refined as a U by renaming its ring atoms, with
#: the two ring atoms whose element differs (PSU's C5 and N1) taking U's elements. Name -> (name, element).
PSEUDOURIDINE_AS_URIDINE = {"C5": ("N1", "N"), "C4": ("C2", "C"), "O4": ("O2", "O"), "N3": ("N3", "N"),
                            "C2": ("C4", "C"), "O2": ("O4", "O"), "N1": ("C5", "C"), "C6": ("C6", "C"),
                            "H1": ("H5", "H"), "H3": ("H3", "H"), "H6": ("H6", "H")}


def _pseudouridinesAsUridines(topology):
    """Renames every PSU residue of `topology` (in place) as a U (PSEUDOURIDINE_AS_URIDINE); returns the
    descriptions of the residues renamed."""
    renamed = []
    for residue in topology.residues():
        if residue.name.strip().upper() != "PSU":
            continue
        renamed.append(_describeResidue(residue))
        for atom in residue.atoms():
            if atom.name in PSEUDOURIDINE_AS_URIDINE:
                name, symbol = PSEUDOURIDINE_AS_URIDINE[atom.name]
                atom.name, atom.element = name, app.Element.getBySymbol(symbol)
        residue.name = "U"
    return renamed


#: Nucleoside triphosphates at a chain's 5' end: the nucleotide, with its triphosphate removed.
TRIPHOSPHATES = {"ATP": "A", "CTP": "C", "GTP": "G", "UTP": "U"}
#: 5' phosphate and triphosphate atoms of a first nucleotide (amber14's 5' templates have none).
FIVE_PRIME_PHOSPHATE = frozenset(["P", "OP1", "OP2", "OP3", "O1P", "O2P", "O3P", "PA", "PB", "PG", "O1A", "O2A",
                                  "O3A", "O1B", "O2B", "O3B", "O1G", "O2G", "O3G", "HOP2", "HOP3", "HO3P", "H5T"])
PHOSPHATE_ATOMS = frozenset(["P", "OP1", "OP2", "OP3", "O1P", "O2P", "O3P", "O1", "O2", "O3", "O4"])


def _pdbfixerKnows(name):
    """Whether a residue name reaches amber14 through PDBFixer: its own tables, or our mapping of modified
    nucleotides to their parents (MODIFIED_NUCLEOTIDES by name, PSU by PSEUDOURIDINE_AS_URIDINE)."""
    from pdbfixer.pdbfixer import proteinResidues, rnaResidues, dnaResidues, substitutions
    return (name in proteinResidues or name in rnaResidues or name in dnaResidues or name in ("N", "UNK")
            or name in substitutions or name in MODIFIED_NUCLEOTIDES or name == "PSU")


def splitHetero(topology, positions):
    """Separate the polymer that refine can make all-atom from everything else.

    Returns ((topology, positions) of the polymer, (list of (residue, reason) for the rest, the input's [N, 3]
    nm positions), list of descriptions of atoms removed from polymer residues). The rest: waters, ions,
    phosphates without their nucleotide (a 3' phosphate written as its own residue), and residues neither
    amber14 nor PDBFixer knows (ligands, caps, unmapped modified residues). In the polymer, the first nucleotide
    of each chain, and one after a residue set aside, loses its 5' phosphate or triphosphate (a nucleoside
    triphosphate there becomes its nucleotide), as amber14's 5' templates have none. The polymer keeps chain ids, residue ids and bonds; it is
    split again at the holes the rest leaves (splitAtGaps)."""
    import openmm.app as app_
    xyz = positionsNm(positions)
    others, removed, keep = [], [], []
    for chain in topology.chains():
        residues = list(chain.residues())
        nucleotides = [r for r in residues if _polymerType(r) == "rna" or r.name.strip().upper() in TRIPHOSPHATES]
        for residue in residues:
            name = residue.name.strip().upper()
            atomNames = {a.name for a in residue.atoms()}
            if _isWaterOrIon(residue):
                others.append((residue, "ion" if len(list(residue.atoms())) == 1 and name not in
                               ("HOH", "WAT", "H2O", "DOD") else "water"))
            elif atomNames <= PHOSPHATE_ATOMS and "P" in atomNames:
                others.append((residue, "a phosphate without its nucleotide (3' or 5' phosphate)"))
            elif name in TRIPHOSPHATES and len(nucleotides) > 1:
                keep.append((residue, TRIPHOSPHATES[name]))
            elif _pdbfixerKnows(name):
                keep.append((residue, None))
            else:
                others.append((residue, "no amber14 template (ligand, cap or unmapped modified residue)"))
    out = app_.Topology()
    atoms, chains, kept = {}, {}, []
    # A nucleotide starts a chain in the polymer when it is its chain's first kept residue or follows a residue
    # set aside (an unmapped modified nucleotide in mid-chain splits the chain there).
    firstNucleotide = set()
    keptResidues = {residue for residue, _ in keep}
    for chain in topology.chains():
        previousKept = False
        for residue in chain.residues():
            isNucleotide = _polymerType(residue) == "rna" or residue.name.strip().upper() in TRIPHOSPHATES
            if residue in keptResidues and isNucleotide and not previousKept:
                firstNucleotide.add(residue)
            previousKept = residue in keptResidues
    for residue, rename in keep:
        if residue.chain not in chains:
            chains[residue.chain] = out.addChain(residue.chain.id)
        newResidue = out.addResidue(rename or residue.name, chains[residue.chain], residue.id,
                                    getattr(residue, "insertionCode", ""))
        stripped = []
        for atom in residue.atoms():
            if residue in firstNucleotide and atom.name in FIVE_PRIME_PHOSPHATE:
                stripped.append(atom.name)
                continue
            atoms[atom] = out.addAtom(atom.name, atom.element, newResidue, atom.id)
            kept.append(atom.index)
        if stripped:
            removed.append("%s: 5' %s atoms %s removed (amber14's 5' templates have none)%s" % (
                _describeResidue(residue), "triphosphate" if "PB" in stripped else "phosphate", ", ".join(stripped),
                "; refined as %s" % rename if rename else ""))
    for a, b in topology.bonds():
        if a in atoms and b in atoms:
            out.addBond(atoms[a], atoms[b])
    polymerPositions = unit.Quantity(xyz[kept], unit.nanometer)
    out, _ = splitAtGaps(out, polymerPositions)
    return (out, polymerPositions), (others, xyz), removed


def _describeOthers(residues, hetero, fixed="kept fixed and written back unchanged"):
    """leftOut lines for the residues splitHetero set aside: one per residue, waters counted in one line."""
    what = fixed if hetero == "fixed" else "removed"
    waters = [r for r, why in residues if why == "water"]
    lines = ["%s: %s, %s" % (_describeResidue(r), why, what) for r, why in residues if why != "water"]
    if waters:
        lines.append("%d water(s) (%s ... %s): %s" % (len(waters), _describeResidue(waters[0]),
                                                       _describeResidue(waters[-1]), what))
    return lines


def _appendResidues(topology, positions, others):
    """`topology` and `positions` with the residues of `others` (from splitHetero) appended unchanged, each input
    chain's in a chain of its id."""
    import openmm.app as app_
    residues, xyz = others
    extra = app_.Topology()
    chains, atoms, extraXyz = {}, {}, []
    for residue, _ in residues:
        if residue.chain not in chains:
            chains[residue.chain] = extra.addChain(residue.chain.id)
        newResidue = extra.addResidue(residue.name, chains[residue.chain], residue.id,
                                      getattr(residue, "insertionCode", ""))
        for atom in residue.atoms():
            atoms[atom] = extra.addAtom(atom.name, atom.element, newResidue, atom.id)
            extraXyz.append(xyz[atom.index])
    for bond in residues[0][0].chain.topology.bonds() if residues else ():
        if bond[0] in atoms and bond[1] in atoms:
            extra.addBond(atoms[bond[0]], atoms[bond[1]])
    modeller = app.Modeller(topology, positions)
    modeller.add(extra, unit.Quantity(np.array(extraXyz), unit.nanometer))
    return modeller.topology, unit.Quantity(positionsNm(modeller.positions), unit.nanometer)


def _heavy(atom):
    return atom.element is None or atom.element.symbol != "H"


def heteroWall(topology, positions, fixedXyz, contact=HETERO_CONTACT, listDistance=HETERO_LIST, k=HETERO_WALL_K):
    """A CustomExternalForce (name 'HeteroWall') that keeps each heavy atom of `topology` at least
    min(`contact`, its input distance) from each fixed heavy-atom position of `fixedXyz` ([M, 3] nm) closer than
    `listDistance` in the input: the fixed heterogens as excluded volume, at no energy in the input itself."""
    xyz = positionsNm(positions)
    fixedXyz = np.asarray(fixedXyz, dtype=np.float64).reshape(-1, 3)
    wall = openmm.CustomExternalForce("0.5*kHet*step(r0-d)*(r0-d)^2; d=sqrt((x-hx)^2+(y-hy)^2+(z-hz)^2)")
    wall.setName("HeteroWall")
    wall.addGlobalParameter("kHet", float(k))
    for name in ("hx", "hy", "hz", "r0"):
        wall.addPerParticleParameter(name)
    heavy = [a.index for a in topology.atoms() if _heavy(a)]
    if len(fixedXyz) == 0:
        return wall
    for start in range(0, len(heavy), 512):
        chunk = heavy[start:start + 512]
        distances = np.linalg.norm(xyz[chunk][:, None, :] - fixedXyz[None, :, :], axis=2)
        for i, j in zip(*np.nonzero(distances < listDistance)):
            wall.addParticle(int(chunk[i]), [float(v) for v in fixedXyz[j]] + [min(contact, float(distances[i, j]))])
    return wall


def rmsdFromInput(inputTopology, inputPositions, topology, positions):
    """(RMSD in nm, atom count) between the input and the refined structure over polymer heavy atoms matched by
    (chain id, residue id, insertion code, atom name), without superposition (refinement keeps the frame);
    (None, 0) when no atom matches."""
    def table(top, pos):
        xyz = positionsNm(pos)
        out = {}
        for atom in top.atoms():
            if _heavy(atom) and _polymerType(atom.residue) is not None:
                key = (atom.residue.chain.id, atom.residue.id, (getattr(atom.residue, "insertionCode", "") or "").strip(),
                       atom.name)
                out.setdefault(key, xyz[atom.index])
        return out
    before, after = table(inputTopology, inputPositions), table(topology, positions)
    keys = [k for k in before if k in after]
    if not keys:
        return None, 0
    difference = np.array([before[k] - after[k] for k in keys])
    return float(np.sqrt(np.mean(np.sum(difference ** 2, axis=1)))), len(keys)


def looksGenerated(topology):
    """True when every residue of `topology` is a generated residue as :meth:`Backbone.write` writes it: GLY
    with backbone heavy atoms only, or U with backbone and sugar atoms only (no base, no hydrogens). Such a
    file has no side chain or base that a frame repair could lose, and its geometry is the generator's."""
    residues = list(topology.residues())
    if not residues:
        return False
    for residue in residues:
        allowed = _GENERATED_ATOMS.get(residue.name.strip().upper())
        if allowed is None or not {atom.name for atom in residue.atoms()} <= allowed:
            return False
    return True


def repairFrames(topology, positions, platform=None):
    """The frame repair of :func:`repairGeometry` for a topology of generated residues (looksGenerated): the
    frame atoms minimised to convergence under ideal frame geometry, trans peptide links and the soft repulsion
    (no learned force), one segment per chain piece (chainSegments: bonds, then numbering), and the other
    backbone atoms placed again from ideal geometry. Residue ids and chain ids are kept. Returns (topology,
    positions)."""
    frames, _ = selectFrameResidues(topology)
    if not frames:
        raise ValueError("nothing to repair: no residue with frame atoms")
    segments = chainSegments(frames)
    system, start, _ = backboneSystem(frames, positionsNm(positions), withForce=False, segments=segments)
    return backboneTopology(frames, minimizedFrames(system, start, platform), segments)


def repairGeometry(backbone, platform=None):
    """A generated Backbone with its frame geometry repaired: the frame atoms minimised to convergence under
    ideal frame geometry and the soft repulsion alone (no learned force), as one continuous chain.

    Generated chains can have residues whose atoms sit nanometres apart; an all-atom force field started
    from those explodes. Repairing at the level of frame atoms is cheap and leaves the fold to the model."""
    topology, positions = backbone.toOpenMM()
    frames, _ = selectFrameResidues(topology)
    system, start, _ = backboneSystem(frames, positionsNm(positions), withForce=False, segments=[0] * len(frames))
    return Backbone(minimizedFrames(system, start, platform), backbone.moltype, backbone.residueNames, backbone.chainId)


def minimizedFrames(system, start, platform=None):
    """The frame atoms [L, 3, 3] (nm) of a backboneSystem minimised to convergence from `start` ([3L, 3] nm): the
    frame repair of repairGeometry and repairFrames."""
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), choosePlatform(platform))
    context.setPositions(start)
    openmm.LocalEnergyMinimizer.minimize(context, 1.0, 0)
    final = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    return np.asarray(final).reshape(-1, 3, 3)


def _energy(context):
    return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)


def _backboneRestraint(system, atoms, reference, k):
    """Harmonic restraints of `atoms` to `reference` ([N, 3] nm) with the global parameter restraintK (= k)."""
    restraint = openmm.CustomExternalForce("0.5*restraintK*((x-x0)^2+(y-y0)^2+(z-z0)^2)")
    restraint.setName("BackboneRestraint")
    restraint.addGlobalParameter("restraintK", float(k))
    for name in ("x0", "y0", "z0"):
        restraint.addPerParticleParameter(name)
    for i in atoms:
        restraint.addParticle(int(i), [float(v) for v in reference[i]])
    return restraint


def runProtocol(system, positions, platform=None, protocol=DEFAULT_PROTOCOL, temperature=300.0, stepSize=0.002,
                minimizeIterations=500, steps=None, seed=0, quench=True, restraintK=RESTRAINT_K,
                annealTemperature=ANNEAL_TEMPERATURE, restrainedAtoms=None, progress=False, label="refine", terms=None,
                diagnostics=None):
    """Run a refinement protocol (see refine) on `system` from `positions`: returns (final [N, 3] nm, energies).

    The System is not changed (the 'restrained' protocol's restraint lives in a copy). `restrainedAtoms` are the
    particles the 'restrained' protocol holds (default: all). A dict `terms` receives the energy of each force
    (kJ/mol, by force name) at 'start' and 'final'. A dict `diagnostics` receives 'skippedFrameEvaluations':
    residue evaluations a FlashIPAForce with the degenerate-frame policy "skip" left out (skippedEvaluations).
    RuntimeError if the final structure has a residue such a force had to leave out."""
    if protocol not in PROTOCOLS:
        raise ValueError("protocol must be one of %s, not %r" % (", ".join(PROTOCOLS), protocol))
    steps = DEFAULT_STEPS[protocol] if steps is None else int(steps)
    chosen = choosePlatform(platform)
    # Relax first without the learned force: generated or damaged structures can have degenerate frames
    # (coincident or collinear frame atoms), which the force refuses; bonds from the physical model fix them.
    # (Also without a learned force, so that scale=0 gets the same minimisation budget.)
    relax = openmm.Context(withoutFlashIPA(system), openmm.VerletIntegrator(0.001), chosen)
    relax.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(relax, PRERELAX_TOLERANCE, PRERELAX_ITERATIONS)
    positions = relax.getState(getPositions=True).getPositions(asNumpy=True)
    del relax
    byTerm = terms is not None and system.getNumForces() <= 32
    if byTerm or (protocol == "restrained" and steps > 0):
        # A copy: the caller's System stays as it was (a Context keeps using the System it was made from).
        system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    names = _termNames(system)
    if byTerm:  # each force in its own group, for the energy of each term
        for k, force in enumerate(system.getForces()):
            force.setForceGroup(k)
    if protocol == "restrained" and steps > 0:
        n = system.getNumParticles()
        atoms = list(range(n)) if restrainedAtoms is None else list(restrainedAtoms)
        restraint = _backboneRestraint(system, atoms, np.zeros((n, 3)), 0.0)
        system.addForce(restraint)
    else:
        restraint = None
    mdTemperature = annealTemperature if protocol == "anneal" else temperature
    integrator = openmm.LangevinMiddleIntegrator(mdTemperature * unit.kelvin, 1.0 / unit.picosecond,
                                                 stepSize * unit.picosecond)
    integrator.setRandomNumberSeed(int(seed))
    context = openmm.Context(system, integrator, chosen)
    context.setPositions(positions)
    energies = {"start": _energy(context)}
    if byTerm:
        terms["start"] = _termEnergies(context, names)
    # ("start" is after the physical pre-relaxation: the learned energy is undefined before it.)
    with _progress.spinner("%s: minimising (%s)" % (label, context.getPlatform().getName()), enabled=progress):
        openmm.LocalEnergyMinimizer.minimize(context, MINIMIZE_TOLERANCE, minimizeIterations)
    energies["minimized"] = _energy(context)
    if protocol != "minimize" and steps > 0:
        if restraint is not None:
            minimized = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
            for k in range(restraint.getNumParticles()):
                index, _ = restraint.getParticleParameters(k)
                restraint.setParticleParameters(k, index, [float(v) for v in minimized[index]])
            restraint.updateParametersInContext(context)
            context.setParameter("restraintK", float(restraintK))
        context.setVelocitiesToTemperature(mdTemperature * unit.kelvin, int(seed))
        bar = _progress.bar(steps, "%s: Langevin (%s)" % (label, protocol), enabled=progress)
        chunk = max(1, steps // 20)
        done = 0
        while done < steps:
            n = min(chunk, steps - done)
            if protocol == "anneal":  # linear cooling: the chunk runs at the temperature of its midpoint
                integrator.setTemperature(annealTemperature * (1.0 - (done + 0.5 * n) / steps) * unit.kelvin)
            integrator.step(n)
            done += n
            bar.update(n)
        bar.close()
        if restraint is not None:
            context.setParameter("restraintK", 0.0)
        energies["md"] = _energy(context)
        if quench:
            # At 300 K a backbone bond of amber14 (k ~ 2.8e5 kJ/mol/nm^2) fluctuates by sqrt(kT/k) = 0.003 nm,
            # so a snapshot of a few hundred residues almost always has a bond 0.01 nm off; the minimum does not.
            with _progress.spinner("%s: quench" % label, enabled=progress):
                openmm.LocalEnergyMinimizer.minimize(context, MINIMIZE_TOLERANCE, QUENCH_ITERATIONS)
    skippedBefore = skippedEvaluations(context, system)
    state = context.getState(getEnergy=True, getPositions=True)
    skipped = skippedEvaluations(context, system)
    if skipped > skippedBefore:  # the final evaluation itself left residues out: the result has no valid frames
        raise RuntimeError("refinement ended with degenerate frame atoms (collinear or coincident) in %d residue(s): "
                           "the learned force outweighed the frame geometry; try a larger flashipaSigma or "
                           "a smaller scale" % (skipped - skippedBefore))
    if diagnostics is not None:
        diagnostics["skippedFrameEvaluations"] = skipped
    energies["final"] = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    final = np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64)
    for key, value in energies.items():
        if not np.isfinite(value):
            raise RuntimeError("refinement produced a non-finite %s energy" % key)
    if byTerm:
        terms["final"] = _termEnergies(context, names)
    return final, energies


def _termNames(system):
    """A name per force of `system` (its name; repeated names get '#2', '#3', ...)."""
    names, seen = [], collections.Counter()
    for force in system.getForces():
        name = force.getName() or type(force).__name__
        seen[name] += 1
        names.append(name if seen[name] == 1 else "%s#%d" % (name, seen[name]))
    return names


def _termEnergies(context, names):
    """{name: kJ/mol} of each force, in a Context whose force k is in group k; forces without energy left out."""
    out = {}
    for k, name in enumerate(names):
        if name == "CMMotionRemover":
            continue
        out[name] = context.getState(getEnergy=True, groups={k}).getPotentialEnergy().value_in_unit(
            unit.kilojoule_per_mole)
    return out


def skippedEvaluations(context, system):
    """Residue evaluations left out so far in `context` (made from `system`) by its FlashIPAForce(s) under the
    degenerate-frame policy "skip" (FlashIPAForce.getNumSkippedResidues; 0 under "error")."""
    from . import FlashIPAForce
    total = 0
    for i in range(system.getNumForces()):
        if FlashIPAForce.isinstance(system.getForce(i)):
            total += int(FlashIPAForce.cast(system.getForce(i)).getNumSkippedResidues(context))
    return total


def withoutFlashIPA(system):
    """A copy of `system` without its FlashIPAForce(s)."""
    from . import FlashIPAForce
    copied = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    for i in reversed(range(copied.getNumForces())):
        if FlashIPAForce.isinstance(copied.getForce(i)):
            copied.removeForce(i)
    return copied


def amberSystem(topology, implicitSolvent="obc2"):
    """amber14-all + implicit solvent for a complete topology (hydrogens included), no cutoff, HBonds
    constrained. 'obc2' is OpenMM's native GBSAOBCForce (solvent dielectric 78.5, solute 1, charges from the
    NonbondedForce, mbondi2 radii and screening factors as amber14's implicit/obc2.xml assigns them; about 9x
    faster on the CPU platform than that file's CustomGBForce, same energy); 'gbn2' is amber14's
    implicit/gbn2.xml (a CustomGBForce: OpenMM has no native GBn2)."""
    if implicitSolvent == "obc2":
        forcefield = app.ForceField("amber14-all.xml")
    elif implicitSolvent == "gbn2":
        forcefield = app.ForceField("amber14-all.xml", "implicit/gbn2.xml")
    else:
        raise ValueError("implicitSolvent must be 'obc2' or 'gbn2', not %r" % (implicitSolvent,))
    try:
        system = forcefield.createSystem(topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds)
    except ValueError as error:
        raise ValueError("amber14 cannot parameterise this structure after PDBFixer: %s" % error) from error
    if implicitSolvent == "obc2":
        system.addForce(nativeOBC2(system, topology))
    return system


def nativeOBC2(system, topology):
    """An openmm.GBSAOBCForce (OBC2, NoCutoff) for `system`: charges from its NonbondedForce, radii and scale
    factors from openmm.app's GBSAOBC2Force.getStandardParameters (mbondi2), dielectrics SOLVENT_DIELECTRIC
    and SOLUTE_DIELECTRIC, OpenMM's default surface-area term (ACE, 2.25936 kJ/mol/nm^2, probe 0.14 nm)."""
    from openmm.app.internal.customgbforces import GBSAOBC2Force
    nonbonded = [f for f in system.getForces() if isinstance(f, openmm.NonbondedForce)]
    if len(nonbonded) != 1:
        raise ValueError("nativeOBC2 needs exactly one NonbondedForce, the System has %d" % len(nonbonded))
    parameters = GBSAOBC2Force.getStandardParameters(topology)
    gb = openmm.GBSAOBCForce()
    gb.setSolventDielectric(SOLVENT_DIELECTRIC)
    gb.setSoluteDielectric(SOLUTE_DIELECTRIC)
    gb.setNonbondedMethod(openmm.GBSAOBCForce.NoCutoff)
    for i in range(system.getNumParticles()):
        charge = nonbonded[0].getParticleParameters(i)[0]
        gb.addParticle(charge, float(parameters[i][0]), float(parameters[i][1]))
    return gb


def allAtomSystem(topology, positions, sigma=DEFAULT_SIGMA, scale=1.0, temperature=300.0, implicitSolvent="obc2",
                  modelPath=None, withForce=True, notes=None, seed=0):
    """Split chains at gaps (topology.splitAtGaps: each piece its own chain with its own termini), complete the
    structure with PDBFixer (nonstandard residues replaced by their standard parents, with a warning; missing heavy
    atoms and hydrogens; never missing residues) and build amber14-all + implicit solvent (amberSystem) +
    FlashIPAForce in force group 1. Returns (system, topology, positions); what was changed is appended to the
    list `notes` when one is given. `seed` seeds the Langevin steps PDBFixer takes where added atoms land too close
    to others, so the same input gives the same system."""
    topology, _ = splitAtGaps(topology, positions)
    fixer = _fixer(topology, positions)
    # The same input gives the same system and positions: PDBFixer relaxes added heavy atoms in a seeded Langevin
    # run, and Modeller.addHydrogens starts some hydrogens at positions from Python's global `random` (seeded here
    # and restored after) before minimising them; both on Reference, whose force sums do not depend on threads.
    # Unseeded, the hydrogens of a perturbed 60-residue protein moved by up to 0.23 nm from run to run, so two
    # refinement routes started from different structures.
    fixer.platform = openmm.Platform.getPlatformByName("Reference")
    fixer.missingResidues = {}  # never invent missing residues; gaps stay gaps (findMissingResidues not called)
    pseudouridines = _pseudouridinesAsUridines(fixer.topology)
    if pseudouridines:
        message = ("%d pseudouridine(s) refined as U, the ring renamed so that its glycosidic carbon stands as U's "
                   "N1 (amber14 has no PSU template; written back as U): %s" % (len(pseudouridines),
                                                                               "; ".join(pseudouridines)))
        warnings.warn(message, stacklevel=2)
        if notes is not None:
            notes.append(message)
    fixer.findNonstandardResidues()
    mapped = {r for r, _ in fixer.nonstandardResidues}
    fixer.nonstandardResidues += [(r, MODIFIED_NUCLEOTIDES[r.name]) for r in fixer.topology.residues()
                                  if r.name in MODIFIED_NUCLEOTIDES and r not in mapped]
    if fixer.nonstandardResidues:
        # Said, not silent: MSE becomes MET (Se -> S) and so on (PDBFixer's table).
        replaced = "; ".join("%s refined as %s" % (_describeResidue(residue), replacement)
                             for residue, replacement in fixer.nonstandardResidues)
        message = ("%d nonstandard residue(s) replaced by their standard parents (PDBFixer), as amber14 has no "
                   "templates for them: %s" % (len(fixer.nonstandardResidues), replaced))
        warnings.warn(message, stacklevel=2)
        if notes is not None:
            notes.append(message)
    fixer.replaceNonstandardResidues()
    removed = fixer.removeHeterogens(keepWater=False)
    if removed and notes is not None:  # refine passes the polymer only (splitHetero); other callers may not
        notes.append("removed by PDBFixer (no amber14 template): " + ", ".join(_describeResidue(r) for r in removed))
    fixer.findMissingAtoms()
    added = ["%s %s to %s" % ("/".join(a.name for a in atoms), "atom" if len(atoms) == 1 else "atoms",
                              _describeResidue(residue)) for residue, atoms in fixer.missingAtoms.items()]
    added += ["%s to %s" % ("/".join(names), _describeResidue(residue))
              for residue, names in fixer.missingTerminals.items()]
    if added and notes is not None:
        notes.append("PDBFixer added missing heavy atoms: " + "; ".join(added[:20]) +
                     ("; ... and %d more" % (len(added) - 20) if len(added) > 20 else ""))
    fixer.addMissingAtoms(seed=int(seed))
    randomState = random.getstate()
    random.seed(int(seed))
    try:
        fixer.addMissingHydrogens(7.0)
    finally:
        random.setstate(randomState)
    system = amberSystem(fixer.topology, implicitSolvent)
    if withForce:
        # Chain breaks from the bonds: PDBFixer's topology has no bond across a gap (each piece is a chain).
        force = createForce(fixer.topology, modelPath=modelPath, sigma=sigma, scale=scale, temperature=temperature)
        force.setForceGroup(1)
        system.addForce(force)
    return system, fixer.topology, fixer.positions


def backboneAtoms(topology):
    """Indices of the backbone heavy atoms (BACKBONE_ATOMS) of the residues that carry frames."""
    frames, _ = selectFrameResidues(topology)
    return [atom.index for frame in frames for atom in frame.residue.atoms() if atom.name in BACKBONE_ATOMS]


def _refineAllAtom(polymer, others, sigma, scale, implicitSolvent, modelPath, settings, hetero):
    topology, positions = polymer
    residues, inputXyz = others
    notes = []
    system, topology, positions = allAtomSystem(topology, positions, sigma, scale, settings["temperature"],
                                                implicitSolvent, modelPath, withForce=scale != 0, notes=notes,
                                                seed=settings["seed"])
    if residues and hetero == "fixed":
        fixedXyz = [inputXyz[a.index] for r, _ in residues for a in r.atoms() if _heavy(a)]
        wall = heteroWall(topology, positions, fixedXyz)
        if wall.getNumParticles():
            system.addForce(wall)
    terms = {}
    final, energies = runProtocol(system, positions, stepSize=0.002, restrainedAtoms=backboneAtoms(topology),
                                  label="refine all-atom", terms=terms, **settings)
    frames, unusable = selectFrameResidues(topology)
    result = RefinedStructure(topology, unit.Quantity(final, unit.nanometer), "all-atom", energies, system, frames,
                              final, chainSegments(frames), settings["protocol"], notes=notes)
    result.energyTerms = terms
    result.leftOut = ["%s: left out of the learned force (%s)" % (_describeResidue(r), why) for r, why in unusable]
    result.leftOut += _describeOthers(residues, hetero)
    if residues and hetero == "fixed":
        # The System's particles are the polymer's atoms, the first ones of the topology; the heterogens follow.
        result.topology, result.positions = _appendResidues(result.topology, result.positions, others)
    return result


def backboneSystem(frames, xyz, sigma=DEFAULT_SIGMA, scale=1.0, temperature=300.0, modelPath=None,
                   withForce=True, segments=None):
    """A System of the frame atoms only (residue i = particles 3i..3i+2): FlashIPAForce (group 1), ideal frame
    geometry per molecule type, and a soft repulsion between frame atoms of different residues. Returns
    (system, start positions [3L, 3] nm, segments). Segments default to chainSegments(frames, xyz): chain
    breaks from the frames' topology (bonds, then numbering), `xyz` only where those cannot decide."""
    system = openmm.System()
    start = []
    if segments is None:
        segments = chainSegments(frames, xyz)
    force = FlashIPAForce(modelPath or "")
    force.setDefaultSigma(sigma)
    force.setDefaultScale(scale)
    force.setDefaultTemperature(temperature)
    # Frame atoms are held here by restraints, not by a force field, and the learned force can outweigh them for a
    # step (a minimiser's trial step, a Langevin step): "skip" leaves a residue whose frame atoms pass through a
    # collinear or coincident shape out of that evaluation instead of stopping the run; runProtocol counts such
    # evaluations and refuses a result that ends degenerate (docs/DESIGN-DECISIONS.md, "Degenerate frames").
    force.setDegenerateFramePolicy("skip")
    for i, frame in enumerate(frames):
        moltype = "rna" if frame.residueType >= FIRST_NUCLEOTIDE else "protein"
        for k, mass in enumerate(FRAME_MASSES[moltype]):
            system.addParticle(mass)
            start.append(xyz[frame.atoms[k]])
        force.addResidue(3 * i, 3 * i + 1, 3 * i + 2, frame.residueType, segments[i])
    if withForce:
        force.setForceGroup(1)
        system.addForce(force)
    for moltype in ("protein", "rna"):
        chosen = [i for i, f in enumerate(frames) if (f.residueType >= FIRST_NUCLEOTIDE) == (moltype == "rna")]
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


def _refineBackbone(topology, positions, frames, sigma, scale, modelPath, settings):
    xyz = positionsNm(positions)
    system, start, segments = backboneSystem(frames, xyz, sigma, scale, settings["temperature"], modelPath,
                                             scale != 0)
    diagnostics = {}
    final, energies = runProtocol(system, start, stepSize=0.001, label="refine backbone", diagnostics=diagnostics,
                                  **settings)
    topology_out, positions_out = backboneTopology(frames, final.reshape(-1, 3, 3), segments)
    result = RefinedStructure(topology_out, positions_out, "backbone", energies, system, frames, final, segments,
                              settings["protocol"])
    result.skippedFrameEvaluations = diagnostics["skippedFrameEvaluations"]
    return result


def backboneTopology(frames, frameXyz, segments):
    """Rebuild chains (one per segment) with the ideal-geometry backbone atoms: (Topology, positions)."""
    topology = app.Topology()
    positions = []
    order = sorted(set(segments))
    for s in order:
        members = [i for i, seg in enumerate(segments) if seg == s]
        moltype = "rna" if frames[members[0]].residueType >= FIRST_NUCLEOTIDE else "protein"
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
