"""Generating protein and RNA backbones with the learned model (docs/MATH.md §6).

Two routes that integrate the same probability-flow ODE (see annealing.py for why it is an ODE in sigma):

- ``method="sampler"``: the batched C++ sampler (training/src/BackboneSampler.cpp), all samples of one length
  in one model batch, on CUDA when available;
- ``method="openmm"``: inside OpenMM, a System of frame atoms with a FlashIPAForce and an
  :class:`AnnealingIntegrator` that lowers ``flashipaSigma`` step by step; any OpenMM platform.

The model sees generated residues as "unknown amino acid" / "unknown nucleotide"; the output names them GLY
and U (structure.py says why). Both routes draw their starting coordinates from the seed, so a seed gives the
same backbones on the same platform and thread count.
"""

import numpy as np
import openmm
import openmm.unit as unit

from . import annealing
from . import progress as _progress
from .openmmflashipa import FlashIPAForce, _chainStart, _sampleFrameAtoms, UNKNOWN_AMINO_ACID, UNKNOWN_NUCLEOTIDE
from .structure import Backbone

DEFAULT_STEPS = 100
DEFAULT_SIGMA_MIN = 0.02  # nm; below this the score is unreliable (docs/MODEL.md)
DEFAULT_SIGMA_MAX = 1.2   # nm; measured: better local geometry than the model's sigmaMax 2 (docs/WORKFLOWS.md)
FRAME_MASSES = {"protein": (14.007, 12.011, 12.011), "rna": (12.011, 12.011, 15.999)}
UNKNOWN_TYPE = {"protein": UNKNOWN_AMINO_ACID, "rna": UNKNOWN_NUCLEOTIDE}


def _check(moltype, length, numSamples, numSteps, sigmaMax, sigmaMin, seed, scoreScale=1.0, churn=0.0):
    if moltype not in UNKNOWN_TYPE:
        raise ValueError("moltype must be 'protein' or 'rna', not %r" % (moltype,))
    if int(length) < 2:
        raise ValueError("length must be at least 2 residues, got %r" % (length,))
    if int(numSamples) < 1:
        raise ValueError("numSamples must be at least 1")
    if int(numSteps) < 1:
        raise ValueError("numSteps must be at least 1")
    if not (sigmaMax > sigmaMin > 0):
        raise ValueError("need sigmaMax > sigmaMin > 0 nm, got %g and %g" % (sigmaMax, sigmaMin))
    if int(seed) < 0:
        raise ValueError("seed must be non-negative")
    if not (np.isfinite(scoreScale) and scoreScale > 0):
        raise ValueError("scoreScale must be positive and finite, got %r" % (scoreScale,))
    if not (np.isfinite(churn) and churn >= 0):
        raise ValueError("churn must be non-negative and finite, got %r" % (churn,))


def _nm(value, what):
    if unit.is_quantity(value):
        if not value.unit.is_compatible(unit.nanometer):
            raise TypeError("%s must be a length, got %s" % (what, value.unit))
        return float(value.value_in_unit(unit.nanometer))
    return float(value)


def defaultDevice():
    """'cuda' when LibTorch sees a GPU, else 'cpu'."""
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def generate(moltype, length, numSamples=1, seed=0, numSteps=DEFAULT_STEPS, sigmaMax=DEFAULT_SIGMA_MAX,
             sigmaMin=DEFAULT_SIGMA_MIN, method="sampler", platform=None, device=None, modelPath=None,
             progress=True, scoreScale=1.0, churn=0.0):
    """Generate backbones of one length.

    Parameters
    ----------
    moltype : 'protein' or 'rna'
    length : int
        residues per chain
    numSamples : int
    seed : int
        seeds the starting Gaussian coordinates
    numSteps : int
        Heun steps of the ODE (two model evaluations each)
    sigmaMax, sigmaMin : float (nm) or Quantity
        the noise schedule's ends
    method : 'sampler' (batched C++) or 'openmm' (AnnealingIntegrator in a Context)
    platform : str, optional
        OpenMM platform for method="openmm" (default: CUDA if usable, else CPU, else Reference); for
        method="sampler" it picks the device ('CUDA': cuda, 'CPU' or 'Reference': cpu), and a platform that is
        not usable here is an error, never a silent fall-back to the CPU
    device : str, optional
        'cpu' or 'cuda' for method='sampler' (default: from `platform`, else cuda if available)
    modelPath : str, optional
        a checkpoint; None = the shipped model
    progress : bool
        show a progress bar on stderr
    scoreScale : float
        lambda, a factor on the model's score at every step (1: the model's own flow). lambda > 1 samples a
        sharper, lower-temperature distribution (roughly p^lambda): more helix and strand, lower phi > 0, and
        more compact chains (docs/MODEL.md, "Low-temperature sampling")
    churn : float
        method='sampler' only: before each step the noise level is raised from s to s (1 + churn) with fresh
        noise (0: the deterministic ODE). Fewer clashes and less phi > 0, no more helix (docs/MODEL.md,
        "Stochastic churn")

    Returns
    -------
    list of :class:`Backbone`, one per sample
    """
    sigmaMax, sigmaMin = _nm(sigmaMax, "sigmaMax"), _nm(sigmaMin, "sigmaMin")
    scoreScale, churn = float(scoreScale), float(churn)
    _check(moltype, length, numSamples, numSteps, sigmaMax, sigmaMin, seed, scoreScale, churn)
    length, numSamples, numSteps, seed = int(length), int(numSamples), int(numSteps), int(seed)
    if method == "sampler":
        device = _samplerDevice(platform, device)
        frames = _viaSampler(moltype, length, numSamples, seed, numSteps, sigmaMax, sigmaMin, device, modelPath,
                             progress, scoreScale, churn)
    elif method == "openmm":
        if churn != 0:
            raise ValueError("churn needs method='sampler' (the AnnealingIntegrator follows the ODE)")
        frames = _viaOpenMM(moltype, length, numSamples, seed, numSteps, sigmaMax, sigmaMin, platform, modelPath,
                            progress, scoreScale)
    else:
        raise ValueError("method must be 'sampler' or 'openmm', not %r" % (method,))
    return [Backbone(f, moltype) for f in frames]


def _samplerDevice(platform, device):
    """The sampler's device from an OpenMM platform name and/or a device; ValueError when they disagree or the
    one asked for is not usable here (generate --platform CUDA on a machine without CUDA ran on the CPU)."""
    import torch
    if platform is not None:
        choosePlatform(platform)  # ValueError when the plugin has no kernels for it here
        wanted = "cuda" if platform == "CUDA" else "cpu"
        if device is not None and device != wanted:
            raise ValueError("platform %s and device %r disagree" % (platform, device))
        device = wanted
    if device not in (None, "cpu", "cuda"):
        raise ValueError("device must be 'cpu' or 'cuda', not %r" % (device,))
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA was asked for, but LibTorch sees no usable GPU here")
    return device


def _viaSampler(moltype, length, numSamples, seed, numSteps, sigmaMax, sigmaMin, device, modelPath, progress,
                scoreScale=1.0, churn=0.0):
    device = device or defaultDevice()
    types = [UNKNOWN_TYPE[moltype]] * length
    with _progress.spinner("generating %d %s backbone(s) of %d residues (C++ sampler, %s)"
                           % (numSamples, moltype, length, device), enabled=progress):
        raw = _sampleFrameAtoms(modelPath or "", types, [0] * length, numSamples, numSteps, sigmaMax, sigmaMin,
                                seed, device, churn, scoreScale)
    return np.frombuffer(raw, dtype=np.float64).reshape(numSamples, length, 3, 3).copy()


def frameSystem(moltype, length, modelPath=None, types=None):
    """A System of `length` residues' frame atoms (particles 3i, 3i+1, 3i+2) with only a FlashIPAForce of
    residues in one chain, of the given residue types (default: unknown), degenerate-frame policy "skip";
    returns (system, force)."""
    if types is not None and len(types) != length:
        raise ValueError("types has %d entries for %d residues" % (len(types), length))
    system = openmm.System()
    force = FlashIPAForce(modelPath or "")
    for i in range(length):
        for mass in FRAME_MASSES[moltype]:
            system.addParticle(mass)
        force.addResidue(3 * i, 3 * i + 1, 3 * i + 2, UNKNOWN_TYPE[moltype] if types is None else int(types[i]), 0)
    # The flow from noise can pass a residue through a degenerate shape for a step: "skip" leaves it out of
    # that evaluation instead of ending the run (FlashIPAForce.h; the C++ sampler guards such frames
    # numerically). Measured: one of eight denoising runs from sigma = 1 nm stopped on a collinear frame.
    force.setDegenerateFramePolicy("skip")
    system.addForce(force)
    return system, force


def choosePlatform(name=None):
    """An OpenMM platform with the plugin's kernels: `name`, or the first of CUDA, CPU, Reference that has them."""
    from . import hasPlatformKernels
    if name:
        if not hasPlatformKernels(name):
            raise ValueError("the FlashIPA plugin has no kernels for the %s platform here" % name)
        return openmm.Platform.getPlatformByName(name)
    for candidate in ("CUDA", "CPU", "Reference"):
        if hasPlatformKernels(candidate):
            return openmm.Platform.getPlatformByName(candidate)
    raise RuntimeError("no OpenMM platform with FlashIPA kernels was found")


def _viaOpenMM(moltype, length, numSamples, seed, numSteps, sigmaMax, sigmaMin, platform, modelPath, progress,
               scoreScale=1.0):
    system, _ = frameSystem(moltype, length, modelPath)
    integrator = annealing.AnnealingIntegrator(sigmaMax, sigmaMin, numSteps, scoreScale=scoreScale)
    context = openmm.Context(system, integrator, choosePlatform(platform))
    results = []
    bar = _progress.bar(numSamples * numSteps, "generating %d %s backbone(s) of %d residues (OpenMM %s)"
                        % (numSamples, moltype, length, context.getPlatform().getName()), enabled=progress)
    # The noised data's distribution at sigmaMax, drawn as the C++ sampler draws it (ChainSpread::start).
    starts = np.frombuffer(_chainStart([UNKNOWN_TYPE[moltype]] * length, [0] * length, sigmaMax, numSamples, seed),
                           dtype=np.float64).reshape(numSamples, 3 * length, 3)
    try:
        for start in starts:
            context.setPositions(start)
            integrator.restart()
            for _ in range(numSteps):
                integrator.step(1)
                bar.update(1)
            x = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
            x = np.asarray(x, dtype=np.float64).reshape(length, 3, 3)
            if not np.all(np.isfinite(x)):
                raise RuntimeError("generation inside OpenMM produced non-finite coordinates")
            results.append(x)
    finally:
        bar.close()
    return np.stack(results)
