"""Building a FlashIPAForce from an ``openmm.app.Topology``.

Every residue of the topology is classified:

- **amino acid** with atoms N, CA, C: frame (N, CA, C); type from its name (variants such as HIE, CYX,
  MSE, NALA/CALA are understood), any other name is the unknown amino acid (20);
- **nucleotide** with atoms C3', C4', O4' (the old names C3*, C4*, O4* are accepted too): frame
  (C3', C4', O4'); type A, C, G or U from its name (RA, RA5, RA3, DA, ADE, ... are understood); any other
  nucleotide (DNA thymine, modified bases) is the unknown nucleotide (25);
- **skipped silently**: water, common monatomic ions, and the terminal caps ACE, NME, NMA, NH2, FOR,
  which carry no frame;
- **unusable**: anything else (ligands, residues missing a frame atom). These are named in a warning,
  or in a ValueError when ``strict=True``.

The chain id given to the model is ``chain.index``, or, when ``createForce`` gets the positions, a segment id
that also changes at chain breaks (:func:`chainSegments`); residues are added in topology order, which is
sequence order for topologies read from PDB/PDBx files.
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

__all__ = ["FrameResidue", "selectFrameResidues", "createForce", "chainSegments"]

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
    if unit.is_quantity(value):
        if not value.unit.is_compatible(quantityUnit):
            raise TypeError("%s must be in units compatible with %s, got %s" % (what, quantityUnit, value.unit))
        return float(value.value_in_unit(quantityUnit))
    return float(value)


#: Chain breaks (nm): a peptide C(i)-N(i+1) longer than this, or nucleotides whose C4' atoms are farther apart
#: than this, are not consecutive (the same thresholds the training data set splits segments at).
PROTEIN_BREAK = 0.2
RNA_BREAK = 0.9


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


def chainSegments(frames, positions):
    """Model chain ids for frame residues: a new id at each chain change, at each change between protein and
    RNA, and at each chain break found in `positions` (see positionsNm; PROTEIN_BREAK, RNA_BREAK)."""
    xyz = positionsNm(positions)
    segments, current = [], 0
    for i, frame in enumerate(frames):
        if i > 0:
            previous = frames[i - 1]
            nucleotide = frame.residueType >= FIRST_NUCLEOTIDE
            if nucleotide:
                gap = np.linalg.norm(xyz[frame.atoms[1]] - xyz[previous.atoms[1]]) > RNA_BREAK
            else:
                gap = np.linalg.norm(xyz[frame.atoms[0]] - xyz[previous.atoms[2]]) > PROTEIN_BREAK
            if previous.residue.chain.index != frame.residue.chain.index or gap or \
                    (previous.residueType >= FIRST_NUCLEOTIDE) != nucleotide:
                current += 1
        segments.append(current)
    return segments


def createForce(topology, modelPath=None, sigma=None, scale=None, temperature=None, backend=None, strict=False,
                positions=None):
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
        Attention backend: "sdpa" (default), "auto" ("fused" on CUDA in single/mixed precision, else "sdpa"), "fused"
        (bf16 scalar part on tensor cores, fp32 points), "fused-fp32" or "math".
    strict : bool
        If True, raise ValueError when a residue other than water, an ion or a terminal cap cannot be
        used; otherwise such residues are named in a warning and left out.
    positions : Quantity or [N, 3] array (nm), optional
        With positions, the model's chain ids also split chains at breaks (missing residues), as the
        training data did; without, the chain id is the topology chain's index.

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
    chains = [frame.chain for frame in frames] if positions is None else chainSegments(frames, positions)
    for frame, chain in zip(frames, chains):
        force.addResidue(frame.atoms[0], frame.atoms[1], frame.atoms[2], frame.residueType, chain)
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
