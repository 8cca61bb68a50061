"""openmmflashipa: a learned FlashIPA frame-model energy for OpenMM.

Importing the package loads the plugin's kernels into OpenMM (the Reference platform, and the CUDA
platform where that plugin was built and a GPU is usable), so that a :class:`FlashIPAForce` added to a
``System`` can be evaluated in a ``Context``.

Main entry points:

- :class:`FlashIPAForce` -- the force (an ``openmm.Force``); ``FlashIPAForce.cast(force)`` and
  ``FlashIPAForce.isinstance(force)`` recover it from ``System.getForce()`` or ``XmlSerializer``.
- :func:`createForce` -- build a FlashIPAForce from an ``openmm.app.Topology``, choosing the frame atoms
  of every protein and RNA residue.
- :class:`ResidueType` -- the model's residue-type vocabulary.
"""

# LibTorch must be initialised by its own Python module before our extension (which links it) is loaded:
# importing torch afterwards aborted the interpreter once a CUDA Context existed.
import torch as _torch  # noqa: F401

import os as _os

#: The most intra-op threads LibTorch gets by default (see defaultThreadCount).
MAX_DEFAULT_THREADS = 4


def defaultThreadCount():
    """Intra-op threads for LibTorch (the model's CPU evaluations, Python and C++ share one pool): the
    environment variable FLASHIPA_NUM_THREADS if set, else OMP_NUM_THREADS if set, else the cores this process
    may use, at most MAX_DEFAULT_THREADS. LibTorch's own default is one thread per core, and with the machine's
    other work on those cores its OpenMP threads wait for each other: force evaluations ran 50-340x slower on
    a busy two-core machine (docs/KNOWN-ISSUES.md)."""
    for name in ("FLASHIPA_NUM_THREADS", "OMP_NUM_THREADS"):
        value = _os.environ.get(name, "").strip()
        if value:
            try:
                count = int(value)
            except ValueError:
                raise ImportError("openmmflashipa: %s=%r is not a positive integer" % (name, value))
            if count < 1:
                raise ImportError("openmmflashipa: %s=%r is not a positive integer" % (name, value))
            return count
    try:
        cores = len(_os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = _os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_THREADS))


_torch.set_num_threads(defaultThreadCount())

import openmm as _openmm

from ._buildpaths import VERSION as __version__  # the repository's VERSION file, through CMake

from .openmmflashipa import (
    FlashIPAForce,
    chainModes,
    chainSpread,
    noisedChainSpread,
    residueTypeName as _residueTypeName,
    residueTypeFromName as _residueTypeFromName,
    RESIDUE_TYPE_COUNT as _RESIDUE_TYPE_COUNT,
    NUM_AMINO_ACIDS as _NUM_AMINO_ACIDS,
    UNKNOWN_AMINO_ACID as _UNKNOWN_AMINO_ACID,
    FIRST_NUCLEOTIDE as _FIRST_NUCLEOTIDE,
    UNKNOWN_NUCLEOTIDE as _UNKNOWN_NUCLEOTIDE,
)
from . import _plugins
from .topology import FrameResidue, selectFrameResidues, createForce

__all__ = [
    "FlashIPAForce",
    "ResidueType",
    "FrameResidue",
    "selectFrameResidues",
    "createForce",
    "pluginLibraries",
    "pluginLoadFailures",
    "hasPlatformKernels",
    "defaultThreadCount",
    "chainModes",
    "chainSpread",
    "noisedChainSpread",
]


class ResidueType:
    """The residue-type vocabulary of the model (mirrors ``FlashIPAPlugin::ResidueType`` in C++).

    0-19: the 20 amino acids in alphabetical three-letter order (ALA ... VAL); 20: unknown amino acid;
    21-24: A C G U; 25: unknown nucleotide.
    """

    NumAminoAcids = _NUM_AMINO_ACIDS
    UnknownAminoAcid = _UNKNOWN_AMINO_ACID
    FirstNucleotide = _FIRST_NUCLEOTIDE
    UnknownNucleotide = _UNKNOWN_NUCLEOTIDE
    Count = _RESIDUE_TYPE_COUNT

    @staticmethod
    def name(residueType):
        """The three-letter (protein) or one-letter (RNA) name of a type; 'UNK'/'N' for the unknowns."""
        return _residueTypeName(int(residueType))

    @staticmethod
    def fromName(residueName):
        """The type of a residue name (also common variants: HIE, CYX, MSE, RA5, ...); -1 if unknown."""
        return _residueTypeFromName(str(residueName))

    @staticmethod
    def isNucleotide(residueType):
        """True for types 21-25, whose frames use C3', C4', O4'."""
        return ResidueType.FirstNucleotide <= residueType < ResidueType.Count


_plugins.load()

#: Plugin libraries loaded into OpenMM by this package (full paths).
pluginLibraries = _plugins.loaded
#: Plugin libraries that exist but could not be loaded, as {path: error message} (e.g. the CUDA plugin
#: on a machine without a usable GPU driver).
pluginLoadFailures = _plugins.failures


def hasPlatformKernels(platformName):
    """True if FlashIPAForce can run on the named OpenMM platform ('Reference', 'CUDA', ...)."""
    try:
        platform = _openmm.Platform.getPlatformByName(platformName)
    except Exception:
        return False
    return platform.supportsKernels(["CalcFlashIPAForce"])

