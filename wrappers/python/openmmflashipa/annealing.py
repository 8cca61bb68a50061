"""An OpenMM integrator that follows the learned model's reverse diffusion by annealing ``flashipaSigma``.

Why not minimise at a fixed small sigma? Denoising score matching at noise level sigma trains the energy only
where noisy structures live: for L residues, at a distance of about sigma * sqrt(9 L) from the data. A
minimiser at fixed sigma walks inward, into the region between that shell and the data that training never
visited, and there the learned energy is free to do anything (with our model it squeezes frames until they
are degenerate). Lowering sigma as the structure approaches the data keeps every evaluation where the model
was trained. That is the probability-flow ODE of the variance-exploding diffusion:

    dx/dsigma = sigma * grad E(x, sigma) = -sigma * beta * F(x, sigma),   beta = lambda / (flashipaScale * k_B * T)

(F = forces in kJ/mol/nm of the force groups used; the learned potential is U = flashipaScale * kT * E;
lambda = ``scoreScale``, 1 for the model's own flow, > 1 for low-temperature sampling as in the C++ sampler,
docs/MODEL.md). Each
integrator step is one Heun (trapezoidal) step from sigma_k to sigma_{k+1} on a geometric schedule from
``sigmaMax`` to ``sigmaMin``; the last step also applies Tweedie's correction x + sigmaMin^2 * grad log p, the
posterior mean at sigmaMin. Steps after the last one leave the positions unchanged. Generation starts from
the noised data's distribution at sigmaMax in a Gaussian model (``_chainStart``, ChainSpread.h: the training
chains' variance per cosine mode plus sigmaMax of isotropic noise, docs/MODEL.md); denoising starts from the noisy structure with
sigmaMax set to its noise level.
"""

import math

import openmm

BOLTZMANN_KJ_PER_MOL_K = 0.0083144626  # FlashIPAPlugin::BoltzmannKJPerMolK


class AnnealingIntegrator(openmm.CustomIntegrator):
    """Probability-flow ODE integrator for a System containing a FlashIPAForce.

    Parameters
    ----------
    sigmaMax, sigmaMin : float
        noise levels (nm) of the first and last step; the schedule is geometric.
    numSteps : int
        number of Heun steps (two force evaluations each; three on the last).
    forceGroups : int or set of int, optional
        force groups whose forces drive the flow (default: every force). Give the FlashIPAForce's group to
        let other forces (restraints, a force field) ride along unchanged in the System but not in the flow.
    scoreScale : float, optional
        lambda, a factor on the score at every step, Tweedie's included (default 1: the model's own flow).
    """

    def __init__(self, sigmaMax, sigmaMin, numSteps, forceGroups=None, scoreScale=1.0):
        sigmaMax, sigmaMin, numSteps, scoreScale = float(sigmaMax), float(sigmaMin), int(numSteps), float(scoreScale)
        if not (math.isfinite(scoreScale) and scoreScale > 0):
            raise ValueError("scoreScale must be positive and finite, got %g" % scoreScale)
        if not (sigmaMax > sigmaMin > 0):
            raise ValueError("need sigmaMax > sigmaMin > 0 (nm), got %g and %g" % (sigmaMax, sigmaMin))
        if numSteps < 1:
            raise ValueError("numSteps must be at least 1, got %d" % numSteps)
        super().__init__(0.0)  # the time step is meaningless here: sigma is the integration variable
        force = "f" if forceGroups is None else "f" + _groups(forceGroups)
        self.addGlobalVariable("annealStep", 0)
        self.addGlobalVariable("numSteps", numSteps)
        self.addGlobalVariable("sigmaMax", sigmaMax)
        self.addGlobalVariable("sigmaMin", sigmaMin)
        self.addGlobalVariable("s", sigmaMax)
        self.addGlobalVariable("t", sigmaMax)
        self.addGlobalVariable("beta", 0)
        self.addGlobalVariable("scoreScale", scoreScale)
        self.addPerDofVariable("x0", 0)
        self.addPerDofVariable("d1", 0)
        self.addComputeGlobal("s", "sigmaMax*(sigmaMin/sigmaMax)^(min(annealStep, numSteps)/numSteps)")
        self.addComputeGlobal("t", "sigmaMax*(sigmaMin/sigmaMax)^(min(annealStep+1, numSteps)/numSteps)")
        self.addComputeGlobal("beta", "scoreScale/(flashipaScale*%.10g*flashipaTemperature)" % BOLTZMANN_KJ_PER_MOL_K)
        self.addComputeGlobal("flashipaSigma", "s")
        self.addComputePerDof("x0", "x")
        self.addComputePerDof("d1", "s*beta*%s" % force)
        self.addComputePerDof("x", "x0 + (s-t)*d1")
        self.addComputeGlobal("flashipaSigma", "t")
        self.addComputePerDof("x", "x0 + (s-t)*0.5*(d1 + t*beta*%s)" % force)
        self.beginIfBlock("annealStep = numSteps-1")
        self.addComputePerDof("x", "x + t*t*beta*%s" % force)
        self.endBlock()
        self.addComputeGlobal("annealStep", "annealStep+1")

    def restart(self, sigmaMax=None):
        """Start the schedule again (optionally from another sigmaMax, nm) at the next step()."""
        self.setGlobalVariableByName("annealStep", 0)
        if sigmaMax is not None:
            if not float(sigmaMax) > self.getGlobalVariableByName("sigmaMin"):
                raise ValueError("sigmaMax must exceed sigmaMin")
            self.setGlobalVariableByName("sigmaMax", float(sigmaMax))

    def numSteps(self):
        """The number of steps in one pass of the schedule."""
        return int(self.getGlobalVariableByName("numSteps"))


def _groups(groups):
    if isinstance(groups, int):
        groups = {groups}
    groups = sorted(set(int(g) for g in groups))
    if not groups or any(not 0 <= g < 32 for g in groups):
        raise ValueError("force groups must be in 0..31")
    if len(groups) > 1:
        raise ValueError("AnnealingIntegrator drives the flow with one force group (give the FlashIPAForce "
                         "its own group)")
    return str(groups[0])
