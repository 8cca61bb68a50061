"""The FlashIPA energy as an ``openmm.PythonForce`` driving the PyTorch twin of the model.

This is the "same network in PyTorch, driven by ``openmm.PythonForce``" baseline of the CUDA benchmark:
what a user gets by running the model the way openmm-ml runs PyTorch models through PythonForce: at
every force evaluation OpenMM hands a ``State`` to a Python callback, which copies the frame atoms'
positions into a torch tensor on the chosen device, evaluates the energy, differentiates it with
autograd, and returns energy and forces (with units) as NumPy data that OpenMM copies back.

The force computes the same U = flashipaScale * kT * E(x, flashipaSigma) as :class:`FlashIPAForce`
(``kT = 0.0083144626 * flashipaTemperature`` kJ/mol), with the same global parameter names and defaults,
so scripts that call ``Context.setParameter`` work with either. Differences from FlashIPAForce: no
energy parameter derivatives, and (PythonForce cannot declare bonds) no grouping of the chains into one
molecule for periodic wrapping; the force itself is non-periodic like FlashIPAForce.
"""

import os

import numpy as np
import openmm
import openmm.app
import openmm.unit as unit
import torch

from . import torch_twin
from .openmmflashipa import FlashIPAForce
# The global parameters' defaults are FlashIPAForce's (docs/DESIGN-DECISIONS.md).
from .topology import DEFAULT_SCALE, DEFAULT_SIGMA, DEFAULT_TEMPERATURE, _toFloat

__all__ = ["createPythonForce", "TwinComputation", "DEFAULT_SCALE", "DEFAULT_SIGMA", "DEFAULT_TEMPERATURE"]

#: Global parameter names: FlashIPAForce::Scale(), Sigma(), Temperature().
SCALE_PARAMETER = FlashIPAForce.Scale()
SIGMA_PARAMETER = FlashIPAForce.Sigma()
TEMPERATURE_PARAMETER = FlashIPAForce.Temperature()

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "single": torch.float32, "double": torch.float64}


def _dtype(dtype):
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError("dtype must be float32 or float64, got %s" % dtype)
        return dtype
    try:
        return _DTYPES[str(dtype)]
    except KeyError:
        raise ValueError("dtype must be float32 or float64, got %r" % (dtype,)) from None


class TwinComputation:
    """The PythonForce callback: the twin model evaluated on the frame atoms.

    The PythonForce is restricted (``setParticles``) to the frame atoms in residue order (a, b, c of
    residue 0, then residue 1, ...), so ``state.getPositions()`` holds exactly them. Instances pickle as
    their construction arguments (the model is re-read from the checkpoint when unpickled), so the force
    can go through ``XmlSerializer``.
    """

    def __init__(self, modelPath, types, chains, device="cuda", dtype=torch.float32, backend="sdpa",
                 checkFrames=True):
        self.modelPath = None if modelPath is None else os.fspath(modelPath)
        self.deviceName = str(device)
        self.dtype = _dtype(dtype)
        self.backend = backend
        self.checkFrames = bool(checkFrames)
        self.typeList = [int(t) for t in types]
        self.chainList = [int(c) for c in chains]
        if len(self.typeList) != len(self.chainList) or not self.typeList:
            raise ValueError("need one type and one chain per residue, and at least one residue")
        if backend not in ("sdpa", "math"):
            raise ValueError("attention backend must be \"sdpa\" or \"math\" (\"fused\" exists only in the plugin)")
        self._setUp()

    def _setUp(self):
        self.device = torch.device(self.deviceName)
        self.model = torch_twin.load_energy_model(self.modelPath, device=self.device, dtype=self.dtype,
                                                  backend=self.backend)
        self.types = torch.tensor(self.typeList, dtype=torch.int64, device=self.device).view(1, -1)
        self.chains = torch.tensor(self.chainList, dtype=torch.int64, device=self.device).view(1, -1)
        if bool(((self.types < 0) | (self.types >= torch_twin.RESIDUE_TYPE_COUNT)).any()):
            raise ValueError("residue types must lie in [0, %d)" % torch_twin.RESIDUE_TYPE_COUNT)

    def __getstate__(self):
        return {key: getattr(self, key) for key in
                ("modelPath", "deviceName", "dtype", "backend", "checkFrames", "typeList", "chainList")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._setUp()

    def evaluate(self, positions, scale=DEFAULT_SCALE, sigma=DEFAULT_SIGMA, temperature=DEFAULT_TEMPERATURE):
        """(energy kJ/mol, forces [3L, 3] kJ/mol/nm) as torch tensors, from frame-atom positions [3L, 3] nm."""
        atoms = torch.as_tensor(positions).to(self.device, self.dtype).view(1, -1, 3, 3)
        energy, forces = torch_twin.energy_and_forces(self.model, atoms, self.types, self.chains, sigma, scale=scale,
                                                      temperature=temperature, checked=self.checkFrames)
        return energy, forces.view(-1, 3)

    def __call__(self, state):
        positions = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        parameters = state.getParameters()
        energy, forces = self.evaluate(np.asarray(positions), float(parameters[SCALE_PARAMETER]),
                                       float(parameters[SIGMA_PARAMETER]), float(parameters[TEMPERATURE_PARAMETER]))
        return (float(energy) * unit.kilojoules_per_mole,
                forces.detach().to("cpu", torch.float64).numpy() * (unit.kilojoules_per_mole / unit.nanometer))


def _residuesOf(source, strict):
    """(frame atoms, types, chains, model path or None, defaults dict) from the accepted inputs."""
    if isinstance(source, openmm.app.Topology):
        from .topology import reportUnusable, selectFrameResidues

        frames, unusable = selectFrameResidues(source)
        reportUnusable(unusable, strict, stacklevel=4)
        return ([f.atoms for f in frames], [f.residueType for f in frames], [f.chain for f in frames], None, {})
    if isinstance(source, openmm.Force):
        from .openmmflashipa import FlashIPAForce

        if isinstance(source, FlashIPAForce):
            force = source
        else:
            if not FlashIPAForce.isinstance(source):
                raise TypeError("createPythonForce: %s is not a FlashIPAForce" % type(source).__name__)
            owned = source.thisown
            force = FlashIPAForce.cast(source)
            if owned:
                # cast() moves ownership of the C++ object to its result; give it back to the caller's
                # object, which outlives this function (the result must not delete it when collected).
                force.thisown = False
                source.thisown = True
        atoms, types, chains = [], [], []
        for i in range(force.getNumResidues()):
            a, b, c, residueType, chain = force.getResidueParameters(i)
            atoms.append((a, b, c))
            types.append(residueType)
            chains.append(chain)
        defaults = {"scale": force.getDefaultScale(), "sigma": force.getDefaultSigma(),
                    "temperature": force.getDefaultTemperature()}
        return atoms, types, chains, force.getResolvedModelPath(), defaults
    atoms, types, chains = [], [], []
    for item in source:
        if hasattr(item, "atoms") and hasattr(item, "residueType"):  # FrameResidue
            atoms.append(tuple(item.atoms))
            types.append(item.residueType)
            chains.append(item.chain)
        else:  # (atomA, atomB, atomC, residueType, chain)
            a, b, c, residueType, chain = item
            atoms.append((a, b, c))
            types.append(residueType)
            chains.append(chain)
    return atoms, types, chains, None, {}


def createPythonForce(residues, modelPath=None, device="cuda", dtype="float32", backend="sdpa", sigma=None,
                      scale=None, temperature=None, strict=False, checkFrames=True):
    """Create an ``openmm.PythonForce`` evaluating the FlashIPA model in PyTorch (the twin of the plugin).

    Parameters
    ----------
    residues : openmm.app.Topology, FlashIPAForce, or sequence
        The residues the model sees: a Topology (frame atoms chosen as :func:`openmmflashipa.createForce`
        does), an existing FlashIPAForce (its residues, default parameters and model are copied), or a
        sequence of :data:`openmmflashipa.FrameResidue` or ``(atomA, atomB, atomC, residueType, chain)``.
    modelPath : str or os.PathLike, optional
        A safetensors checkpoint; ``None`` selects the shipped model (or the FlashIPAForce's model).
    device : str or torch.device
        Where PyTorch evaluates the model: "cuda" (default) or "cpu".
    dtype : "float32" (default), "float64" or a torch dtype
        Precision of the model and coordinates.
    backend : "sdpa" (default) or "math"
        Attention implementation (both compute the same function).
    sigma, scale, temperature : optional
        Defaults of the global parameters flashipaSigma (nm), flashipaScale and flashipaTemperature (K);
        unset ones take FlashIPAForce's defaults (0.05 nm, 1, 300 K).
    strict : bool
        With a Topology: raise ValueError if a residue other than water, ions or caps is unusable.
    checkFrames : bool
        Test the frames on the host at every evaluation and raise a clear error for degenerate ones
        (as the plugin's Reference platform does); False skips the test (no host synchronisation).

    Returns
    -------
    openmm.PythonForce
    """
    atoms, types, chains, sourceModel, defaults = _residuesOf(residues, strict)
    if not atoms:
        raise ValueError("FlashIPA: no amino-acid (N, CA, C) or nucleotide (C3', C4', O4') residue to build "
                         "frames from")
    particles = [int(index) for frame in atoms for index in frame]
    if len(set(particles)) != len(particles):
        raise ValueError("FlashIPA: an atom belongs to more than one frame (or twice to one)")
    if min(particles) < 0:
        raise ValueError("FlashIPA: negative atom index")
    if modelPath is None:
        modelPath = sourceModel
    computation = TwinComputation(modelPath, types, chains, device=device, dtype=dtype, backend=backend,
                                  checkFrames=checkFrames)
    parameters = {
        SCALE_PARAMETER: _toFloat(scale, unit.dimensionless, "scale") if scale is not None
        else defaults.get("scale", DEFAULT_SCALE),
        SIGMA_PARAMETER: _toFloat(sigma, unit.nanometer, "sigma") if sigma is not None
        else defaults.get("sigma", DEFAULT_SIGMA),
        TEMPERATURE_PARAMETER: _toFloat(temperature, unit.kelvin, "temperature") if temperature is not None
        else defaults.get("temperature", DEFAULT_TEMPERATURE),
    }
    force = openmm.PythonForce(computation, parameters)
    force.setParticles(particles)
    force.setUsesPeriodicBoundaryConditions(False)
    force.setName("FlashIPAPythonForce")
    return force
