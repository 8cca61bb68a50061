"""Tests of openmmflashipa.metrics against independent oracles.

Oracles: Horn's quaternion solution of the superposition problem (a different algorithm from the SVD one
under test), direct formulas applied to constructed structures with known answers (rigid copies, mirror
images, partly displaced chains, spheres), brute-force O(N^2) pair counts, and ideal alpha-helix / beta
backbones built here from standard bond lengths, angles and dihedrals. Tolerances are stated at each check.

The module is imported from the package when the package is importable (built plugin on the path), and
otherwise loaded from its source file (metrics.py imports nothing from the package)."""

import importlib.util
import os
import time

import numpy as np
import pytest

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
SOURCE = os.path.join(ROOT, "wrappers", "python", "openmmflashipa", "metrics.py")

try:
    from openmmflashipa import metrics
except ImportError:
    _spec = importlib.util.spec_from_file_location("flashipa_metrics", SOURCE)
    metrics = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(metrics)


# ---------------------------------------------------------------------------------------------------
# Helpers (oracles)


def randomRotation(rng):
    """A uniformly random proper rotation (QR of a Gaussian matrix, signs fixed, det +1)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def randomChain(rng, n, step=0.38):
    """A self-avoiding-ish random walk with CA-like spacing (nm)."""
    steps = rng.normal(size=(n, 3))
    steps *= step / np.linalg.norm(steps, axis=1, keepdims=True)
    return np.cumsum(steps, axis=0)


def hornRMSD(x, y):
    """Minimal RMSD over proper rotations and translations by Horn's quaternion method: the largest
    eigenvalue of the 4x4 key matrix built from the covariance gives the best sum of dot products."""
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    s = x.T @ y
    sxx, sxy, sxz = s[0]
    syx, syy, syz = s[1]
    szx, szy, szz = s[2]
    k = np.array([
        [sxx + syy + szz, syz - szy, szx - sxz, sxy - syx],
        [syz - szy, sxx - syy - szz, sxy + syx, szx + sxz],
        [szx - sxz, sxy + syx, -sxx + syy - szz, syz + szy],
        [sxy - syx, szx + sxz, syz + szy, -sxx - syy + szz],
    ])
    lam = np.linalg.eigvalsh(k)[-1]
    e = (np.sum(x * x) + np.sum(y * y) - 2.0 * lam) / len(x)
    return float(np.sqrt(max(e, 0.0)))


def tmOfDistances(d, d0):
    return float(np.mean(1.0 / (1.0 + (d / d0) ** 2)))


def bruteClashes(x, res, cutoff, minSep):
    count = 0
    for i in range(len(x) - 1):
        d = np.linalg.norm(x[i + 1:] - x[i], axis=1)
        far = np.abs(res[i + 1:] - res[i]) >= minSep
        count += int(np.count_nonzero((d < cutoff) & far))
    return count


def placeAtom(a, b, c, bond, angle, torsion):
    """Position of atom d with |cd| = bond, angle(b, c, d) = angle, dihedral(a, b, c, d) = torsion
    (angles in degrees)."""
    angle = np.radians(angle)
    torsion = np.radians(torsion)
    bc = c - b
    bc /= np.linalg.norm(bc)
    normal = np.cross(b - a, bc)
    normal /= np.linalg.norm(normal)
    m = np.stack([bc, np.cross(normal, bc), normal], axis=1)
    local = bond * np.array([-np.cos(angle), np.sin(angle) * np.cos(torsion), np.sin(angle) * np.sin(torsion)])
    return c + m @ local


def dihedral(a, b, c, d):
    b0, b1, b2 = a - b, c - b, d - c
    b1 = b1 / np.linalg.norm(b1)
    v = b0 - np.dot(b0, b1) * b1
    w = b2 - np.dot(b2, b1) * b1
    return np.degrees(np.arctan2(np.dot(np.cross(b1, v), w), np.dot(v, w)))


# Standard backbone geometry (Engh & Huber), lengths in angstroms, angles in degrees.
N_CA, CA_C, C_N, C_O = 1.458, 1.525, 1.329, 1.231
ANGLE_N_CA_C, ANGLE_CA_C_N, ANGLE_C_N_CA, ANGLE_CA_C_O = 111.2, 116.2, 121.7, 120.5


def idealBackbone(n, phi, psi, omega=180.0):
    """[n, 4, 3] backbone (N, CA, C, O) in nm with the given phi, psi, omega for every residue; O lies in
    the peptide plane, trans to N(i+1) about CA-C (dihedral N-CA-C-O = psi + 180)."""
    atoms = [np.array([0.0, 0.0, 0.0]), np.array([N_CA, 0.0, 0.0])]
    t = np.radians(180.0 - ANGLE_N_CA_C)
    atoms.append(atoms[1] + CA_C * np.array([np.cos(t), np.sin(t), 0.0]))
    for _ in range(n - 1):
        nAt, ca, c = atoms[-3], atoms[-2], atoms[-1]
        n1 = placeAtom(nAt, ca, c, C_N, ANGLE_CA_C_N, psi)
        ca1 = placeAtom(ca, c, n1, N_CA, ANGLE_C_N_CA, omega)
        c1 = placeAtom(c, n1, ca1, CA_C, ANGLE_N_CA_C, phi)
        atoms += [n1, ca1, c1]
    bb = np.array(atoms).reshape(n, 3, 3)
    o = np.array([placeAtom(r[0], r[1], r[2], C_O, ANGLE_CA_C_O, psi + 180.0) for r in bb])
    return np.concatenate([bb, o[:, None, :]], axis=1) / 10.0


# ---------------------------------------------------------------------------------------------------
# RMSD and superposition


def test_rmsd_of_rigid_copy_is_zero():
    rng = np.random.default_rng(1)
    for _ in range(5):
        ref = randomChain(rng, 50)
        x = ref @ randomRotation(rng).T + rng.normal(size=3) * 5.0
        assert metrics.kabschRMSD(x, ref) < 1e-6
        np.testing.assert_allclose(metrics.superpose(x, ref), ref, atol=1e-6)


def test_rmsd_with_noise_matches_horn_and_direct_formula():
    rng = np.random.default_rng(2)
    for sigma in (0.01, 0.1, 0.5):
        ref = randomChain(rng, 40)
        noise = rng.normal(size=ref.shape) * sigma
        x = (ref + noise) @ randomRotation(rng).T + rng.normal(size=3)
        rmsd = metrics.kabschRMSD(x, ref)
        # Independent algorithm (Horn's quaternions), agreement to 1e-9 nm.
        assert rmsd == pytest.approx(hornRMSD(x, ref), abs=1e-9)
        # Direct formula on the superposed coordinates, 1e-12 relative.
        moved = metrics.superpose(x, ref)
        direct = np.sqrt(np.mean(np.sum((moved - ref) ** 2, axis=1)))
        assert rmsd == pytest.approx(direct, rel=1e-12)
        # The known transform (undoing rotation and translation) is one candidate: optimum is no worse.
        centredNoise = noise - noise.mean(axis=0)
        assert rmsd <= np.sqrt(np.mean(np.sum(centredNoise ** 2, axis=1))) + 1e-12
        # Superposition is rigid: internal distances kept (1e-9 nm).
        dx = np.linalg.norm(x[:, None] - x[None], axis=-1)
        dm = np.linalg.norm(moved[:, None] - moved[None], axis=-1)
        np.testing.assert_allclose(dm, dx, atol=1e-9)


def test_superpose_is_proper_rotation_not_reflection():
    rng = np.random.default_rng(3)
    ref = randomChain(rng, 30)
    mirror = ref * np.array([-1.0, 1.0, 1.0])
    rmsd = metrics.kabschRMSD(mirror, ref)
    assert rmsd > 0.05  # a random chain is chiral: no rotation maps its mirror image onto it
    assert rmsd == pytest.approx(hornRMSD(mirror, ref), abs=1e-9)  # Horn: proper rotations only
    moved = metrics.superpose(mirror, ref)
    # The transform implied by superpose has det +1: signed volumes (handedness) of the mirror kept.
    a, b, c, d = moved[:4]
    a0, b0, c0, d0 = mirror[:4]
    vol = np.dot(np.cross(b - a, c - a), d - a)
    vol0 = np.dot(np.cross(b0 - a0, c0 - a0), d0 - a0)
    assert vol == pytest.approx(vol0, rel=1e-9)


# ---------------------------------------------------------------------------------------------------
# TM-score


def test_tm_d0_formula_and_floor():
    # 0.1 * (1.24 * (L - 15)^(1/3) - 1.8) nm; L = 100: 85^(1/3) = 4.3968...
    assert metrics._tmD0(100) == pytest.approx(0.1 * (1.24 * 85.0 ** (1.0 / 3.0) - 1.8), rel=1e-12)
    for length in (3, 10, 15, 18):
        assert metrics._tmD0(length) == pytest.approx(0.05)


def test_tm_score_of_identical_and_rotated_copies_is_one():
    rng = np.random.default_rng(4)
    for n in (3, 10, 80):
        ref = randomChain(rng, n)
        assert metrics.tmScore(ref, ref) == pytest.approx(1.0, abs=1e-6)
        x = ref @ randomRotation(rng).T + rng.normal(size=3) * 3.0
        assert metrics.tmScore(x, ref) == pytest.approx(1.0, abs=1e-6)


def test_tm_score_half_displaced():
    """First 60 of 100 residues unmoved, last 40 translated by 8 nm (d0 = 0.365 nm). Aligning the
    unmoved part exactly gives 0.6 plus the tiny contribution of the displaced ones (computed
    analytically for that superposition); no superposition can do noticeably better."""
    rng = np.random.default_rng(5)
    ref = randomChain(rng, 100)
    x = ref.copy()
    x[60:] += np.array([8.0, 0.0, 0.0])
    d0 = metrics._tmD0(100)
    expected = tmOfDistances(np.linalg.norm(x - ref, axis=1), d0)
    assert 0.6 < expected < 0.602
    R = randomRotation(rng)
    score = metrics.tmScore(x @ R.T + 1.0, ref)
    assert score >= expected - 1e-9
    assert score == pytest.approx(expected, abs=0.01)


def test_tm_score_decreases_with_noise_and_beats_plain_superposition():
    rng = np.random.default_rng(6)
    ref = randomChain(rng, 120)
    d0 = metrics._tmD0(120)
    unitNoise = rng.normal(size=ref.shape)
    scores = []
    for sigma in (0.02, 0.1, 0.3, 0.8):
        x = ref + sigma * unitNoise
        score = metrics.tmScore(x, ref)
        assert 0.0 < score <= 1.0
        # The full-length Kabsch superposition is one of the candidates: the search can only improve it.
        plain = tmOfDistances(np.linalg.norm(metrics.superpose(x, ref) - ref, axis=1), d0)
        assert score >= plain - 1e-12
        scores.append(score)
    assert all(a > b for a, b in zip(scores, scores[1:]))
    assert scores[0] > 0.95 and scores[-1] < 0.5


def test_tm_score_is_at_least_every_fragment_superposition():
    """Hinge motions plus noise: the score must be at least the TM-score (computed here directly) of the
    superposition on every window of every length >= 4 (an exhaustive set of simple candidates), and of
    the superposition on each rigid domain."""
    rng = np.random.default_rng(13)
    for _ in range(4):
        n = int(rng.integers(30, 60))
        ref = randomChain(rng, n)
        k = int(rng.integers(8, n - 8))
        x = ref.copy()
        x[k:] = (x[k:] - x[k]) @ randomRotation(rng).T + x[k]
        x += rng.normal(size=x.shape) * rng.uniform(0.05, 0.3)
        d0 = metrics._tmD0(n)
        score = metrics.tmScore(x, ref)
        lower = 0.0
        for length in range(4, n + 1):
            for start in range(0, n - length + 1):
                part = slice(start, start + length)
                # The transform superpose() applies to the fragment, recovered and applied to the chain.
                r, t = fitTransform(x[part], metrics.superpose(x[part], ref[part]))
                moved = x @ r.T + t
                lower = max(lower, tmOfDistances(np.linalg.norm(moved - ref, axis=1), d0))
        assert score >= lower - 1e-9
        assert score <= 1.0


def fitTransform(a, b):
    """Exact rigid transform (R, t) with b = a R^T + t, from >= 3 non-collinear point pairs (least squares
    through homogeneous coordinates; b is an exact rigid image of a)."""
    homogeneous = np.concatenate([a, np.ones((len(a), 1))], axis=1)
    m, *_ = np.linalg.lstsq(homogeneous, b, rcond=None)
    return m[:3].T, m[3]


def test_tm_score_normalised_by_reference_length_positive_for_far_structures():
    rng = np.random.default_rng(7)
    ref = randomChain(rng, 30)
    x = randomChain(rng, 30) * 5.0
    score = metrics.tmScore(x, ref)
    assert 0.0 < score < 0.5


# ---------------------------------------------------------------------------------------------------
# Secondary structure


def test_ideal_geometry_builder():
    """The builder itself: dihedrals and bond lengths as requested (oracle for the DSSP tests)."""
    bb = idealBackbone(8, -57.0, -47.0) * 10.0
    for i in range(1, 7):
        assert dihedral(bb[i - 1, 2], bb[i, 0], bb[i, 1], bb[i, 2]) == pytest.approx(-57.0, abs=1e-6)
        assert dihedral(bb[i, 0], bb[i, 1], bb[i, 2], bb[i + 1, 0]) == pytest.approx(-47.0, abs=1e-6)
        assert abs(dihedral(bb[i, 1], bb[i, 2], bb[i + 1, 0], bb[i + 1, 1])) == pytest.approx(180.0, abs=1e-6)
        assert np.linalg.norm(bb[i, 2] - bb[i + 1, 0]) == pytest.approx(C_N, abs=1e-9)
        assert np.linalg.norm(bb[i, 2] - bb[i, 3]) == pytest.approx(C_O, abs=1e-9)
        # O in the peptide plane (CA, C, N+1).
        assert abs(dihedral(bb[i, 1], bb[i + 1, 0], bb[i, 2], bb[i, 3])) == pytest.approx(180.0, abs=1e-6)


def test_secondary_structure_of_ideal_helix_and_strand():
    helix = metrics.secondaryStructure(idealBackbone(20, -57.0, -47.0))
    assert helix.shape == (20,)
    assert set(helix.tolist()) <= {"H", "E", "-"}
    assert np.count_nonzero(helix == "H") >= 15  # all but the chain ends
    assert np.all(helix[2:-2] == "H")
    strand = metrics.secondaryStructure(idealBackbone(20, -120.0, 130.0))
    assert np.count_nonzero(strand == "H") <= 2
    # Invariant under rigid motion.
    rng = np.random.default_rng(8)
    bb = idealBackbone(12, -57.0, -47.0)
    moved = bb @ randomRotation(rng).T + 2.0
    np.testing.assert_array_equal(metrics.secondaryStructure(moved), metrics.secondaryStructure(bb))


def test_secondary_structure_short_chains():
    """pydssp needs 6 residues; shorter chains are padded with far-away residues: the result has one
    letter per residue. (A 5-residue ideal helix has a single i -> i+4 turn, and DSSP needs two
    consecutive turns for 'H', so it comes out as coil.)"""
    for n in (1, 2, 5):
        ss = metrics.secondaryStructure(idealBackbone(n, -57.0, -47.0))
        assert ss.shape == (n,)
        assert set(ss.tolist()) <= {"H", "E", "-"}
    assert "".join(metrics.secondaryStructure(idealBackbone(5, -57.0, -47.0))) == "-----"
    assert "".join(metrics.secondaryStructure(idealBackbone(6, -57.0, -47.0))) == "-HHHH-"


def test_secondary_structure_fractions_and_retention():
    f = metrics.secondaryStructureFractions("HHHHEE----")
    assert f == pytest.approx({"helix": 0.4, "strand": 0.2, "coil": 0.4})
    f = metrics.secondaryStructureFractions(np.array(list("HE-H")))
    assert f == pytest.approx({"helix": 0.5, "strand": 0.25, "coil": 0.25})
    # Reference has 4 H + 2 E = 6 structured residues.
    assert metrics.secondaryStructureRetention("HHH-EE--", "HHHHEE--") == pytest.approx(5 / 6)
    # Kept: H at 0, 1, 2 and E at 5 (coil gained at 6, 7 does not matter) -> 4/6.
    assert metrics.secondaryStructureRetention("HHH--E-H", "HHHHEE--") == pytest.approx(4 / 6)
    assert metrics.secondaryStructureRetention("EEEEEE--", "HHHHEE--") == pytest.approx(2 / 6)
    assert metrics.secondaryStructureRetention("HHH", "---") == 1.0  # nothing to retain


# ---------------------------------------------------------------------------------------------------
# Bonds, clashes, radius of gyration


def test_bond_violations_constructed():
    atoms = np.array([[0.0, 0, 0], [0.15, 0, 0], [0.30, 0, 0], [0.45, 0, 0], [0.60, 0, 0]])
    bonds = [(0, 1, 0.15), (1, 2, 0.15), (2, 3, 0.13), (3, 4, 0.1505)]
    result = metrics.bondViolations(atoms, bonds)
    assert result["count"] == 1
    assert result["fraction"] == pytest.approx(0.25)
    assert result["max_deviation"] == pytest.approx(0.02, abs=1e-12)
    # Tighter tolerance: 0.0005 deviation now violates too.
    assert metrics.bondViolations(atoms, bonds, tolerance=1e-4)["count"] == 2
    assert metrics.bondViolations(atoms, bonds, tolerance=0.05)["count"] == 0
    assert metrics.bondViolations(atoms, []) == {"count": 0, "fraction": 0.0, "max_deviation": 0.0}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("minSep", [0, 1, 2, 4])
def test_clashes_match_brute_force(seed, minSep):
    rng = np.random.default_rng(seed)
    n = 600
    x = rng.uniform(0.0, 2.0, size=(n, 3))
    res = np.sort(rng.integers(0, 80, size=n))
    cutoff = (0.25, 0.1, 0.6)[seed]
    expected = bruteClashes(x, res, cutoff, minSep)
    assert expected > 0
    assert metrics.clashes(x, res, cutoff=cutoff, minSeparation=minSep) == expected


def test_clashes_in_small_blocks(monkeypatch):
    """The blocked pair enumeration with a tiny block budget (many blocks, and single atoms whose
    candidates exceed the budget) gives the brute-force count."""
    rng = np.random.default_rng(14)
    x = np.concatenate([rng.uniform(0.0, 1.5, size=(300, 3)), np.full((40, 3), 0.7)])
    res = rng.integers(0, 60, size=len(x))
    monkeypatch.setattr(metrics, "_CLASH_PAIR_BUDGET", 7)
    for minSep in (0, 2):
        assert metrics.clashes(x, res, cutoff=0.3, minSeparation=minSep) == bruteClashes(x, res, 0.3, minSep)


def test_clashes_degenerate_and_spread_configurations():
    # All atoms on one point: every pair of distinct residues clashes.
    x = np.zeros((50, 3))
    res = np.arange(50) // 5
    assert metrics.clashes(x, res, cutoff=0.25, minSeparation=1) == bruteClashes(x, res, 0.25, 1)
    assert metrics.clashes(x, res, cutoff=0.25, minSeparation=0) == 50 * 49 // 2
    # Two clusters very far apart (huge extent): no cross-cluster pairs, exact count within clusters.
    rng = np.random.default_rng(9)
    x = np.concatenate([rng.uniform(0, 1, (200, 3)), rng.uniform(0, 1, (200, 3)) + 1e7])
    res = np.arange(400)
    assert metrics.clashes(x, res, cutoff=0.2, minSeparation=1) == bruteClashes(x, res, 0.2, 1)
    assert metrics.clashes(np.zeros((0, 3)), np.zeros(0, dtype=int)) == 0
    assert metrics.clashes(np.zeros((1, 3)), [0]) == 0


def test_clashes_large_system_fast():
    """20,000 atoms at about protein heavy-atom density (50 per nm^3), uniformly random: the count is
    checked against the expected number of pairs within the cutoff, and against the brute force on the
    first 4,000 atoms; the whole must take well under 5 s."""
    rng = np.random.default_rng(10)
    n = 20000
    side = (n / 50.0) ** (1.0 / 3.0)
    x = rng.uniform(0.0, side, size=(n, 3))
    res = np.arange(n) // 8
    t = time.perf_counter()
    count = metrics.clashes(x, res)
    elapsed = time.perf_counter() - t
    assert elapsed < 5.0
    # Expected count ~ pairs * (4/3 pi r^3 / V) (boundary effects make it a bit smaller).
    expectedMean = n * (n - 1) / 2 * (4.0 / 3.0 * np.pi * 0.25 ** 3) / side ** 3
    assert 0.8 * expectedMean < count < 1.05 * expectedMean
    sub = x[:4000]
    assert metrics.clashes(sub, res[:4000]) == bruteClashes(sub, res[:4000], 0.25, 2)


def test_radius_of_gyration():
    rng = np.random.default_rng(11)
    # Antipodal pairs on a sphere of radius r around c: centroid is c, every point at distance r.
    r = 1.7
    u = rng.normal(size=(100, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    c = np.array([3.0, -2.0, 0.5])
    points = np.concatenate([c + r * u, c - r * u])
    assert metrics.radiusOfGyration(points) == pytest.approx(r, rel=1e-12)
    # Pairwise-distance identity: Rg^2 = sum_ij |xi - xj|^2 / (2 N^2).
    x = rng.normal(size=(70, 3))
    d2 = np.sum((x[:, None] - x[None]) ** 2, axis=-1)
    assert metrics.radiusOfGyration(x) == pytest.approx(np.sqrt(d2.sum() / (2 * 70 ** 2)), rel=1e-12)
    assert metrics.radiusOfGyration(np.ones((1, 3))) == 0.0


# ---------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_raises_value_error():
    good = np.random.default_rng(12).normal(size=(10, 3))
    nan = good.copy()
    nan[3, 1] = np.nan
    for f in (metrics.kabschRMSD, metrics.superpose, metrics.tmScore):
        with pytest.raises(ValueError, match="same shape"):
            f(good, good[:9])
        with pytest.raises(ValueError, match="non-finite"):
            f(nan, good)
        with pytest.raises(ValueError, match="non-finite"):
            f(good, nan)
        with pytest.raises(ValueError, match="at least 3"):
            f(good[:2], good[:2])
        with pytest.raises(ValueError, match=r"\[N, 3\]"):
            f(good[:, :2], good[:, :2])
    with pytest.raises(ValueError, match="non-finite"):
        metrics.radiusOfGyration(nan)
    with pytest.raises(ValueError, match="at least 1"):
        metrics.radiusOfGyration(np.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"\[L, 4, 3\]"):
        metrics.secondaryStructure(np.zeros((10, 3, 3)))
    bb = idealBackbone(8, -57.0, -47.0)
    bb[2, 1, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        metrics.secondaryStructure(bb)
    with pytest.raises(ValueError, match="only 'H', 'E' and '-'"):
        metrics.secondaryStructureFractions("HHGT")
    with pytest.raises(ValueError, match="empty"):
        metrics.secondaryStructureFractions("")
    with pytest.raises(ValueError, match="same length"):
        metrics.secondaryStructureRetention("HH", "HHH")
    with pytest.raises(ValueError, match="indices"):
        metrics.bondViolations(good, [(0, 10, 0.15)])
    with pytest.raises(ValueError, match="itself"):
        metrics.bondViolations(good, [(2, 2, 0.15)])
    with pytest.raises(ValueError, match="> 0"):
        metrics.bondViolations(good, [(0, 1, 0.0)])
    with pytest.raises(ValueError, match="tolerance"):
        metrics.bondViolations(good, [(0, 1, 0.15)], tolerance=-1.0)
    with pytest.raises(ValueError, match="non-finite"):
        metrics.bondViolations(nan, [(0, 1, 0.15)])
    with pytest.raises(ValueError, match="residueIndex"):
        metrics.clashes(good, np.arange(9))
    with pytest.raises(ValueError, match="integers"):
        metrics.clashes(good, np.arange(10) + 0.5)
    with pytest.raises(ValueError, match="cutoff"):
        metrics.clashes(good, np.arange(10), cutoff=0.0)
    with pytest.raises(ValueError, match="minSeparation"):
        metrics.clashes(good, np.arange(10), minSeparation=-1)
    with pytest.raises(ValueError, match="non-finite"):
        metrics.clashes(nan, np.arange(10))


# ---------------------------------------------------------------------------------------------------
# Chain links


def test_link_lengths_of_an_ideal_chain_and_of_scattered_residues():
    # Oracle: the builder's own C-N bond length (1.329 A) for an ideal chain; shuffling the residues breaks
    # most links (a residue's next residue is then anywhere in the chain).
    frames = idealBackbone(40, -60.0, -45.0)[:, :3]
    np.testing.assert_allclose(metrics.linkLengths(frames, "protein"), C_N / 10.0, atol=1e-9)
    shuffled = frames[np.random.default_rng(1).permutation(40)]
    assert np.median(metrics.linkLengths(shuffled, "protein")) > 0.3
    # RNA: C4'(i)-C4'(i+1), the middle frame atom.
    rna = np.zeros((3, 3, 3))
    rna[:, 1] = [[0.0, 0.0, 0.0], [0.6, 0.0, 0.0], [0.6, 0.8, 0.0]]
    np.testing.assert_allclose(metrics.linkLengths(rna, "rna"), [0.6, 0.8])
    with pytest.raises(ValueError, match="moltype"):
        metrics.linkLengths(frames, "dna")
    with pytest.raises(ValueError, match="L >= 2"):
        metrics.linkLengths(frames[:1], "protein")
