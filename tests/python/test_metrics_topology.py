"""Tests of the chain-topology and ensemble metrics of openmmflashipa.metrics: knots (knotDeterminant,
knotType, isKnotted), chainCrossings, pairwiseTMScores, diversity, novelty.

Every expected value comes from a construction with a known answer: parametric trefoil and figure-eight
knots (determinants 3 and 5 are textbook values), chains that are unknotted by construction (a helix; a
compact chain monotone in z, whose closure has one maximum and one minimum of height and so is the unknot),
ideal helices built from helical parameters or from phi/psi with NeRF, mirror images and rigid copies, and
a pair of segments placed through each other by hand."""

import time

import numpy as np
import pytest

# The metrics module (or its source where the package is not built) and the rotation oracle, shared with the
# other metrics tests.
from test_metrics import metrics, randomRotation


# ---------------------------------------------------------------------------------------------------
# Constructions


def caHelix(n, rise=0.15, turn=100.0, radius=0.23):
    """Right-handed alpha-helix CA trace from helical parameters (nm, degrees per residue)."""
    k = np.arange(n)
    a = np.radians(turn) * k
    return np.stack([radius * np.cos(a), radius * np.sin(a), rise * k], axis=1)


def trefoil(n=120, scale=0.5):
    """Trefoil x = sin t + 2 sin 2t, y = cos t - 2 cos 2t, z = -sin 3t sampled at n points, opened by
    leaving out the segment that would join the last point to the first. Sampling starts at t = pi, a point
    of largest distance from the axis (r^2 = 5 - 4 cos 3t), so the chain ends on the outside."""
    t = np.pi + 2.0 * np.pi * np.arange(n) / n
    return scale * np.stack([np.sin(t) + 2 * np.sin(2 * t), np.cos(t) - 2 * np.cos(2 * t), -np.sin(3 * t)], 1)


def figureEight(n=160, scale=0.5):
    """Figure-eight knot x = (2 + cos 2t) cos 3t, y = (2 + cos 2t) sin 3t, z = sin 4t, opened at t = 0 (an
    outermost point)."""
    t = 2.0 * np.pi * np.arange(n) / n
    r = 2.0 + np.cos(2 * t)
    return scale * np.stack([r * np.cos(3 * t), r * np.sin(3 * t), np.sin(4 * t)], 1)


def zMonotoneCompactChain(nx, ny, nz, rng, step=0.38):
    """A compact chain filling an nx x ny x nz box layer by layer (boustrophedon), with a small steady
    climb in z and xy noise: z strictly increases along the chain, so the chain is unknotted."""
    pts = []
    for z in range(nz):
        rows = list(range(ny)) if z % 2 == 0 else list(range(ny - 1, -1, -1))
        for yi, y in enumerate(rows):
            xs = range(nx) if (yi + z * ny) % 2 == 0 else range(nx - 1, -1, -1)
            pts.extend((x, y, z) for x in xs)
    p = np.array(pts, dtype=float) * step
    p[:, :2] += rng.normal(size=(len(p), 2)) * 0.03
    p[:, 2] = p[:, 2] + np.arange(len(p)) * 1e-3  # strictly increasing height
    assert np.all(np.diff(p[:, 2]) > 0)
    return p


def placeAtom(a, b, c, bond, angle, torsion):
    """NeRF: position of d with |cd| = bond, angle(b, c, d) = angle, dihedral(a, b, c, d) = torsion."""
    angle, torsion = np.radians(angle), np.radians(torsion)
    bc = (c - b) / np.linalg.norm(c - b)
    normal = np.cross(b - a, bc)
    normal /= np.linalg.norm(normal)
    m = np.stack([bc, np.cross(normal, bc), normal], axis=1)
    return c + m @ (bond * np.array([-np.cos(angle), np.sin(angle) * np.cos(torsion),
                                     np.sin(angle) * np.sin(torsion)]))


def idealBackbone(n, phi=-57.0, psi=-47.0, omega=180.0):
    """[n, 4, 3] N, CA, C, O in nm from Engh & Huber bond lengths/angles and the given dihedrals."""
    N_CA, CA_C, C_N, C_O = 1.458, 1.525, 1.329, 1.231
    A_NCAC, A_CACN, A_CNCA, A_CACO = 111.2, 116.2, 121.7, 120.5
    atoms = [np.zeros(3), np.array([N_CA, 0.0, 0.0])]
    t = np.radians(180.0 - A_NCAC)
    atoms.append(atoms[1] + CA_C * np.array([np.cos(t), np.sin(t), 0.0]))
    for _ in range(n - 1):
        nA, ca, c = atoms[-3], atoms[-2], atoms[-1]
        n1 = placeAtom(nA, ca, c, C_N, A_CACN, psi)
        ca1 = placeAtom(ca, c, n1, N_CA, A_CNCA, omega)
        atoms += [n1, ca1, placeAtom(c, n1, ca1, CA_C, A_NCAC, phi)]
    bb = np.array(atoms).reshape(n, 3, 3)
    o = np.array([placeAtom(r[0], r[1], r[2], C_O, A_CACO, psi + 180.0) for r in bb])
    return np.concatenate([bb, o[:, None, :]], axis=1) / 10.0


# ---------------------------------------------------------------------------------------------------
# Ideal helix: geometry and secondary structure


def test_nerf_helix_has_alpha_helix_parameters_and_dssp_helix():
    bb = idealBackbone(24)
    ca = bb[:, 1]
    # The CA trace has the alpha-helix parameters: CA-CA virtual bonds 0.38 nm, and it superposes on the
    # helix built from rise 0.15 nm, 100 degrees per residue, radius 0.23 nm within 0.03 nm RMSD.
    assert np.allclose(np.linalg.norm(np.diff(ca, axis=0), axis=1), 0.38, atol=0.005)
    assert np.allclose(np.linalg.norm(caHelix(2)[1] - caHelix(2)[0]), 0.38, atol=0.01)
    assert metrics.kabschRMSD(ca[4:20], caHelix(16)) < 0.03
    # Mean rise along the end-to-end axis of one period-free stretch (18 residues = 5 turns).
    axis = ca[20] - ca[2]
    assert np.linalg.norm(axis) / 18.0 == pytest.approx(0.15, abs=0.01)
    ss = metrics.secondaryStructure(bb)
    assert np.all(ss[2:-2] == "H")


# ---------------------------------------------------------------------------------------------------
# Knots


def test_trefoil_is_knotted_with_determinant_3():
    rng = np.random.default_rng(1)
    chain = trefoil() @ randomRotation(rng).T + 3.0
    assert metrics.knotDeterminant(chain) == 3
    assert metrics.knotType(chain) == "3_1"
    assert metrics.isKnotted(chain)
    # Mirror image (left trefoil) and reversed chain: still a trefoil.
    assert metrics.knotDeterminant(chain * [1.0, 1.0, -1.0]) == 3
    assert metrics.knotDeterminant(chain[::-1]) == 3


def test_figure_eight_has_determinant_5():
    rng = np.random.default_rng(2)
    chain = figureEight() @ randomRotation(rng).T
    assert metrics.knotDeterminant(chain) == 5
    assert metrics.knotType(chain) == "4_1"
    assert metrics.isKnotted(chain)


def test_knot_result_independent_of_projection_seed():
    chain = trefoil()
    assert {metrics.knotDeterminant(chain, projections=1, seed=s) for s in range(5)} == {3}


def test_unknots():
    assert metrics.knotDeterminant(caHelix(60)) == 1
    assert metrics.knotType(caHelix(60)) == "0_1"
    assert not metrics.isKnotted(idealBackbone(40)[:, 1])
    rng = np.random.default_rng(3)
    compact = zMonotoneCompactChain(6, 6, 6, rng) @ randomRotation(rng).T
    assert metrics.radiusOfGyration(compact) < 1.2  # compact: 216 residues in ~2 nm box
    assert not metrics.isKnotted(compact)
    # A trefoil whose chain is cut short enough (a third of it) is an unknotted arc.
    assert metrics.knotDeterminant(trefoil()[:40]) == 1
    # Tiny chains.
    assert metrics.knotDeterminant(np.zeros((1, 3))) == 1
    assert metrics.knotDeterminant(caHelix(4)) == 1


def test_knot_speed_at_300_and_2000_residues():
    rng = np.random.default_rng(4)
    for dims, limit in (((7, 7, 6), 1.0), ((13, 13, 12), 6.0)):
        chain = zMonotoneCompactChain(*dims, rng)
        start = time.perf_counter()
        assert metrics.knotDeterminant(chain) == 1
        assert time.perf_counter() - start < limit  # generous: shared CPUs


# ---------------------------------------------------------------------------------------------------
# Chain crossings


def test_chain_crossings_constructed_and_helix():
    assert metrics.chainCrossings(caHelix(100)) == 0
    assert metrics.chainCrossings(idealBackbone(30)[:, 1]) == 0
    # A chain that goes out along x, turns, and comes back through its own first segment along z.
    ca = np.array([[0.0, 0.0, 0.0], [0.38, 0.0, 0.0], [0.38, 0.38, 0.0], [0.38, 0.38, 0.38],
                   [0.12, 0.0, 0.30], [0.12, 0.0, -0.08]])
    count, pairs = metrics.chainCrossings(ca, returnPairs=True)
    # Segment 4 (residues 4-5) runs along z through (0.12, 0, 0), a point of segment 0 (distance 0). The
    # other non-adjacent pairs, by hand: (1,4) 0.26 nm, (0,3) 0.30, (0,2) 0.38, (1,3) > 0.36, (2,4) 0.46.
    assert count == 1
    assert pairs.tolist() == [[0, 4]]
    assert metrics.chainCrossings(ca, threshold=0.01) == 1
    assert metrics.chainCrossings(ca, threshold=0.27) == 2  # (1,4) at 0.26 nm joins
    # Segment 4 runs parallel to segment 0, 0.1 nm above it and overhanging both its ends by 0.1 nm, so it
    # also passes 0.1 nm above residue 1, the start of segment 1. The other near pairs are
    # 0.1 * sqrt(2) = 0.141 nm apart: (0,3), (0,5), (1,3).
    chain = np.array([[0.0, 0.0, 0.0], [0.38, 0.0, 0.0], [0.38, -1.0, 0.0], [0.48, -1.0, 0.1],
                      [0.48, 0.0, 0.1], [-0.1, 0.0, 0.1], [-0.1, 0.0, 1.0]])
    assert metrics.chainCrossings(chain, threshold=0.12, returnPairs=True)[1].tolist() == [[0, 4], [1, 4]]
    assert metrics.chainCrossings(chain, threshold=0.05) == 0
    assert metrics.chainCrossings(chain, threshold=0.15, returnPairs=True)[1].tolist() == \
        [[0, 3], [0, 4], [0, 5], [1, 3], [1, 4]]
    # minSeparation=1 also compares neighbouring segments (they share a residue: distance 0).
    assert metrics.chainCrossings(chain, threshold=0.05, minSeparation=1) == 5


def test_chain_crossings_match_brute_force():
    rng = np.random.default_rng(5)
    steps = rng.normal(size=(150, 3))
    ca = np.cumsum(0.38 * steps / np.linalg.norm(steps, axis=1, keepdims=True), axis=0)

    def segDist(p1, q1, p2, q2):  # dense sampling oracle (upper bound within 0.38/400 nm)
        s = np.linspace(0, 1, 201)[:, None]
        a = p1 + s * (q1 - p1)
        b = p2 + s * (q2 - p2)
        return np.min(np.linalg.norm(a[:, None] - b[None], axis=2))

    count, pairs = metrics.chainCrossings(ca, threshold=0.3, returnPairs=True)
    found = {tuple(p) for p in pairs.tolist()}
    for i in range(len(ca) - 1):
        for j in range(i + 2, len(ca) - 1):
            if np.linalg.norm(ca[i] + ca[i + 1] - ca[j] - ca[j + 1]) / 2 > 0.3 + 0.38:
                continue
            d = segDist(ca[i], ca[i + 1], ca[j], ca[j + 1])
            if d < 0.3 - 0.002:
                assert (i, j) in found
            elif d > 0.3 + 0.002:
                assert (i, j) not in found


# ---------------------------------------------------------------------------------------------------
# TM-score ensembles


def test_mirror_helix_scores_low_rotated_copy_one():
    helix = caHelix(30)
    rng = np.random.default_rng(6)
    rotated = helix @ randomRotation(rng).T + np.array([1.0, -2.0, 0.5])
    mirror = helix * np.array([1.0, 1.0, -1.0])
    assert metrics.tmScore(rotated, helix) == pytest.approx(1.0, abs=1e-9)
    assert metrics.tmScore(mirror, helix) < 0.45
    matrix = metrics.pairwiseTMScores([helix, rotated, mirror])
    assert matrix.shape == (3, 3)
    assert np.allclose(np.diag(matrix), 1.0)
    assert np.allclose(matrix, matrix.T)
    assert matrix[0, 1] == pytest.approx(1.0, abs=1e-9)
    assert matrix[0, 2] < 0.45 and matrix[1, 2] < 0.45


def test_diversity_of_identical_copies_is_zero():
    rng = np.random.default_rng(7)
    base = trefoil(60)
    copies = [base @ randomRotation(rng).T + rng.normal(size=3) for _ in range(4)]
    assert metrics.diversity(copies) == pytest.approx(0.0, abs=1e-9)
    # Adding a mirror image raises diversity to exactly the mean of the resulting off-diagonal entries.
    mixed = copies[:2] + [base * np.array([1.0, 1.0, -1.0])]
    m = metrics.pairwiseTMScores(mixed)
    assert metrics.diversity(mixed) == pytest.approx(1.0 - (m.sum() - 3.0) / 6.0)
    assert metrics.diversity(mixed) > 0.2


def test_novelty_finds_embedded_copy_of_different_length():
    rng = np.random.default_rng(8)
    helix = caHelix(40)
    # Reference 1: the query's 40 residues embedded (rotated) in a longer chain whose extra residues go
    # off in a straight line; reference 0: the mirror image of the query.
    tail = helix[-1] + np.arange(1, 21)[:, None] * np.array([0.38, 0.0, 0.0])
    head = helix[0] - np.arange(10, 0, -1)[:, None] * np.array([0.0, 0.38, 0.0])
    longer = np.concatenate([head, helix, tail]) @ randomRotation(rng).T
    mirror = helix * np.array([1.0, 1.0, -1.0])
    result = metrics.novelty(helix, [mirror, longer])
    assert result["index"] == 1
    assert result["max_tm"] == pytest.approx(1.0, abs=1e-6)  # normalised by the query's length
    # Against the mirror only: low; the structural score is never below the index-based one.
    onlyMirror = metrics.novelty(helix, [mirror])["max_tm"]
    assert onlyMirror < 0.6
    assert onlyMirror >= metrics.novelty(helix, [mirror], alignment="index")["max_tm"] - 1e-12


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError):
        metrics.knotDeterminant(np.zeros((5, 2)))
    with pytest.raises(ValueError):
        metrics.knotDeterminant(caHelix(10), projections=0)
    with pytest.raises(ValueError):
        metrics.chainCrossings(caHelix(10), threshold=-1.0)
    with pytest.raises(ValueError):
        metrics.chainCrossings(caHelix(10), minSeparation=0)
    with pytest.raises(ValueError):
        metrics.pairwiseTMScores([caHelix(10), caHelix(12)])
    with pytest.raises(ValueError):
        metrics.diversity([caHelix(10)])
    with pytest.raises(ValueError):
        metrics.novelty(caHelix(10), [caHelix(12)], alignment="index")
    with pytest.raises(ValueError):
        metrics.novelty(caHelix(10), [])
    with pytest.raises(ValueError):
        metrics.novelty(caHelix(10), [caHelix(10)], alignment="sequence")
