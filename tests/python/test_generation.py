"""Generation: the AnnealingIntegrator and the C++ sampler against an independent probability-flow ODE written
here on the PyTorch twin (float64, autograd), reproducibility with a seed, and bad input."""

import csv
import os
import subprocess
import sys

import numpy as np
import openmm
import openmm.unit as unit
import pytest
import torch

import openmmflashipa
from openmmflashipa import torch_twin
from openmmflashipa.annealing import AnnealingIntegrator
from openmmflashipa.generate import DEFAULT_SIGMA_MAX, DEFAULT_SIGMA_MIN, frameSystem, generate
from openmmflashipa.openmmflashipa import _chainStart, _sampleFrameAtoms

UNK_AA = openmmflashipa.ResidueType.UnknownAminoAcid
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SHARED = os.path.abspath(os.path.join(ROOT, "..", "shared", "data"))
# Tolerance: the plugin evaluates in float32 (LibTorch) and OpenMM Reference integrates in double; the
# oracle is float64. A few Heun steps on a 6-residue chain keep the difference well below 1e-3 nm.
TOLERANCE_NM = 1e-3


@pytest.fixture(scope="module")
def twin():
    return torch_twin.load_energy_model(None, dtype=torch.float64)


def oracle_flow(model, x, types, sigma_max, sigma_min, steps, score_scale=1.0):
    """Heun steps of dx/dsigma = lambda sigma dE/dx on a geometric schedule, then x - lambda sigma_min^2 dE/dx
    (lambda = score_scale)."""
    def grad(x, sigma):
        x = x.detach().requires_grad_(True)
        energy = torch_twin.energy(model, x, types, torch.zeros_like(types), sigma, checked=False).sum()
        return torch.autograd.grad(energy, x)[0]
    sigmas = sigma_max * (sigma_min / sigma_max) ** (np.arange(steps + 1) / steps)
    for s, t in zip(sigmas[:-1], sigmas[1:]):
        d1 = score_scale * s * grad(x, s)
        d2 = score_scale * t * grad(x + (t - s) * d1, t)
        x = x + (t - s) * 0.5 * (d1 + d2)
    return x - score_scale * sigma_min ** 2 * grad(x, sigma_min)


def native_like_chain(length, seed):
    rng = np.random.default_rng(seed)
    ca = np.cumsum(rng.normal(size=(length, 3)) * 0.22, 0)
    return np.stack([ca + [0.1, 0.09, 0.0], ca, ca + [0.12, -0.08, 0.03]], 1) + rng.normal(size=(length, 3, 3)) * 0.01


@pytest.mark.parametrize("score_scale", [1.0, 2.5])
def test_annealing_integrator_matches_twin_flow(twin, score_scale):
    length, steps, sigma_max, sigma_min = 6, 3, 0.3, 0.05
    start = native_like_chain(length, 1)
    system, _ = frameSystem("protein", length)
    integrator = AnnealingIntegrator(sigma_max, sigma_min, steps, scoreScale=score_scale)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(start.reshape(-1, 3))
    integrator.step(steps)
    ours = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    types = torch.full((1, length), UNK_AA, dtype=torch.long)
    expected = oracle_flow(twin, torch.tensor(start)[None], types, sigma_max, sigma_min, steps, score_scale)[0].numpy()
    assert np.max(np.abs(np.asarray(ours).reshape(length, 3, 3) - expected)) < TOLERANCE_NM
    # Moved at all (the test could not pass with a no-op integrator) and sigma left at sigma_min.
    assert np.max(np.abs(expected - start)) > 20 * TOLERANCE_NM
    assert context.getParameter(openmmflashipa.FlashIPAForce.Sigma()) == pytest.approx(sigma_min)
    # Steps beyond the schedule do not move the structure.
    integrator.step(2)
    after = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    assert np.max(np.abs(np.asarray(after) - np.asarray(ours))) < 1e-9


def test_frame_system_leaves_a_degenerate_residue_out_instead_of_stopping():
    # The flow from noise can make a residue's frame atoms collinear for a step (docs/MODEL.md); the frame
    # system must evaluate the other residues and count the skipped one, not raise.
    length = 5
    system, force = frameSystem("protein", length)
    assert force.getDegenerateFramePolicy() == "skip"
    atoms = native_like_chain(length, 2)
    atoms[2, 2] = atoms[2, 1] + 2.0 * (atoms[2, 1] - atoms[2, 0])  # N, CA, C of residue 2 on one line
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(atoms.reshape(-1, 3))
    state = context.getState(getEnergy=True, getForces=True)
    forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoules_per_mole / unit.nanometer)
    assert np.isfinite(state.getPotentialEnergy().value_in_unit(unit.kilojoules_per_mole))
    assert np.all(np.isfinite(forces)) and np.all(forces[6:9] == 0.0)  # the skipped residue's atoms
    assert np.any(forces[:6] != 0.0)
    assert force.getNumSkippedResidues(context) == 1


@pytest.mark.parametrize("score_scale", [1.0, 2.5])
def test_sampler_matches_twin_flow_from_the_same_start(twin, score_scale):
    length, samples, steps, sigma_max, sigma_min, seed = 5, 2, 4, 0.5, 0.05, 11
    raw = _sampleFrameAtoms("", [UNK_AA] * length, [0] * length, samples, steps, sigma_max, sigma_min, seed, "cpu",
                            0.0, score_scale)
    ours = np.frombuffer(raw, dtype=np.float64).reshape(samples, length, 3, 3)
    # The sampler documents its start: ChainSpread::start with torch's CPU generator seeded with `seed` (its
    # statistics are tested in tests/cpp/TestBackboneSampler.cpp).
    start = torch.from_numpy(np.frombuffer(_chainStart([UNK_AA] * length, [0] * length, sigma_max, samples, seed),
                                           dtype=np.float64).reshape(samples, length, 3, 3).copy())
    types = torch.full((samples, length), UNK_AA, dtype=torch.long)
    expected = oracle_flow(twin, start, types, sigma_max, sigma_min, steps, score_scale).numpy()
    assert np.max(np.abs(ours - expected)) < TOLERANCE_NM
    if score_scale != 1.0:  # and the scale is not a no-op: the plain flow ends elsewhere
        plain = oracle_flow(twin, start, types, sigma_max, sigma_min, steps).numpy()
        assert np.max(np.abs(plain - expected)) > 20 * TOLERANCE_NM


def test_score_scale_is_checked_everywhere():
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scoreScale must be positive"):
            generate("protein", 5, 1, numSteps=2, progress=False, scoreScale=bad)
        with pytest.raises(ValueError, match="scoreScale must be positive"):
            AnnealingIntegrator(0.5, 0.05, 2, scoreScale=bad)
    # The binding's own check (the C++ sampler's std::invalid_argument), under generate's.
    with pytest.raises(ValueError, match="scoreScale must be positive"):
        _sampleFrameAtoms("", [UNK_AA] * 3, [0] * 3, 1, 2, 0.5, 0.05, 0, "cpu", 0.0, 0.0)


def test_churn_reaches_the_sampler_and_is_checked():
    # generate(churn=...) is the C++ sampler's churn (its statistics: tests/cpp/TestBackboneSampler.cpp): the same
    # frames as the binding called directly, reproducible with a seed, and not the deterministic flow's.
    churned = generate("protein", 6, 2, seed=5, numSteps=4, progress=False, churn=0.3, platform="CPU")
    raw = _sampleFrameAtoms("", [UNK_AA] * 6, [0] * 6, 2, 4, DEFAULT_SIGMA_MAX, DEFAULT_SIGMA_MIN, 5, "cpu", 0.3, 1.0)
    direct = np.frombuffer(raw, dtype=np.float64).reshape(2, 6, 3, 3)
    assert all(np.array_equal(b.frames, d) for b, d in zip(churned, direct))
    plain = generate("protein", 6, 2, seed=5, numSteps=4, progress=False, platform="CPU")
    assert not np.allclose(plain[0].frames, churned[0].frames)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="churn must be non-negative"):
            generate("protein", 5, 1, numSteps=2, progress=False, churn=bad)
    with pytest.raises(ValueError, match="churn needs method='sampler'"):
        generate("protein", 5, 1, numSteps=2, progress=False, churn=0.1, method="openmm", platform="Reference")


def test_generation_is_reproducible_with_a_seed():
    a = generate("protein", 8, 2, seed=3, numSteps=5, progress=False)
    b = generate("protein", 8, 2, seed=3, numSteps=5, progress=False)
    c = generate("protein", 8, 2, seed=4, numSteps=5, progress=False)
    assert all(np.array_equal(x.frames, y.frames) for x, y in zip(a, b))
    assert not np.allclose(a[0].frames, c[0].frames)
    d = generate("rna", 6, 1, seed=3, numSteps=3, method="openmm", platform="Reference", progress=False)
    e = generate("rna", 6, 1, seed=3, numSteps=3, method="openmm", platform="Reference", progress=False)
    assert np.array_equal(d[0].frames, e[0].frames) and d[0].moltype == "rna"


@pytest.mark.parametrize("kwargs, message", [
    (dict(moltype="dna", length=5), "moltype"),
    (dict(moltype="protein", length=1), "length"),
    (dict(moltype="protein", length=5, numSamples=0), "numSamples"),
    (dict(moltype="protein", length=5, sigmaMax=0.01, sigmaMin=0.02), "sigmaMax"),
    (dict(moltype="protein", length=5, method="magic"), "method"),
])
def test_generate_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(progress=False, **kwargs)


def test_sampler_and_integrator_reject_bad_settings():
    with pytest.raises(ValueError, match="sigmaMax"):
        _sampleFrameAtoms("", [UNK_AA] * 4, [0] * 4, 1, 3, 0.01, 0.02, 0, "cpu")
    with pytest.raises(ValueError, match="residue type"):
        _sampleFrameAtoms("", [99] * 4, [0] * 4, 1, 3, 1.0, 0.02, 0, "cpu")
    with pytest.raises(ValueError):
        AnnealingIntegrator(0.1, 0.2, 5)
    with pytest.raises(ValueError):
        AnnealingIntegrator(1.0, 0.1, 0)


def spread_of(atoms):
    """Root-mean-square displacement per coordinate of frame atoms [L, 3, 3] about their centroid (nm)."""
    flat = atoms.reshape(-1, 3)
    return float(np.sqrt(((flat - flat.mean(0)) ** 2).sum(1).mean() / 3))


@pytest.mark.parametrize("moltype, count", [("protein", 40), ("rna", 16)])
def test_chain_spread_matches_real_chains(moltype, count, tmp_path):
    """Where generation starts (ChainSpread.h) against an oracle read here: single-segment training chains of
    the shared data, spread over their lengths. Tolerance: the power law leaves a median |log ratio| of about
    0.11 per chain on the whole training split; the median log ratio of these chains must lie within 0.12 of 0
    (no bias, which a wrong prefactor or a spread taken as Rg instead of Rg / sqrt(3), log 1.73 = 0.55, breaks)."""
    if not os.path.exists(os.path.join(SHARED, "manifest.tsv")):
        pytest.skip("shared data folder (../shared/data) not present")
    with open(os.path.join(ROOT, "data", "manifest.tsv")) as handle:
        rows = [r for r in csv.DictReader(handle, delimiter="\t")
                if r["moltype"] == moltype and r["split"] == "train" and r["segments"] == "1" and 30 <= int(r["residues"]) <= 400]
    rows.sort(key=lambda r: int(r["residues"]))
    chosen = [rows[int(i)] for i in np.linspace(0, len(rows) - 1, count)]
    path = str(tmp_path / "data.safetensors")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "build_dataset.py"), "--quiet", "--out", path,
                    "--manifest-out", str(tmp_path / "manifest.tsv"), "--files", *[r["file"] for r in chosen]], check=True)
    from openmmflashipa.evaluation import DataSet
    data = DataSet(path)
    ratios = []
    for c in range(len(data)):
        atoms = data.chain(c)[0]
        atoms = atoms[np.isfinite(atoms).all((1, 2))]
        ratios.append(np.log(spread_of(atoms) / openmmflashipa.chainSpread(len(atoms), moltype == "rna")))
    assert len(ratios) >= count - 2
    assert abs(np.median(ratios)) < 0.12, np.round(ratios, 2)
    # The modes the start draws (ChainSpread::modesOfChain, the training split's table): the variance of the first
    # cosine modes, measured here on these chains, summed over chains against the table's at each chain's length.
    # Mean squares of a few dozen chains with heavy tails (elongated chains): within a factor 1.6 for the first
    # mode and 1.4 for the first four together; an isotropic start (the old one) gives mode 1 a tenth of this.
    measured, table = np.zeros(4), np.zeros(4)
    for c in range(len(data)):
        atoms = data.chain(c)[0]
        x = atoms[np.isfinite(atoms).all((1, 2))].reshape(-1, 3)
        n = len(x)
        phi = np.sqrt(2.0 / n) * np.cos(np.pi * np.outer(np.arange(1, 5), np.arange(n) + 0.5) / n)
        measured += ((phi @ (x - x.mean(0))) ** 2).mean(1)
        table += np.array(openmmflashipa.chainModes(n // 3, moltype == "rna")[0][:4])
    assert 1 / 1.6 < measured[0] / table[0] < 1.6, (measured, table)
    assert 1 / 1.4 < measured.sum() / table.sum() < 1.4, (measured, table)
    with pytest.raises(ValueError, match="at least one residue"):
        openmmflashipa.chainModes(0, False)
    # The noised spread combines the two in quadrature.
    assert openmmflashipa.noisedChainSpread(100, False, 0.7) == pytest.approx(np.hypot(0.7, openmmflashipa.chainSpread(100, False)))
    with pytest.raises(ValueError, match="at least one residue"):
        openmmflashipa.chainSpread(0, False)
    with pytest.raises(ValueError, match="sigma"):
        openmmflashipa.noisedChainSpread(10, True, -1.0)
