"""Building a FlashIPAForce from an ``openmm.app.Topology``.

Every residue of the topology is classified:

- **amino acid** with atoms N, CA, C: frame (N, CA, C); type from its name (variants such as HIE, CYX,
  MSE, NALA/CALA are understood), any other name is the unknown amino acid (20);
- **nucleotide** with atoms C3', C4', O4' (the old names C3*, C4*, O4* are accepted too): frame
  (C3', C4', O4'); type A, C, G or U from its name (RA, RA5, RA3, DA, ADE, ... are understood); any other
  nucleotide (DNA thymine, modified bases) is the unknown nucleotide (25);
- **skipped silently**: water, common monatomic ions, and the terminal caps ACE, NME, NMA, NH2, FOR,
  which carry no frame;
- **unusable**: anything else (ligands, residues missing a frame atom, residues with two atoms of one frame-atom
  name). These are named in a warning,
  or in a ValueError when ``strict=True``.

The chain id given to the model is a segment id (:func:`chainSegments`): it changes at each topology chain, at
each change between protein and RNA, and at each chain break. Whether two consecutive residues of a chain
are linked is decided, in this order, by

1. the topology's bonds: C(i)-N(i+1) for amino acids, O3'(i)-P(i+1) for nucleotides, when both residues
   have those atoms and the topology has bonds at all;
2. otherwise the residue numbering: consecutive numbers (or one number with insertion codes) are linked;
3. only where neither decides (no linking atoms or bonds, non-numeric residue ids), and only when positions
   are given: the distances of the training data set (:data:`LINK_BREAK`, :data:`C4_BREAK`).

Positions come last because they are the least reliable: a structure perturbed by 0.1 nm per coordinate
stretches about two thirds of its C-N links past 0.2 nm. Residues are added in topology order, which is sequence
order for topologies read from PDB/PDBx files.

Note that ``openmm.app`` bonds consecutive residues of one chain whatever their distance
(``Topology.createStandardBonds``), so a file read without TER records at a gap has a bond across it;
:func:`findGaps` and :func:`splitAtGaps` find such gaps from numbering and distance (``refine`` uses them).
"""

import collections
import os
import warnings

import numpy as np
import openmm.unit as unit

from .openmmflashipa import (
    FlashIPAForce,
    residueTypeFromName,
    NUM_AMINO_ACIDS,
    UNKNOWN_AMINO_ACID,
    FIRST_NUCLEOTIDE,
    UNKNOWN_NUCLEOTIDE,
)

__all__ = ["FrameResidue", "selectFrameResidues", "createForce", "chainSegments", "findGaps", "splitAtGaps"]

#: One residue the model will see: the openmm.app Residue, its three frame-atom indices (a, b, c), its
#: residue type and its chain id.
FrameResidue = collections.namedtuple("FrameResidue", ["residue", "atoms", "residueType", "chain"])

PROTEIN_FRAME_ATOMS = ("N", "CA", "C")
NUCLEOTIDE_FRAME_ATOMS = ("C3'", "C4'", "O4'")

WATER_NAMES = frozenset(["HOH", "WAT", "H2O", "DOD", "TIP", "TIP3", "TIP3P", "TIP4", "TIP4P", "TIP5", "TIP5P",
                         "T3P", "T4P", "T5P", "SPC", "SPCE", "SOL", "OPC", "OPC3", "SWM4", "SWM6"])
ION_NAMES = frozenset([
    "LI", "NA", "K", "RB", "CS", "MG", "CA", "SR", "BA", "ZN", "MN", "FE", "FE2", "CO", "NI", "CU", "CU1",
    "CD", "HG", "AL", "F", "CL", "BR", "I", "IOD",
    "LI+", "NA+", "K+", "RB+", "CS+", "MG2", "MG+2", "CA2", "CA+2", "ZN2", "ZN+2", "F-", "CL-", "BR-", "I-",
    "SOD", "POT", "CLA", "CAL", "CES", "LIT", "RUB", "BAR", "ZN2+", "MG2+", "CA2+",
])
ION_ELEMENTS = frozenset(["Li", "Na", "K", "Rb", "Cs", "Mg", "Ca", "Sr", "Ba", "Zn", "Mn", "Fe", "Co", "Ni",
                          "Cu", "Cd", "Hg", "Al", "F", "Cl", "Br", "I"])
CAP_NAMES = frozenset(["ACE", "NME", "NMA", "NH2", "FOR"])
_NUCLEOTIDE_BASES = {"A": "A", "C": "C", "G": "G", "U": "U", "T": "T",
                     "ADE": "A", "CYT": "C", "GUA": "G", "URA": "U", "URI": "U", "THY": "T"}


def _atomsByName(residue):
    atoms = {}
    for atom in residue.atoms():
        atoms.setdefault(atom.name, atom.index)
    return atoms


def _duplicateFrameAtoms(residue):
    """Frame-atom names (protein or nucleotide, either spelling of primes) that occur more than once."""
    counts = collections.Counter(atom.name.replace("*", "'") for atom in residue.atoms())
    return sorted(n for n in PROTEIN_FRAME_ATOMS + NUCLEOTIDE_FRAME_ATOMS if counts[n] > 1)


def _isWaterOrIon(residue):
    name = residue.name.strip().upper()
    if name in WATER_NAMES:
        return True
    atoms = list(residue.atoms())
    if len(atoms) == 1:
        element = atoms[0].element
        if name in ION_NAMES or (element is not None and element.symbol in ION_ELEMENTS):
            return True
    return False


def _aminoAcidType(name):
    """Type of an amino-acid residue name; UNKNOWN_AMINO_ACID if the name is not recognised."""
    upper = name.strip().upper()
    candidates = [upper]
    if len(upper) == 4 and upper[0] in "NC":  # Amber terminal names: NALA, CGLY, ...
        candidates.append(upper[1:])
    for candidate in candidates:
        residueType = residueTypeFromName(candidate)
        if 0 <= residueType < NUM_AMINO_ACIDS:
            return residueType
    return UNKNOWN_AMINO_ACID


def _nucleotideType(name):
    """Type of a nucleotide residue name; UNKNOWN_NUCLEOTIDE if it is not A, C, G or U."""
    upper = name.strip().upper()
    residueType = residueTypeFromName(upper)
    if FIRST_NUCLEOTIDE <= residueType <= UNKNOWN_NUCLEOTIDE:
        return residueType
    stem = upper
    if len(stem) > 1 and stem[-1] in "53N" and stem[:-1] not in ("", "D", "R"):  # RA5, DA3, AN, RAN
        stem = stem[:-1]
    if len(stem) > 1 and stem[0] in "DR":  # DA, RA
        stem = stem[1:]
    base = _NUCLEOTIDE_BASES.get(stem)
    if base is None or base == "T":  # thymine is not in the vocabulary
        return UNKNOWN_NUCLEOTIDE
    residueType = residueTypeFromName(base)
    return residueType if FIRST_NUCLEOTIDE <= residueType <= UNKNOWN_NUCLEOTIDE else UNKNOWN_NUCLEOTIDE


def _frameAtoms(atoms, names):
    """Indices of the three frame atoms, accepting the old '*' spelling of primes; None if one is missing."""
    indices = []
    for name in names:
        index = atoms.get(name)
        if index is None and "'" in name:
            index = atoms.get(name.replace("'", "*"))
        if index is None:
            return None
        indices.append(index)
    return tuple(indices)


def _describe(residue):
    return "%s %s (chain %s)" % (residue.name, residue.id, residue.chain.id)


def selectFrameResidues(topology):
    """Classify the residues of an ``openmm.app.Topology`` (see the module documentation).

    Returns
    -------
    (frames, unusable)
        ``frames``: list of :data:`FrameResidue` in topology order; ``unusable``: list of
        ``(residue, reason)`` for residues that are neither usable nor silently skipped.
    """
    frames, unusable = [], []
    for residue in topology.residues():
        if _isWaterOrIon(residue):
            continue
        name = residue.name.strip().upper()
        atoms = _atomsByName(residue)
        knownType = residueTypeFromName(name)
        twice = _duplicateFrameAtoms(residue)
        if twice:
            unusable.append((residue, "two or more atoms named %s (which one is the frame atom?)" % ", ".join(twice)))
            continue
        protein = _frameAtoms(atoms, PROTEIN_FRAME_ATOMS)
        nucleotide = _frameAtoms(atoms, NUCLEOTIDE_FRAME_ATOMS)
        if 0 <= knownType <= UNKNOWN_AMINO_ACID:
            isNucleotide = False
        elif FIRST_NUCLEOTIDE <= knownType <= UNKNOWN_NUCLEOTIDE:
            isNucleotide = True
        else:
            isNucleotide = nucleotide is not None and protein is None
        if not isNucleotide and protein is not None:
            frames.append(FrameResidue(residue, protein, _aminoAcidType(name), residue.chain.index))
        elif isNucleotide and nucleotide is not None:
            frames.append(FrameResidue(residue, nucleotide, _nucleotideType(name), residue.chain.index))
        elif name in CAP_NAMES:
            continue
        elif 0 <= knownType <= UNKNOWN_AMINO_ACID:
            missing = [n for n in PROTEIN_FRAME_ATOMS if n not in atoms]
            unusable.append((residue, "missing frame atom(s) " + ", ".join(missing)))
        elif FIRST_NUCLEOTIDE <= knownType <= UNKNOWN_NUCLEOTIDE:
            missing = [n for n in NUCLEOTIDE_FRAME_ATOMS if n not in atoms and n.replace("'", "*") not in atoms]
            unusable.append((residue, "missing frame atom(s) " + ", ".join(missing)))
        else:
            unusable.append((residue, "neither an amino acid (N, CA, C) nor a nucleotide (C3', C4', O4')"))
    return frames, unusable


def _toFloat(value, quantityUnit, what):
    """A plain float from a number or an OpenMM Quantity in units compatible with quantityUnit (TypeError otherwise)."""
    if unit.is_quantity(value):
        if not value.unit.is_compatible(quantityUnit):
            raise TypeError("%s must be in units compatible with %s, got %s" % (what, quantityUnit, value.unit))
        return float(value.value_in_unit(quantityUnit))
    return float(value)


#: FlashIPAForce's defaults of its global parameters (scale, sigma in nm, temperature in K), read from the
#: plugin, which holds them (FlashIPAForce.cpp); the package's workflows and CLI default to these.
_DEFAULTS = FlashIPAForce("")
DEFAULT_SCALE = _DEFAULTS.getDefaultScale()
DEFAULT_SIGMA = _DEFAULTS.getDefaultSigma()
DEFAULT_TEMPERATURE = _DEFAULTS.getDefaultTemperature()

# Chain breaks and gaps: every threshold in one place (nm).
#: Position rule (the last resort of chainSegments), and the rule scripts/build_dataset.py splits the training
#: data at (it reads these two constants):
#: consecutive residues are not linked when C(i)-N(i+1) (protein) or O3'(i)-P(i+1) (RNA) is longer than
#: LINK_BREAK, or, for nucleotides missing O3' or P, when their C4' atoms are farther apart than C4_BREAK.
LINK_BREAK = 0.2
C4_BREAK = 0.8
#: Gaps in an input structure (findGaps; refine splits chains there before PDBFixer and amber14): a residue
#: number jump with the link atoms farther apart than LINK_BREAK (or missing), or, where residue ids are not
#: numbers, the link atoms farther apart than GAP_DISTANCE. GAP_DISTANCE is far beyond a bond (0.13-0.16 nm) so that
#: noisy input is not cut: Gaussian noise of 0.1 nm per coordinate on both atoms stretches a C-N bond past
#: 0.5 nm in 2 % of links, past 0.8 nm in under 1e-5 (2 million samples).
GAP_DISTANCE = 0.8

#: Atom names linking residue i to residue i+1: (atom of residue i, atom of residue i+1).
LINK_ATOMS = {"protein": ("C", "N"), "rna": ("O3'", "P")}


def positionsNm(positions):
    """Positions (a Quantity, a list of Vec3 or an [N, 3] array; nm) as a float64 [N, 3] array; ValueError
    for another shape or non-finite values."""
    if unit.is_quantity(positions):
        positions = positions.value_in_unit(unit.nanometer)
    xyz = np.array([[float(c) for c in (p.x, p.y, p.z)] if hasattr(p, "x") else p for p in positions],
                   dtype=np.float64)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError("positions must be [N, 3]")
    if not np.all(np.isfinite(xyz)):
        raise ValueError("positions contain non-finite values")
    return xyz


def _atomIndex(residue, name):
    for atom in residue.atoms():
        if atom.name == name or ("'" in name and atom.name == name.replace("'", "*")):
            return atom.index
    return None


def _linkAtoms(previous, residue, moltype):
    """(index of the linking atom of `previous`, index of that of `residue`), or None if one is missing."""
    first, second = LINK_ATOMS[moltype]
    a, b = _atomIndex(previous, first), _atomIndex(residue, second)
    return None if a is None or b is None else (a, b)


def _residueNumber(residue):
    """(number, insertion code) of a residue, or None when its id is not an integer."""
    try:
        number = int(str(residue.id).strip())
    except ValueError:
        return None
    return number, (getattr(residue, "insertionCode", "") or "").strip()


def _numberingLinked(previous, residue):
    """True when the residue numbers are consecutive (or equal with different insertion codes), False when
    they jump, None when a residue id is not an integer."""
    a, b = _residueNumber(previous), _residueNumber(residue)
    if a is None or b is None:
        return None
    return b[0] - a[0] == 1 or (b[0] == a[0] and b[1] != a[1])


def _interResidueBonds(topology):
    """Set of (i, j) atom-index pairs (both orders) of bonds between different residues."""
    bonds = set()
    for a, b in topology.bonds():
        if a.residue is not b.residue:
            bonds.add((a.index, b.index))
            bonds.add((b.index, a.index))
    return bonds


def _moltype(frame):
    return "rna" if frame.residueType >= FIRST_NUCLEOTIDE else "protein"


def _linkRule(previous, residue, moltype, bonds, hasBonds, xyz=None):
    """Whether residue `residue` follows `previous` in one chain without a break, and which rule said so:
    (linked, rule) with rule 'bond', 'numbering', 'positions' or 'default' (see the module documentation).
    `bonds` is the set from the topology's inter-residue bonds, `hasBonds` whether the topology has bonds."""
    link = _linkAtoms(previous, residue, moltype)
    if link is not None and hasBonds:
        return link in bonds, "bond"
    numbering = _numberingLinked(previous, residue)
    if numbering is not None:
        return numbering, "numbering"
    if xyz is not None:
        if link is not None:
            return np.linalg.norm(xyz[link[1]] - xyz[link[0]]) <= LINK_BREAK, "positions"
        a, b = _atomIndex(previous, "C4'"), _atomIndex(residue, "C4'")
        if moltype == "rna" and a is not None and b is not None:
            return np.linalg.norm(xyz[b] - xyz[a]) <= C4_BREAK, "positions"
    return True, "default"


def chainSegments(frames, positions=None):
    """Model chain ids for frame residues (from selectFrameResidues): a new id at each topology chain, at each
    change between protein and RNA, and at each chain break. Breaks come from the topology's bonds, else the
    residue numbering, else (only then, and only if given) `positions` (see the module documentation).

    Pass positions only as that fallback, and only positions whose geometry is sound (after repair or
    minimisation): a perturbed structure's distances cut chains that are whole."""
    if not frames:
        return []
    topology = frames[0].residue.chain.topology
    bonds = _interResidueBonds(topology)
    hasBonds = topology.getNumBonds() > 0
    xyz = None if positions is None else positionsNm(positions)
    segments, current = [], 0
    for i, frame in enumerate(frames):
        if i > 0:
            previous = frames[i - 1]
            moltype = _moltype(frame)
            if previous.residue.chain.index != frame.residue.chain.index or moltype != _moltype(previous):
                current += 1
            elif not _linkRule(previous.residue, frame.residue, moltype, bonds, hasBonds, xyz)[0]:
                current += 1
        segments.append(current)
    return segments


def _polymerType(residue):
    """'protein', 'rna' or None (water, ion, ligand) for a residue, from its name or else its atoms."""
    if _isWaterOrIon(residue):
        return None
    knownType = residueTypeFromName(residue.name.strip().upper())
    if 0 <= knownType <= UNKNOWN_AMINO_ACID:
        return "protein"
    if FIRST_NUCLEOTIDE <= knownType <= UNKNOWN_NUCLEOTIDE:
        return "rna"
    atoms = _atomsByName(residue)
    if _frameAtoms(atoms, PROTEIN_FRAME_ATOMS) is not None:
        return "protein"
    if _frameAtoms(atoms, NUCLEOTIDE_FRAME_ATOMS) is not None:
        return "rna"
    return None


def findGaps(topology, positions):
    """Gaps in an input structure: list of (residue before, residue after) pairs of consecutive amino acids (or
    nucleotides) of one chain that are not linked, judged from the numbering and the input positions alone
    (not from the bonds, which openmm.app adds across gaps): a number jump with the link atoms (C-N, O3'-P)
    more than LINK_BREAK apart or missing, or, where residue ids are not integers, the link atoms more than
    GAP_DISTANCE apart. Consecutive numbers are never a gap: a generated backbone written without geometry
    repair has links of several nanometres that are still links. Waters, ions and ligands are skipped."""
    xyz = positionsNm(positions)
    gaps = []
    for chain in topology.chains():
        residues = [(r, _polymerType(r)) for r in chain.residues()]
        residues = [(r, t) for r, t in residues if t is not None]
        for (previous, previousType), (residue, moltype) in zip(residues[:-1], residues[1:]):
            if previousType != moltype:
                continue
            link = _linkAtoms(previous, residue, moltype)
            distance = None if link is None else np.linalg.norm(xyz[link[1]] - xyz[link[0]])
            numbering = _numberingLinked(previous, residue)
            if numbering is False and (distance is None or distance > LINK_BREAK):
                gaps.append((previous, residue))
            elif numbering is None and distance is not None and distance > GAP_DISTANCE:
                gaps.append((previous, residue))
    return gaps


def splitAtGaps(topology, positions, gaps=None):
    """A copy of `topology` whose chains are split at `gaps` (default: findGaps(topology, positions)): each piece
    becomes its own chain with the original chain id, residue ids and atoms, and no bond crosses a gap.
    Atom order is unchanged, so `positions` still apply. Returns (topology, gaps)."""
    from openmm.app import Topology
    if gaps is None:
        gaps = findGaps(topology, positions)
    starts = {after for _, after in gaps}
    out = Topology()
    out.setPeriodicBoxVectors(topology.getPeriodicBoxVectors())
    atoms = {}
    for chain in topology.chains():
        newChain = None
        for residue in chain.residues():
            if newChain is None or residue in starts:
                newChain = out.addChain(chain.id)
            newResidue = out.addResidue(residue.name, newChain, residue.id, getattr(residue, "insertionCode", ""))
            for atom in residue.atoms():
                atoms[atom] = out.addAtom(atom.name, atom.element, newResidue, atom.id)
    cut = {(before, after) for before, after in gaps}
    for bond in topology.bonds():
        a, b = bond[0], bond[1]
        if (a.residue, b.residue) in cut or (b.residue, a.residue) in cut:
            continue
        out.addBond(atoms[a], atoms[b], bond.type, bond.order)
    return out, gaps


def createForce(topology, modelPath=None, sigma=None, scale=None, temperature=None, backend=None, strict=False,
                positions=None, atoms=None):
    """Create a :class:`FlashIPAForce` for the protein and RNA residues of a topology.

    Parameters
    ----------
    topology : openmm.app.Topology
        The topology of the System the force will be added to (atom indices refer to it).
    modelPath : str or os.PathLike, optional
        A safetensors checkpoint; ``None`` selects the model shipped with the package.
    sigma : float (nm) or openmm.unit.Quantity, optional
        Default of the global parameter ``flashipaSigma``, the model's noise level.
    scale : float, optional
        Default of the global parameter ``flashipaScale`` (lambda).
    temperature : float (K) or openmm.unit.Quantity, optional
        Default of the global parameter ``flashipaTemperature``, which sets kT.
    backend : str, optional
        Attention backend: "auto" (default: "fused" on CUDA in single/mixed precision, else "sdpa"), "sdpa", "fused"
        (fp16 scalar part on tensor cores, fp32 points), "fused-fp32" or "math".
    strict : bool
        If True, raise ValueError when a residue other than water, an ion or a terminal cap cannot be
        used; otherwise such residues are named in a warning and left out.
    positions : Quantity or [N, 3] array (nm), optional
        A fallback for chain breaks only: used for a pair of consecutive residues that the topology's bonds
        and residue numbering cannot decide (see the module documentation). The model's chain ids split chains
        at breaks (missing residues), as the training data did, from bonds and numbering with or without it.
    atoms : iterable of int, optional
        Atom indices: only the residues whose three frame atoms are all among them get the force (default:
        every usable residue). A residue left out breaks the chain there.

    Returns
    -------
    FlashIPAForce

    Raises
    ------
    ValueError
        If no residue is usable, or (with ``strict=True``) if some residue is unusable.
    """
    frames, unusable = selectFrameResidues(topology)
    reportUnusable(unusable, strict, stacklevel=3)
    if atoms is not None:
        chosen = set(int(a) for a in atoms)
        frames = [frame for frame in frames if all(a in chosen for a in frame.atoms)]
        if not frames:
            raise ValueError("FlashIPA: no residue has all three frame atoms (protein N, CA, C; RNA C3', C4', O4') "
                             "among the %d atoms given" % len(chosen))
    if not frames:
        raise ValueError("FlashIPA: the topology has no amino-acid (N, CA, C) or nucleotide (C3', C4', O4') "
                         "residue to build frames from")
    force = FlashIPAForce("" if modelPath is None else os.fspath(modelPath))
    if backend is not None:
        force.setAttentionBackend(backend)
    if sigma is not None:
        force.setDefaultSigma(_toFloat(sigma, unit.nanometer, "sigma"))
    if scale is not None:
        force.setDefaultScale(_toFloat(scale, unit.dimensionless, "scale"))
    if temperature is not None:
        force.setDefaultTemperature(_toFloat(temperature, unit.kelvin, "temperature"))
    chains = chainSegments(frames, positions)
    for frame, chain in zip(frames, chains):
        index = force.addResidue(frame.atoms[0], frame.atoms[1], frame.atoms[2], frame.residueType, chain)
        # Errors then name the residue as the input file does ("residue 3 (LYS 25 of chain A)").
        force.setResidueLabel(index, "%s %s%s of chain %s" % (frame.residue.name, frame.residue.id,
                                                              (getattr(frame.residue, "insertionCode", "") or "").strip(),
                                                              frame.residue.chain.id))
    return force


def reportUnusable(unusable, strict, stacklevel=2):
    """Name the residues the model leaves out (from selectFrameResidues): a warning, or a ValueError
    when strict. stacklevel is passed to warnings.warn, counted from this function."""
    if not unusable:
        return
    listed = "; ".join("%s: %s" % (_describe(residue), reason) for residue, reason in unusable[:20])
    if len(unusable) > 20:
        listed += "; ... and %d more" % (len(unusable) - 20)
    message = "FlashIPA: %d residue(s) left out of the model: %s" % (len(unusable), listed)
    if strict:
        raise ValueError(message)
    warnings.warn(message, stacklevel=stacklevel)
