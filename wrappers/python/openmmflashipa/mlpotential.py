"""The learned force through openmm-ml: ``MLPotential("flashipa")``.

openmm-ml finds this module through the ``openmmml.potentials`` entry point that the package declares
(pyproject.toml), so scripts written for openmm-ml's potentials work unchanged::

    from openmmml import MLPotential
    potential = MLPotential("flashipa")                        # or MLPotential("flashipa", modelPath=...)
    system = potential.createMixedSystem(topology, amberSystem, atoms, removeConstraints=False)

FlashIPA's energy is a learned correction *to* a force field (docs/MODEL.md: refinement and MD run amber14
plus the learned force), not a replacement for one. So ``createMixedSystem`` keeps every term of the given
System and adds the learned force on the residues whose frame atoms (protein N, CA, C; RNA C3', C4', O4') are
all among ``atoms``, whatever the embedding is called: openmm-ml's default "mechanical" embedding would
delete the force field's bonds, angles and non-bonded terms between those atoms and leave a chain without
covalent geometry, so this potential implements that name itself, additively ("additive" is the same).
openmm-ml's own ``removeConstraints=True`` default then still removes constraints between the chosen atoms:
pass ``removeConstraints=False`` to keep the force field's bond constraints when ``atoms`` holds hydrogens'
partners, or choose the frame atoms alone (no constraint joins two of them).

``createSystem(topology)`` makes a System with the learned force alone (force-only dynamics of a backbone
model, docs/DESIGN-DECISIONS.md); ``interpolate=True`` scales the learned force by the global parameter
``lambda_interpolate`` (default 1), as openmm-ml's embeddings do.

Arguments of ``MLPotential("flashipa", ...)`` and of ``createSystem``/``createMixedSystem`` are those of
:func:`openmmflashipa.createForce`: ``modelPath``, ``sigma``, ``scale``, ``temperature``, ``backend``,
``strict``, ``positions``.
"""
import os

import openmm
from openmmml.mlpotential import MLPotentialImpl, MLPotentialImplFactory

from .topology import createForce

# createForce's keyword arguments, accepted by the MLPotential constructor and by createSystem/createMixedSystem.
FORCE_ARGUMENTS = ("modelPath", "sigma", "scale", "temperature", "backend", "strict", "positions")
# The embeddings this potential implements (additively, see the module documentation); openmm-ml hands any other
# name to its own embedding plugins.
EMBEDDINGS = ("additive", "mechanical")
# The global parameter of interpolate=True, named as openmm-ml names it.
INTERPOLATION_PARAMETER = "lambda_interpolate"


class FlashIPAPotentialImplFactory(MLPotentialImplFactory):
    """Creates :class:`FlashIPAPotentialImpl` for ``MLPotential("flashipa", **args)``."""

    def createImpl(self, name, **args):
        """The implementation of potential ``name`` with createForce's keyword arguments as defaults."""
        return FlashIPAPotentialImpl(name, **args)


class FlashIPAPotentialImpl(MLPotentialImpl):
    """Adds a :class:`FlashIPAForce` to Systems made through openmm-ml (see the module documentation)."""

    def __init__(self, name, **args):
        self.name = name
        self.defaults = _forceArguments(args, "MLPotential('%s')" % name)
        modelPath = self.defaults.get("modelPath")
        if modelPath is not None and not os.path.isfile(os.fspath(modelPath)):
            raise ValueError("MLPotential('%s'): no model file '%s'" % (name, os.fspath(modelPath)))

    def addForces(self, topology, system, atoms, forceGroup, **args):
        """Add the learned force on the residues whose frame atoms are all in ``atoms`` (all residues if
        None), in ``forceGroup``; with ``interpolate=True`` inside a CustomCVForce scaled by lambda_interpolate."""
        interpolate = bool(args.pop("interpolate", False))
        options = dict(self.defaults)
        options.update(_forceArguments(args, "createSystem"))
        if topology.getNumAtoms() != system.getNumParticles():
            raise ValueError("the topology has %d atoms but the System %d particles"
                             % (topology.getNumAtoms(), system.getNumParticles()))
        force = createForce(topology, atoms=atoms, **options)
        if interpolate:
            wrapper = openmm.CustomCVForce("%s*flashipa" % INTERPOLATION_PARAMETER)
            wrapper.addGlobalParameter(INTERPOLATION_PARAMETER, 1.0)
            wrapper.addCollectiveVariable("flashipa", force)
            force = wrapper
        force.setForceGroup(forceGroup)
        system.addForce(force)

    def getSupportedEmbeddings(self):
        """The embeddings this potential handles itself: "additive" and "mechanical", both additive."""
        return list(EMBEDDINGS)

    def createMixedSystem(self, topology, system, atoms, forceGroup, interpolate, embedding, returnInfo=False, **args):
        """A copy of ``system`` with the learned force added on ``atoms``' residues (nothing removed)."""
        if embedding not in EMBEDDINGS:
            raise ValueError("FlashIPA adds its force to the force field's; embedding must be one of %s, not %r"
                             % (", ".join(EMBEDDINGS), embedding))
        mixed = openmm.XmlSerializer.clone(system)
        self.addForces(topology, mixed, atoms, forceGroup, interpolate=interpolate, **args)
        if returnInfo:
            return dict(system=mixed, topology=topology, oldToNew=list(range(topology.getNumAtoms())))
        return mixed


def _forceArguments(args, where):
    """createForce's keyword arguments from args; a ValueError names any other."""
    unknown = sorted(set(args) - set(FORCE_ARGUMENTS))
    if unknown:
        raise ValueError("%s: unknown argument(s) %s (FlashIPA takes %s)" % (where, ", ".join(unknown),
                                                                           ", ".join(FORCE_ARGUMENTS)))
    return {key: value for key, value in args.items() if value is not None}
