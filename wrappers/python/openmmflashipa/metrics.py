"""Structure-quality metrics for backbones (numpy; pydssp for secondary structure).

All lengths are in nanometres, inputs and outputs alike (pydssp works in angstroms; the conversion is
done here). The module imports nothing from the rest of the package, so it can be loaded on its own
(for instance by file path) where the compiled extension is not available.

Public functions:

- :func:`kabschRMSD` -- RMSD after optimal rigid superposition (proper rotations only).
- :func:`superpose` -- move a structure onto a reference (Kabsch).
- :func:`matchAtoms`, :func:`backboneRMSD` -- the same atoms of two openmm.app topologies (matched by chain
  id, residue id and atom name) and their Kabsch RMSD (default: N, CA, C).
- :func:`tmScore` -- TM-score for a fixed one-to-one residue correspondence.
- :func:`secondaryStructure`, :func:`secondaryStructureFractions`, :func:`secondaryStructureRetention`
  -- three-state (H, E, -) secondary structure from pydssp and summaries of it.
- :func:`bondViolations` -- bonds whose length is off their ideal by more than a tolerance.
- :func:`clashes` -- close atom pairs between residues apart in sequence (cell list, memory O(N)).
- :func:`radiusOfGyration` -- unweighted radius of gyration.
- :func:`knotDeterminant`, :func:`knotType`, :func:`isKnotted` -- knots in an open chain (closure far
  outside, KMT reduction, Alexander polynomial at t = -1 from a projection).
- :func:`chainCrossings` -- pairs of non-adjacent chain segments closer than a threshold.
- :func:`pairwiseTMScores`, :func:`diversity`, :func:`novelty` -- TM-scores within an ensemble and
  against references (fixed correspondence or a TM-align-like sequence-independent alignment).
"""

import numpy as np

__all__ = [
    "kabschRMSD",
    "superpose",
    "matchAtoms",
    "backboneRMSD",
    "tmScore",
    "secondaryStructure",
    "secondaryStructureFractions",
    "secondaryStructureRetention",
    "bondViolations",
    "clashes",
    "radiusOfGyration",
    "knotDeterminant",
    "knotType",
    "isKnotted",
    "chainCrossings",
    "pairwiseTMScores",
    "diversity",
    "novelty",
]

ANGSTROM_PER_NM = 10.0
TM_D0_FLOOR_NM = 0.05
_TM_MAX_ITERATIONS = 20
_TM_MAX_STARTS_PER_LENGTH = 24
_TM_MIN_FRAGMENT = 4
_TM_RELAX_STEP_NM = 0.05
_TM_POLISHED = 5
_TM_POLISH_STEPS = 30
_SS_LETTERS = ("H", "E", "-")
_PYDSSP_MIN_RESIDUES = 6
_CLASH_PAIR_BUDGET = 1 << 21  # candidate pairs examined at once by clashes()


# ---------------------------------------------------------------------------------------------------
# Input checking


def _points(x, name, minCount=1):
    """x as a float64 [N,3] array with N >= minCount and all values finite, else ValueError."""
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be an array of numbers with shape [N, 3]: {e}") from None
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"{name} must have shape [N, 3], got {a.shape}")
    if a.shape[0] < minCount:
        raise ValueError(f"{name} has {a.shape[0]} points; at least {minCount} are needed")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return a


def _integerAtLeast(value, minimum, name):
    """`value` as an int, or a ValueError unless it is an integer (of any numeric type) >= minimum."""
    try:
        number = int(value)
        valid = number == value and number >= minimum
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return number


def _positiveFinite(value, name):
    """`value` as a float, or a ValueError unless it is finite and > 0."""
    number = float(value)
    if not np.isfinite(number) or number <= 0.0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return number


def _pair(x, reference, minCount):
    a = _points(x, "x", minCount)
    b = _points(reference, "reference", minCount)
    if a.shape != b.shape:
        raise ValueError(f"x and reference must have the same shape, got {a.shape} and {b.shape}")
    return a, b


def _ssArray(ss, name):
    """A 1-D array of one-character strings from 'H', 'E', '-' (a str is split into characters)."""
    if isinstance(ss, str):
        a = np.array(list(ss), dtype="<U1")
    else:
        a = np.asarray(ss)
        if a.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
        a = a.astype(str)
    bad = sorted(set(a.tolist()) - set(_SS_LETTERS))
    if bad:
        raise ValueError(f"{name} may contain only 'H', 'E' and '-', found {bad}")
    return a


# ---------------------------------------------------------------------------------------------------
# Superposition


def _kabschTransform(x, y):
    """(R, t) minimising sum |R x_i + t - y_i|^2 with det R = +1; x, y float64 [N,3]."""
    cx = x.mean(axis=0)
    cy = y.mean(axis=0)
    h = (x - cx).T @ (y - cy)  # 3x3 covariance
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    if d == 0.0:
        d = 1.0
    rotation = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    translation = cy - rotation @ cx
    return rotation, translation


def superpose(x, reference):
    """Return ``x`` moved rigidly onto ``reference`` by the least-squares superposition (Kabsch).

    Parameters
    ----------
    x, reference : array_like, shape [N, 3], nm
        Corresponding points (x[i] goes with reference[i]); N >= 3, all values finite.

    Returns
    -------
    numpy.ndarray, shape [N, 3], float64, nm
        ``x @ R.T + t`` for the proper rotation R (det R = +1; reflections are never used) and the
        translation t that minimise the RMSD to ``reference``.
    """
    a, b = _pair(x, reference, 3)
    rotation, translation = _kabschTransform(a, b)
    return a @ rotation.T + translation


def kabschRMSD(x, reference):
    """Root-mean-square deviation of ``x`` from ``reference`` after optimal superposition, in nm.

    Parameters
    ----------
    x, reference : array_like, shape [N, 3], nm
        Corresponding points; N >= 3, all values finite.

    Returns
    -------
    float
        ``sqrt(mean_i |R x_i + t - reference_i|^2)`` minimised over proper rotations R (no reflection)
        and translations t, in nm.
    """
    a, b = _pair(x, reference, 3)
    rotation, translation = _kabschTransform(a, b)
    diff = a @ rotation.T + translation - b
    return float(np.sqrt(np.mean(np.sum(diff * diff, axis=1))))


def _nm(positions):
    if hasattr(positions, "value_in_unit"):
        import openmm.unit
        positions = positions.value_in_unit(openmm.unit.nanometer)
    return np.array([[p[0], p[1], p[2]] for p in positions], dtype=np.float64)


def matchAtoms(topology, positions, referenceTopology, referencePositions, names=("N", "CA", "C")):
    """The atoms named `names` that both openmm.app topologies hold, matched by (chain id, residue id,
    insertion code, atom name): (x, reference) float64 [M, 3] nm arrays in the reference's order. Chains split
    into pieces that keep their id (as refine does at gaps) match the unsplit chain."""
    def keyed(top):
        out = {}
        for atom in top.atoms():
            if atom.name in names:
                residue = atom.residue
                key = (residue.chain.id, str(residue.id).strip(), getattr(residue, "insertionCode", "").strip(),
                       atom.name)
                out.setdefault(key, atom.index)
        return out
    mine, theirs = keyed(topology), keyed(referenceTopology)
    keys = [k for k in sorted(theirs, key=theirs.get) if k in mine]
    x, y = _nm(positions), _nm(referencePositions)
    return x[[mine[k] for k in keys]], y[[theirs[k] for k in keys]]


def backboneRMSD(topology, positions, referenceTopology, referencePositions, names=("N", "CA", "C")):
    """Kabsch RMSD (nm) of the atoms named `names` (default backbone N, CA, C) present in both structures
    (matchAtoms); ValueError when fewer than 3 match."""
    x, reference = matchAtoms(topology, positions, referenceTopology, referencePositions, names)
    if len(x) < 3:
        raise ValueError("only %d atoms named %s match between the structures" % (len(x), "/".join(names)))
    return kabschRMSD(x, reference)


# ---------------------------------------------------------------------------------------------------
# TM-score


def _tmD0(length):
    """TM-score distance scale in nm for a chain of ``length`` residues:
    0.1 * (1.24 * (L - 15)^(1/3) - 1.8), floored at TM_D0_FLOOR_NM (0.05 nm). The cube root is the
    real one, so for L <= 15 (and up to L = 18, where the formula is still below 0.5 angstrom) the
    floor applies."""
    d0 = 0.1 * (1.24 * np.cbrt(float(length) - 15.0) - 1.8)
    return float(max(d0, TM_D0_FLOOR_NM))


def _tmScoreOfDistances(dist, d0, length):
    return float(np.sum(1.0 / (1.0 + (dist / d0) ** 2)) / length)


def _tmSeeds(n):
    """Seed fragments (start, length) of lengths n, n/2, n/4, ... (>= 4, or n when n < 4) at evenly
    spaced start positions (about half a fragment apart, at most _TM_MAX_STARTS_PER_LENGTH per length,
    always including both ends)."""
    seeds = []
    lengths = []
    f = n
    while True:
        lengths.append(f)
        f //= 2
        if f < _TM_MIN_FRAGMENT:
            break
    for f in lengths:
        last = n - f
        starts = list(range(0, last + 1, max(1, f // 2)))
        if starts[-1] != last:
            starts.append(last)
        if len(starts) > _TM_MAX_STARTS_PER_LENGTH:
            starts = np.unique(np.round(np.linspace(0, last, _TM_MAX_STARTS_PER_LENGTH)).astype(int))
        seeds.extend((int(s), f) for s in starts)
    return seeds


def _weightedKabschTransform(x, y, w):
    """(R, t) minimising sum w_i |R x_i + t - y_i|^2 with det R = +1; w >= 0, not all zero."""
    w = w / np.sum(w)
    cx = w @ x
    cy = w @ y
    h = ((x - cx) * w[:, None]).T @ (y - cy)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    if d == 0.0:
        d = 1.0
    rotation = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return rotation, cy - rotation @ cx


def _distances(a, b, rotation, translation):
    diff = a @ rotation.T + translation - b
    return np.sqrt(np.sum(diff * diff, axis=1))


def tmScore(x, reference):
    """TM-score of ``x`` against ``reference`` for the fixed correspondence x[i] <-> reference[i].

    Parameters
    ----------
    x, reference : array_like, shape [L, 3], nm
        One representative atom per residue (usually CA for proteins, C4' for RNA), same order in both;
        L >= 3, all values finite.

    Returns
    -------
    float in (0, 1]
        ``max over superpositions of (1/L) sum_i 1 / (1 + (d_i / d0)^2)``, d_i the distance between the
        superposed x[i] and reference[i], normalised by L = len(reference), with
        ``d0 = 0.1 * (1.24 * (L - 15)^(1/3) - 1.8)`` nm (the usual formula in angstroms, converted).
        For short chains the formula gives tiny or negative values, so d0 is floored at 0.05 nm (which
        applies for L <= 18).

    Notes
    -----
    The maximum is searched heuristically (so the value is a lower bound of the true maximum, in practice
    equal to it or very close):

    1. Superpositions are seeded from aligned fragments of lengths L, L/2, L/4, ... (down to 4 residues)
       at several start positions (about half a fragment apart, at most 24 per length).
    2. Each is refined by superposing on the residues closer than d0 (the cutoff is relaxed in 0.05 nm
       steps when fewer than 3 residues qualify) and recomputing, until the chosen set no longer changes
       (at most 20 iterations; a set already refined from another seed is not refined again).
    3. The 5 best superpositions found are polished by iteratively reweighted superposition, weights
       ``1 / (1 + (d_i / d0)^2)^2`` (the score's tangent, so each step cannot lower the score), for at
       most 30 steps.

    The best score seen at any step is returned.
    """
    a, b = _pair(x, reference, 3)
    n = b.shape[0]
    return float(min(_tmSearch(a, b, _tmD0(n), n)[0], 1.0))


def _tmSearch(a, b, d0, norm):
    """The search of :func:`tmScore` for pairs a[i] <-> b[i] (>= 3 of them), distance scale d0 and
    normalisation ``norm``: (best score, rotation, translation)."""
    n = b.shape[0]
    candidates = []  # (score, rotation, translation) of every superposition evaluated
    seen = set()  # residue sets already refined (refinement from a set is deterministic)
    for start, length in _tmSeeds(n):
        mask = np.zeros(n, dtype=bool)
        mask[start:start + length] = True
        for _ in range(_TM_MAX_ITERATIONS):
            key = np.packbits(mask).tobytes()
            if key in seen:
                break
            seen.add(key)
            rotation, translation = _kabschTransform(a[mask], b[mask])
            dist = _distances(a, b, rotation, translation)
            candidates.append((_tmScoreOfDistances(dist, d0, norm), rotation, translation))
            cutoff = d0
            newMask = dist < cutoff
            while np.count_nonzero(newMask) < 3:
                cutoff += _TM_RELAX_STEP_NM
                newMask = dist < cutoff
            if np.array_equal(newMask, mask):
                break
            mask = newMask
    candidates.sort(key=lambda c: -c[0])
    best = candidates[0]
    for score, rotation, translation in candidates[:_TM_POLISHED]:
        dist = _distances(a, b, rotation, translation)
        for _ in range(_TM_POLISH_STEPS):
            weights = 1.0 / (1.0 + (dist / d0) ** 2) ** 2
            rotation, translation = _weightedKabschTransform(a, b, weights)
            dist = _distances(a, b, rotation, translation)
            newScore = _tmScoreOfDistances(dist, d0, norm)
            if newScore > best[0]:
                best = (newScore, rotation, translation)
            if newScore - score < 1e-12:
                break
            score = newScore
    return best


# ---------------------------------------------------------------------------------------------------
# Secondary structure


def secondaryStructure(backbone):
    """Three-state secondary structure of a protein backbone, assigned with pydssp.

    Parameters
    ----------
    backbone : array_like, shape [L, 4, 3], nm
        Atoms N, CA, C, O of each residue, in chain order (one chain, no gaps assumed); L >= 1, all values
        finite.

    Returns
    -------
    numpy.ndarray, shape [L], dtype '<U1'
        'H' (helix: alpha, 3-10 and pi helices), 'E' (strand: any residue in a beta bridge/ladder) or '-'
        (anything else), from ``pydssp.assign(coordinates_in_angstrom, out_type='c3')``. pydssp places the
        amide hydrogens itself and treats every residue as an H-bond donor (prolines included).

    Notes
    -----
    pydssp fails on chains shorter than 6 residues; such chains are padded with dummy residues placed
    far away (no H-bonds possible with them) and the padding is dropped from the result.
    """
    try:
        coords = np.asarray(backbone, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"backbone must be an array of numbers with shape [L, 4, 3]: {e}") from None
    if coords.ndim != 3 or coords.shape[1:] != (4, 3):
        raise ValueError(f"backbone must have shape [L, 4, 3] (atoms N, CA, C, O), got {coords.shape}")
    n = coords.shape[0]
    if n < 1:
        raise ValueError("backbone has no residues")
    if not np.all(np.isfinite(coords)):
        raise ValueError("backbone contains non-finite values (NaN or inf)")
    import pydssp  # imported here: it pulls in torch

    angstrom = coords * ANGSTROM_PER_NM
    if n < _PYDSSP_MIN_RESIDUES:
        extent = float(np.max(np.abs(angstrom))) + 1000.0
        pads = []
        for k in range(_PYDSSP_MIN_RESIDUES - n):
            pads.append(angstrom[0] - angstrom[0, 1] + np.array([extent * (k + 1), extent, extent]))
        angstrom = np.concatenate([angstrom, np.stack(pads)], axis=0)
    ss = np.asarray(pydssp.assign(angstrom, out_type="c3"))
    return ss[:n].astype("<U1")


def secondaryStructureFractions(ss):
    """Fractions of helix, strand and coil residues in a three-state assignment.

    Parameters
    ----------
    ss : str or array_like of one-character strings, length L >= 1
        Letters 'H', 'E', '-' (as returned by :func:`secondaryStructure`).

    Returns
    -------
    dict
        ``{'helix': fraction of 'H', 'strand': fraction of 'E', 'coil': fraction of '-'}``; they sum to 1.
    """
    a = _ssArray(ss, "ss")
    if a.size == 0:
        raise ValueError("ss is empty")
    n = float(a.size)
    return {
        "helix": float(np.count_nonzero(a == "H") / n),
        "strand": float(np.count_nonzero(a == "E") / n),
        "coil": float(np.count_nonzero(a == "-") / n),
    }


def secondaryStructureRetention(ss, reference_ss):
    """Fraction of the reference's structured residues whose secondary structure is kept.

    Parameters
    ----------
    ss, reference_ss : str or array_like of one-character strings, same length L
        Letters 'H', 'E', '-' (as returned by :func:`secondaryStructure`), residue i of one matching
        residue i of the other.

    Returns
    -------
    float in [0, 1]
        Among the residues that are 'H' or 'E' in ``reference_ss``, the fraction with the same letter in
        ``ss``. When the reference has no 'H' or 'E' residue there is nothing to lose and 1.0 is returned.
    """
    a = _ssArray(ss, "ss")
    b = _ssArray(reference_ss, "reference_ss")
    if a.shape != b.shape:
        raise ValueError(f"ss and reference_ss must have the same length, got {a.size} and {b.size}")
    structured = (b == "H") | (b == "E")
    total = int(np.count_nonzero(structured))
    if total == 0:
        return 1.0
    return float(np.count_nonzero(a[structured] == b[structured]) / total)


# ---------------------------------------------------------------------------------------------------
# Geometry checks


def bondViolations(atoms, bonds, tolerance=0.01):
    """Bonds whose length differs from its ideal value by more than ``tolerance``.

    Parameters
    ----------
    atoms : array_like, shape [N, 3], nm
        Atom positions, all finite.
    bonds : sequence of (i, j, ideal_length_nm)
        Atom indices into ``atoms`` (0 <= i, j < N, i != j) and the ideal length in nm (finite, > 0).
    tolerance : float, nm
        Allowed absolute deviation (finite, >= 0); a bond violates when ``|length - ideal| > tolerance``.

    Returns
    -------
    dict
        ``{'count': number of violating bonds (int), 'fraction': count / number of bonds (0.0 when there
        are no bonds), 'max_deviation': largest |length - ideal| over all bonds, in nm (0.0 when there are
        no bonds)}``.
    """
    x = _points(atoms, "atoms", 1)
    tol = float(tolerance)
    if not np.isfinite(tol) or tol < 0.0:
        raise ValueError(f"tolerance must be finite and >= 0, got {tolerance}")
    bondList = list(bonds)
    if len(bondList) == 0:
        return {"count": 0, "fraction": 0.0, "max_deviation": 0.0}
    try:
        table = np.array([tuple(b) for b in bondList], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"bonds must be a sequence of (i, j, ideal_length_nm): {e}") from None
    if table.ndim != 2 or table.shape[1] != 3:
        raise ValueError(f"bonds must be a sequence of (i, j, ideal_length_nm), got shape {table.shape}")
    if not np.all(np.isfinite(table)):
        raise ValueError("bonds contain non-finite values")
    idx = table[:, :2]
    if np.any(idx != np.round(idx)):
        raise ValueError("bond atom indices must be integers")
    idx = idx.astype(np.int64)
    n = x.shape[0]
    if np.any(idx < 0) or np.any(idx >= n):
        raise ValueError(f"bond atom indices must be in [0, {n}), found {int(idx.min())}..{int(idx.max())}")
    if np.any(idx[:, 0] == idx[:, 1]):
        raise ValueError("a bond joins an atom to itself")
    ideal = table[:, 2]
    if np.any(ideal <= 0.0):
        raise ValueError("ideal bond lengths must be > 0 nm")
    length = np.linalg.norm(x[idx[:, 0]] - x[idx[:, 1]], axis=1)
    deviation = np.abs(length - ideal)
    count = int(np.count_nonzero(deviation > tol))
    return {"count": count, "fraction": count / len(bondList), "max_deviation": float(deviation.max())}


_HALF_SHELL = [(dx, dy, dz) for dx in (-1, 0, 1) for dy in (-1, 0, 1) for dz in (-1, 0, 1)
               if (dx, dy, dz) > (0, 0, 0)]


def clashes(positions, residueIndex, cutoff=0.25, minSeparation=2):
    """Number of atom pairs closer than ``cutoff`` between residues at least ``minSeparation`` apart.

    Parameters
    ----------
    positions : array_like, shape [N, 3], nm
        Heavy-atom positions, all finite (N may be 0).
    residueIndex : array_like of int, shape [N]
        Residue index of each atom; a pair (a, b) is considered when
        ``|residueIndex[a] - residueIndex[b]| >= minSeparation``.
    cutoff : float, nm
        Distance below which (strictly) a pair clashes; finite, > 0.
    minSeparation : int
        Minimum separation in residue index (>= 0; 0 also counts pairs within one residue).

    Returns
    -------
    int
        Number of unordered atom pairs that clash.

    Notes
    -----
    Uses a cell list (cells of edge >= cutoff, looked up by sorted hashed keys, so empty space costs
    nothing) and examines candidate pairs in bounded blocks: memory is O(N + block), never N x N.
    """
    x = _points(positions, "positions", 0)
    try:
        res = np.asarray(residueIndex)
    except (TypeError, ValueError) as e:
        raise ValueError(f"residueIndex must be an array of integers: {e}") from None
    if res.shape != (x.shape[0],):
        raise ValueError(f"residueIndex must have shape [{x.shape[0]}] (one per atom), got {res.shape}")
    if res.size and not np.issubdtype(res.dtype, np.integer):
        if not np.issubdtype(res.dtype, np.floating) or not np.all(np.isfinite(res)) \
                or np.any(res != np.round(res)):
            raise ValueError("residueIndex must contain integers")
    res = res.astype(np.int64)
    cut = _positiveFinite(cutoff, "cutoff")
    minSep = _integerAtLeast(minSeparation, 0, "minSeparation")
    n = x.shape[0]
    if n < 2:
        return 0

    # Cells: edge >= cutoff (larger only for huge extents, to keep the hashed keys in int64).
    low = x.min(axis=0)
    extent = float(np.max(x.max(axis=0) - low))
    edge = max(cut, extent / float(1 << 20))
    cell = np.floor((x - low) / edge).astype(np.int64) + 1  # +1: neighbours of cell 0 stay >= 0
    dims = cell.max(axis=0) + 2
    key = (cell[:, 0] * dims[1] + cell[:, 1]) * dims[2] + cell[:, 2]
    order = np.argsort(key, kind="stable")
    sortedKey = key[order]
    xs = x[order]
    rs = res[order]
    cellCell = cell[order]
    uniqueKeys, cellStart, cellCount = np.unique(sortedKey, return_index=True, return_counts=True)
    atomCell = np.searchsorted(uniqueKeys, sortedKey)  # cell number of each sorted atom
    position = np.arange(n, dtype=np.int64)
    cut2 = cut * cut
    total = 0

    def countPairs(first, start, count):
        """Pairs (first[k], start[k] + m) for m < count[k], examined in blocks of bounded size."""
        nonlocal total
        keep = count > 0
        first, start, count = first[keep], start[keep], count[keep]
        if first.size == 0:
            return
        cumulative = np.cumsum(count)
        begin = 0
        while begin < first.size:
            base = cumulative[begin - 1] if begin else 0
            end = int(np.searchsorted(cumulative, base + _CLASH_PAIR_BUDGET, side="right"))
            end = max(end, begin + 1)
            c = count[begin:end]
            m = int(c.sum())
            i = np.repeat(first[begin:end], c)
            offsets = np.arange(m, dtype=np.int64) - np.repeat(np.cumsum(c) - c, c)
            j = np.repeat(start[begin:end], c) + offsets
            far = np.abs(rs[i] - rs[j]) >= minSep
            i, j = i[far], j[far]
            d = xs[i] - xs[j]
            total += int(np.count_nonzero(np.einsum("ij,ij->i", d, d) < cut2))
            begin = end

    # Same cell: each atom with the atoms after it in the cell.
    cellEnd = cellStart[atomCell] + cellCount[atomCell]
    countPairs(position, position + 1, cellEnd - position - 1)
    # Neighbour cells: half of the 26, so each unordered pair is met once.
    for offset in _HALF_SHELL:
        neighbour = cellCell + np.array(offset, dtype=np.int64)
        nKey = (neighbour[:, 0] * dims[1] + neighbour[:, 1]) * dims[2] + neighbour[:, 2]
        slot = np.searchsorted(uniqueKeys, nKey)
        slot = np.minimum(slot, uniqueKeys.size - 1)
        found = uniqueKeys[slot] == nKey
        countPairs(position[found], cellStart[slot[found]], cellCount[slot[found]])
    return total


def radiusOfGyration(x):
    """Unweighted radius of gyration ``sqrt(mean_i |x_i - mean(x)|^2)``, in nm.

    Parameters
    ----------
    x : array_like, shape [N, 3], nm
        Positions; N >= 1, all finite.

    Returns
    -------
    float, nm
    """
    a = _points(x, "x", 1)
    centred = a - a.mean(axis=0)
    return float(np.sqrt(np.mean(np.sum(centred * centred, axis=1))))


def linkLengths(frames, moltype):
    """Distances (nm) across the links of a chain of frame atoms: protein C(i)-N(i+1); RNA C4'(i)-C4'(i+1),
    since RNA frame atoms (C3', C4', O4') hold no O3' or P.

    Parameters
    ----------
    frames : array_like, shape [L, 3, 3], nm
        Frame atoms (protein N, CA, C; RNA C3', C4', O4'), L >= 2, all finite.
    moltype : "protein" or "rna"

    Returns
    -------
    ndarray [L - 1], nm
    """
    if moltype not in ("protein", "rna"):
        raise ValueError("moltype must be 'protein' or 'rna', got %r" % (moltype,))
    atoms = np.asarray(frames, dtype=np.float64)
    if atoms.ndim != 3 or atoms.shape[1:] != (3, 3) or atoms.shape[0] < 2:
        raise ValueError("frames must have shape [L, 3, 3] with L >= 2, got %s" % (atoms.shape,))
    if not np.all(np.isfinite(atoms)):
        raise ValueError("frames must be finite")
    if moltype == "protein":
        return np.linalg.norm(atoms[1:, 0] - atoms[:-1, 2], axis=1)
    return np.linalg.norm(atoms[1:, 1] - atoms[:-1, 1], axis=1)


# ---------------------------------------------------------------------------------------------------
# Chain topology: knots and chain crossings

_KMT_EPS = 1e-9  # tolerance (relative, in barycentric / segment parameters) of the triangle test
_KNOT_FAR = 10.0  # termini are extended to this many times the largest centroid distance (+1 nm)
_PROJECTION_MARGIN = 1e-7  # crossings closer than this (relative) to a vertex or in height: redraw
_MAX_PROJECTION_DRAWS = 50
_KNOT_NAMES = {1: "0_1", 3: "3_1", 5: "4_1", 7: "5_2", 9: "6_1", 11: "6_2", 13: "6_3"}
_PRIMES = []


def _cross(a, b):
    """Row-wise cross product of [K,3] (or [3]) arrays (np.cross is slow for small arrays)."""
    a0, a1, a2 = a[..., 0], a[..., 1], a[..., 2]
    b0, b1, b2 = b[..., 0], b[..., 1], b[..., 2]
    return np.stack([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0], axis=-1)


def _triangleBlocked(a, b, c, p, q):
    """True when any segment p[k]-q[k] meets the triangle (a, b, c), touching included (conservative,
    Moller-Trumbore test with a small tolerance). A segment parallel to the triangle's plane blocks when it
    lies in the plane (within tolerance); a degenerate (collinear) triangle always blocks."""
    e1 = b - a
    e2 = c - a
    normal = _cross(e1, e2)
    area = float(np.sqrt(normal @ normal))
    scale = float(np.sqrt(max(e1 @ e1, e2 @ e2, 1e-300)))
    if area <= _KMT_EPS * scale * scale:
        return True
    d = q - p
    h = _cross(d, e2)
    det = h @ e1
    dLength = np.sqrt(np.einsum("ij,ij->i", d, d))
    parallel = np.abs(det) <= _KMT_EPS * area * np.maximum(dLength, 1e-300)
    if np.any(parallel):
        if np.any(np.abs((p[parallel] - a) @ normal) <= _KMT_EPS * area * scale):
            return True
        ok = ~parallel
        p, d, h, det = p[ok], d[ok], h[ok], det[ok]
    inv = 1.0 / det
    s = p - a
    u = inv * np.einsum("ij,ij->i", s, h)
    qv = _cross(s, e1)
    v = inv * np.einsum("ij,ij->i", d, qv)
    t = inv * (qv @ e2)
    tol = _KMT_EPS
    hit = (u >= -tol) & (v >= -tol) & (u + v <= 1.0 + tol) & (t >= -tol) & (t <= 1.0 + tol)
    return bool(np.any(hit))


def _kmtReduce(points):
    """Indices of the vertices left by the KMT (Koniaris-Muthukumar / Taylor) reduction of the open
    polygon ``points`` [n,3] with both ends fixed: a vertex b with neighbours a, c is deleted when no other
    segment of the current chain meets the triangle (a, b, c) -- sliding the chain across the empty
    triangle is an ambient isotopy, so the knot type (for any closure that stays away) is kept. Sweeps are
    repeated until one deletes nothing."""
    n = points.shape[0]
    if n <= 2:
        return np.arange(n)
    nxt = np.arange(1, n + 1)
    prv = np.arange(-1, n - 1)
    # Segment k runs from vertex k to nxt[k]; its bounding box, updated as vertices go (deleted: empty box).
    lo = np.minimum(points[:-1], points[1:])
    hi = np.maximum(points[:-1], points[1:])
    changed = True
    while changed:
        changed = False
        b = int(nxt[0])
        while b != n - 1:
            a = int(prv[b])
            c = int(nxt[b])
            tri = points[[a, b, c]]
            tlo = tri.min(axis=0)
            thi = tri.max(axis=0)
            cand = np.flatnonzero(np.all((lo <= thi) & (hi >= tlo), axis=1))
            exclude = {a, b}
            if a > 0:
                exclude.add(int(prv[a]))
            if c < n - 1:
                exclude.add(c)
            cand = np.array([k for k in cand.tolist() if k not in exclude], dtype=np.int64)
            blocked = cand.size > 0 and _triangleBlocked(points[a], points[b], points[c], points[cand],
                                                         points[nxt[cand]])
            if not blocked:
                nxt[a] = c
                prv[c] = a
                lo[a] = np.minimum(points[a], points[c])
                hi[a] = np.maximum(points[a], points[c])
                lo[b] = np.inf
                hi[b] = -np.inf
                changed = True
            b = c
    keep = [0]
    while keep[-1] != n - 1:
        keep.append(int(nxt[keep[-1]]))
    return np.array(keep, dtype=np.int64)


def _closedKnotPolygon(ca):
    """The chain closed for knot analysis: both termini are extended radially from the centroid to a
    sphere far outside the chain, the open chain (with those far points as fixed ends) is KMT-reduced,
    and the far ends are joined by a path through one further point outside the sphere. Returns the
    vertices of the closed polygon [m,3] (segment k joins vertex k and k+1 mod m)."""
    centre = ca.mean(axis=0)
    radius = float(np.max(np.linalg.norm(ca - centre, axis=1)))
    far = _KNOT_FAR * radius + 1.0

    def outward(end, inner):
        u = ca[end] - centre
        norm = float(np.linalg.norm(u))
        if norm <= 1e-9 * (radius + 1e-300):
            u = ca[end] - ca[inner]
            norm = float(np.linalg.norm(u))
        if norm == 0.0:
            u = np.array([1.0, 0.0, 0.0])
            norm = 1.0
        return u / norm

    u1 = outward(0, 1)
    u2 = outward(-1, -2)
    chain = np.concatenate([(centre + far * u1)[None], ca, (centre + far * u2)[None]], axis=0)
    reduced = chain[_kmtReduce(chain)]
    m = u1 + u2
    if np.linalg.norm(m) < 0.5:  # termini pointing (nearly) opposite ways: go round at a right angle
        helper = np.eye(3)[int(np.argmin(np.abs(u1)))]
        m = np.cross(u1, helper)
    m /= np.linalg.norm(m)
    return np.concatenate([reduced, (centre + 2.0 * far * m)[None]], axis=0)


def _randomRotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _diagramCrossings(polygon, rotation):
    """Crossings of the closed polygon projected on the xy plane after ``rotation``: a list of
    (underPosition, overPosition) with position = segment index + parameter along it; None when the
    projection is degenerate (a crossing at or next to a vertex, or strands at equal height there)."""
    w = polygon @ rotation.T
    m = w.shape[0]
    p = w[:, :2]
    r = np.roll(p, -1, axis=0) - p
    z = w[:, 2]
    dz = np.roll(z, -1) - z
    i, j = np.triu_indices(m, k=2)
    keep = ~((i == 0) & (j == m - 1))  # the closing segment is adjacent to segment 0
    i, j = i[keep], j[keep]
    if i.size == 0:
        return []
    ri, rj = r[i], r[j]
    qp = p[j] - p[i]
    denom = ri[:, 0] * rj[:, 1] - ri[:, 1] * rj[:, 0]
    lengths = np.linalg.norm(ri, axis=1) * np.linalg.norm(rj, axis=1)
    nearParallel = np.abs(denom) <= _PROJECTION_MARGIN * lengths
    safe = np.where(nearParallel, 1.0, denom)
    s = (qp[:, 0] * rj[:, 1] - qp[:, 1] * rj[:, 0]) / safe
    t = (qp[:, 0] * ri[:, 1] - qp[:, 1] * ri[:, 0]) / safe
    margin = _PROJECTION_MARGIN
    nearBox = (s > -0.01) & (s < 1.01) & (t > -0.01) & (t < 1.01)
    if np.any(nearParallel):
        # Parallel strands overlapping in projection: degenerate if they are collinear and overlap.
        cross = np.abs(qp[:, 0] * ri[:, 1] - qp[:, 1] * ri[:, 0])
        collinear = nearParallel & (cross <= margin * np.linalg.norm(ri, axis=1) ** 2 + 1e-300)
        if np.any(collinear):
            return None
    cand = ~nearParallel & nearBox
    sc, tc, ic, jc = s[cand], t[cand], i[cand], j[cand]
    inside = (sc > 0.0) & (sc < 1.0) & (tc > 0.0) & (tc < 1.0)
    borderline = (np.minimum(np.abs(sc), np.abs(1.0 - sc)) < margin) | \
                 (np.minimum(np.abs(tc), np.abs(1.0 - tc)) < margin)
    if np.any(borderline):
        return None
    sc, tc, ic, jc = sc[inside], tc[inside], ic[inside], jc[inside]
    zi = z[ic] + sc * dz[ic]
    zj = z[jc] + tc * dz[jc]
    heightScale = np.max(np.abs(z)) + 1e-300
    if np.any(np.abs(zi - zj) <= margin * heightScale):
        return None
    posI = ic + sc
    posJ = jc + tc
    iOver = zi > zj
    under = np.where(iOver, posJ, posI)
    over = np.where(iOver, posI, posJ)
    return list(zip(under.tolist(), over.tolist()))


def _isPrime(n):
    if n < 2:
        return False
    for sp in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        if n % sp == 0:
            return n == sp
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    for a in (2, 3, 5, 7, 11, 13, 17):  # deterministic for n < 3.4e14
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _primes(count):
    """The ``count`` largest primes below 2^31 (products of two fit in int64)."""
    candidate = _PRIMES[-1] - 2 if _PRIMES else (1 << 31) - 1
    while len(_PRIMES) < count:
        if _isPrime(candidate):
            _PRIMES.append(candidate)
        candidate -= 2
    return _PRIMES[:count]


def _determinantModP(matrix, p):
    a = np.array(matrix, dtype=np.int64) % p
    n = a.shape[0]
    det = 1
    for k in range(n):
        nonzero = np.flatnonzero(a[k:, k])
        if nonzero.size == 0:
            return 0
        r = k + int(nonzero[0])
        if r != k:
            a[[k, r]] = a[[r, k]]
            det = -det
        pivot = int(a[k, k])
        det = det * pivot % p
        if k + 1 < n:
            factor = a[k + 1:, k] * pow(pivot, p - 2, p) % p
            a[k + 1:, k:] = (a[k + 1:, k:] - factor[:, None] * a[k, k:][None, :] % p) % p
    return det % p


def _integerDeterminant(matrix):
    """Exact determinant of a small-entry integer matrix whose rows have Euclidean norm <= sqrt(6):
    computed modulo enough primes to exceed twice Hadamard's bound, combined by the Chinese remainder
    theorem."""
    n = matrix.shape[0]
    if n == 0:
        return 1
    bits = 0.5 * n * np.log2(6.0) + 2.0
    primes = _primes(int(np.ceil(bits / 30.0)) + 1)
    value, modulus = 0, 1
    for p in primes:
        residue = _determinantModP(matrix, p)
        # x = value (mod modulus), x = residue (mod p)
        k = (residue - value) * pow(modulus, -1, p) % p
        value += modulus * k
        modulus *= p
    if value > modulus // 2:
        value -= modulus
    return value


def _diagramDeterminant(crossings):
    """|det| of the Fox colouring matrix (the Alexander matrix at t = -1) of a knot diagram with one
    minor removed: each crossing gives a row with 2 at its over-arc and -1 at each of its two under-arcs
    (arcs run from one under-crossing to the next along the curve)."""
    n = len(crossings)
    if n <= 1:
        return 1
    unders = np.array([c[0] for c in crossings])
    overs = np.array([c[1] for c in crossings])
    order = np.argsort(unders)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    sortedUnders = unders[order]
    matrix = np.zeros((n, n), dtype=np.int64)
    for c in range(n):
        k = int(rank[c])
        overArc = (int(np.searchsorted(sortedUnders, overs[c])) - 1) % n
        matrix[c, overArc] += 2
        matrix[c, (k - 1) % n] -= 1
        matrix[c, k] -= 1
    return abs(_integerDeterminant(matrix[:-1, :-1]))


def knotDeterminant(ca, projections=3, seed=0):
    """Knot determinant |Delta(-1)| of an open chain, closed far outside (see Notes).

    Parameters
    ----------
    ca : array_like, shape [L, 3], nm
        One point per residue (usually CA), in chain order; L >= 1, all values finite.
    projections : int
        Number of random projection directions (>= 1); the most frequent determinant is returned (every
        non-degenerate projection of the same closed polygon gives the same value, so this only guards
        against numerical trouble).
    seed : int
        Seed of the random projection directions (the result is deterministic for a given seed).

    Returns
    -------
    int
        The absolute value of the Alexander polynomial at t = -1 (the knot determinant): 1 for the unknot,
        3 for the trefoil (3_1), 5 for the figure-eight (4_1) and for 5_1, 7 for 5_2, ... Note that some
        knots (none with fewer than 10 crossings) also have determinant 1.

    Notes
    -----
    1. Closure: both termini are extended radially from the centroid to a point 10 * r_max + 1 nm away
       (r_max: largest distance of a residue from the centroid), and those two far points are joined
       through a third, twice as far, in the direction of the sum of the two terminal directions (or at
       a right angle to them when they point nearly opposite ways). The closing path stays outside the
       sphere that holds the chain, so the knot type is that of the chain as seen from its termini
       ("closure by extending the termini out from the centroid"). A terminus buried in the middle of the
       chain makes any closure, and so the result, somewhat arbitrary -- as for every knot-detection
       method on open chains.
    2. Reduction: the extended open chain is simplified by the KMT algorithm (Koniaris & Muthukumar 1991;
       Taylor 2000): a vertex is deleted when no other segment meets the triangle it forms with its two
       neighbours, sweeping repeated until nothing changes. This is an isotopy, and a protein-like chain
       of a few hundred residues usually shrinks to a handful of vertices.
    3. Invariant: the closed reduced polygon is projected on a random plane; from its crossings (over/under
       from the height) the Fox colouring matrix -- the Alexander matrix at t = -1 -- is built and the
       absolute value of any first minor is computed exactly (integer arithmetic modulo several primes).
       Projections with a crossing at a vertex or strands at equal height are redrawn.
    """
    x = _points(ca, "ca", 1)
    nProj = _integerAtLeast(projections, 1, "projections")
    if x.shape[0] < 3:
        return 1  # at most 5 sticks after closure: no knot is possible
    polygon = _closedKnotPolygon(x)
    rng = np.random.default_rng(seed)
    results = []
    draws = 0
    while len(results) < nProj:
        draws += 1
        if draws > _MAX_PROJECTION_DRAWS * nProj:
            if results:
                break
            raise ValueError("every projection of the closed chain was degenerate (does the chain pass "
                             "through itself?)")
        crossings = _diagramCrossings(polygon, _randomRotation(rng))
        if crossings is None:
            continue
        results.append(_diagramDeterminant(crossings))
    values, counts = np.unique(results, return_counts=True)
    return int(values[np.argmax(counts)])


def knotType(ca, projections=3, seed=0):
    """Name of the simplest prime knot with the chain's knot determinant (see :func:`knotDeterminant`).

    Parameters
    ----------
    ca : array_like, shape [L, 3], nm
        One point per residue (usually CA), in chain order.
    projections, seed
        As for :func:`knotDeterminant`.

    Returns
    -------
    str
        '0_1' (unknot, determinant 1), '3_1' (trefoil, 3), '4_1' (figure-eight, 5; 5_1 has the same
        determinant and is not told apart), '5_2' (7), '6_1' (9; also the granny and square knots),
        '6_2' (11), '6_3' (13); for other determinants ``'det=<d>'``. The determinant alone does not
        identify a knot: this is the simplest candidate, not a proof.
    """
    d = knotDeterminant(ca, projections=projections, seed=seed)
    return _KNOT_NAMES.get(d, f"det={d}")


def isKnotted(ca, projections=3, seed=0):
    """True when the chain's knot determinant (:func:`knotDeterminant`) is not 1.

    A determinant other than 1 proves the closed chain knotted; a determinant of 1 is the unknot for every
    knot of fewer than 10 crossings (the rare knots with determinant 1 are reported as unknotted).
    """
    return knotDeterminant(ca, projections=projections, seed=seed) != 1


def _segmentDistances(p1, q1, p2, q2):
    """Smallest distance between segments p1[k]-q1[k] and p2[k]-q2[k] (vectorised; after Ericson,
    Real-Time Collision Detection, 5.1.9); zero-length segments are handled."""
    d1 = q1 - p1
    d2 = q2 - p2
    r = p1 - p2
    a = np.einsum("ij,ij->i", d1, d1)
    e = np.einsum("ij,ij->i", d2, d2)
    f = np.einsum("ij,ij->i", d2, r)
    c = np.einsum("ij,ij->i", d1, r)
    b = np.einsum("ij,ij->i", d1, d2)
    tiny = 1e-300
    denom = a * e - b * b
    s = np.where(denom > 1e-12 * a * e + tiny, np.clip((b * f - c * e) / np.maximum(denom, tiny), 0.0, 1.0),
                 0.0)
    t = np.where(e > tiny, (b * s + f) / np.maximum(e, tiny), 0.0)
    low = t < 0.0
    high = t > 1.0
    t = np.clip(t, 0.0, 1.0)
    safeA = np.maximum(a, tiny)
    s = np.where(low, np.clip(-c / safeA, 0.0, 1.0), s)
    s = np.where(high, np.clip((b - c) / safeA, 0.0, 1.0), s)
    s = np.where(a > tiny, s, 0.0)
    diff = p1 + d1 * s[:, None] - p2 - d2 * t[:, None]
    return np.sqrt(np.einsum("ij,ij->i", diff, diff))


def chainCrossings(ca, threshold=0.2, minSeparation=2, returnPairs=False):
    """Pairs of chain segments that (nearly) pass through each other.

    Parameters
    ----------
    ca : array_like, shape [L, 3], nm
        One point per residue (usually CA), in chain order; segment i joins ca[i] and ca[i+1]. L >= 1,
        all values finite.
    threshold : float, nm
        Two segments "cross" when the smallest distance between any point of one and any point of the other
        is strictly below ``threshold`` (finite, > 0). The default, 0.2 nm, is about half of the closest
        approach of non-adjacent CA-CA virtual bonds in real proteins (~0.35-0.4 nm and more), so only
        chains that go through (or nearly through) themselves count.
    minSeparation : int
        Segments i and j are compared when ``j - i >= minSeparation`` (>= 1). The default, 2, compares all
        segments that share no residue.
    returnPairs : bool
        Also return the crossing pairs.

    Returns
    -------
    int, or (int, numpy.ndarray of shape [count, 2])
        Number of segment pairs (i, j), i < j, closer than ``threshold``; with ``returnPairs`` also the
        pairs, sorted.

    Notes
    -----
    Candidate pairs are those whose midpoints are closer than ``threshold`` + half the sum of the two
    segment lengths (a necessary condition), found block by block (memory O(L x block)); their exact
    segment-segment distance is then computed.
    """
    x = _points(ca, "ca", 1)
    thr = _positiveFinite(threshold, "threshold")
    minSep = _integerAtLeast(minSeparation, 1, "minSeparation")
    nSeg = x.shape[0] - 1
    pairs = []
    if nSeg >= 1:
        start, end = x[:-1], x[1:]
        mid = 0.5 * (start + end)
        half = 0.5 * np.linalg.norm(end - start, axis=1)
        mid = mid - mid.mean(axis=0)
        midSq = np.einsum("ij,ij->i", mid, mid)
        block = max(1, _CLASH_PAIR_BUDGET // max(nSeg, 1))
        for i0 in range(0, nSeg, block):
            i1 = min(nSeg, i0 + block)
            # Squared midpoint distances by |a|^2 + |b|^2 - 2 a.b (centred, so rounding stays small);
            # the bound gets a little slack for that rounding.
            d2 = midSq[i0:i1, None] + midSq[None, :] - 2.0 * (mid[i0:i1] @ mid.T)
            reach = thr + half[i0:i1, None] + half[None, :] + 1e-6
            idx = np.arange(i0, i1)[:, None]
            cand = (d2 < reach * reach) & (np.arange(nSeg)[None, :] - idx >= minSep)
            ii, jj = np.nonzero(cand)
            if ii.size == 0:
                continue
            ii = ii + i0
            dist = _segmentDistances(start[ii], end[ii], start[jj], end[jj])
            close = dist < thr
            pairs.extend(zip(ii[close].tolist(), jj[close].tolist()))
    pairs.sort()
    count = len(pairs)
    if returnPairs:
        return count, np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return count


# ---------------------------------------------------------------------------------------------------
# Ensembles: pairwise TM-scores, diversity, novelty

_ALIGN_GAP_OPEN = -0.6  # TM-align's gap-opening penalty (no extension penalty)
_ALIGN_THREADINGS = 3  # best gapless threadings refined by dynamic programming
_ALIGN_ITERATIONS = 8
_ALIGN_REFINE_STEPS = 6


def _structureList(structures, name, minCount):
    try:
        items = list(structures)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of [L, 3] arrays") from None
    if len(items) < minCount:
        raise ValueError(f"{name} holds {len(items)} structures; at least {minCount} are needed")
    return [_points(s, f"{name}[{k}]", 3) for k, s in enumerate(items)]


def _alignDP(score, gapOpen):
    """Alignment (query indices, reference indices) maximising the summed ``score`` of aligned pairs
    minus ``gapOpen`` per internal gap (no extension penalty, end gaps free): Gotoh's recursion, one
    vectorised row at a time."""
    n, m = score.shape
    M = np.full((n + 1, m + 1), -np.inf)
    E = np.full((n + 1, m + 1), -np.inf)  # gap in the query (j advances)
    F = np.full((n + 1, m + 1), -np.inf)  # gap in the reference (i advances)
    M[0, :] = 0.0
    M[:, 0] = 0.0
    for i in range(1, n + 1):
        prev = np.maximum(np.maximum(M[i - 1], E[i - 1]), F[i - 1])
        M[i, 1:] = score[i - 1] + prev[:-1]
        F[i, 1:] = np.maximum(np.maximum(M[i - 1, 1:], E[i - 1, 1:]) + gapOpen, F[i - 1, 1:])
        opening = np.maximum(M[i, :-1], F[i, :-1]) + gapOpen
        opening[0] = -np.inf  # M[i, 0] is the free start, not a match
        E[i, 1:] = np.maximum.accumulate(opening)
    lastRow = int(np.argmax(M[n, 1:])) + 1
    lastCol = int(np.argmax(M[1:, m])) + 1
    if M[n, lastRow] >= M[lastCol, m]:
        i, j = n, lastRow
    else:
        i, j = lastCol, m
    qi, rj = [], []
    state = 0  # 0: M, 1: E, 2: F
    while i > 0 and j > 0:
        if state == 0:
            qi.append(i - 1)
            rj.append(j - 1)
            i, j = i - 1, j - 1
            if i == 0 or j == 0:
                break
            values = (M[i, j], E[i, j], F[i, j])
            state = int(np.argmax(values))
        elif state == 1:
            if E[i, j] == E[i, j - 1]:
                j -= 1
            else:
                state = 0 if M[i, j - 1] + gapOpen == E[i, j] else 2
                j -= 1
        else:
            if F[i, j] == F[i - 1, j]:
                i -= 1
            else:
                state = 0 if M[i - 1, j] + gapOpen == F[i, j] else 1
                i -= 1
    return np.array(qi[::-1], dtype=np.int64), np.array(rj[::-1], dtype=np.int64)


def _refineOnPairs(a, b, rotation, translation, d0, norm):
    """Improve a superposition of pairs a[i] <-> b[i] (TM-score, scale d0, normalisation norm) by a few
    rounds of superposing on the pairs closer than d0 and of tangent-weighted superposition."""
    best = (_tmScoreOfDistances(_distances(a, b, rotation, translation), d0, norm), rotation, translation)
    if a.shape[0] < 3:
        return best
    for _ in range(_ALIGN_REFINE_STEPS):
        dist = _distances(a, b, rotation, translation)
        cutoff = d0
        mask = dist < cutoff
        while np.count_nonzero(mask) < 3:
            cutoff += _TM_RELAX_STEP_NM
            mask = dist < cutoff
        rotation, translation = _kabschTransform(a[mask], b[mask])
        dist = _distances(a, b, rotation, translation)
        weights = 1.0 / (1.0 + (dist / d0) ** 2) ** 2
        for r, t in ((rotation, translation), _weightedKabschTransform(a, b, weights)):
            score = _tmScoreOfDistances(_distances(a, b, r, t), d0, norm)
            if score > best[0]:
                best = (score, r, t)
        rotation, translation = best[1], best[2]
    return best


def _structuralTMScore(x, y):
    """TM-score of x (query, normalised by len(x)) against y after a sequence-independent alignment
    found TM-align-style (see :func:`novelty`)."""
    n, m = x.shape[0], y.shape[0]
    d0 = _tmD0(n)
    minOverlap = max(3, min(n, m) // 2)
    threadings = []
    for offset in range(-(n - minOverlap), m - minOverlap + 1):
        i0 = max(0, -offset)
        i1 = min(n, m - offset)
        qi = np.arange(i0, i1)
        a, b = x[qi], y[qi + offset]
        rotation, translation = _kabschTransform(a, b)
        score, rotation, translation = _refineOnPairs(a, b, rotation, translation, d0, n)
        threadings.append((score, offset, rotation, translation))
    threadings.sort(key=lambda c: -c[0])
    best = (threadings[0][0], None, None)
    seen = set()
    for score, offset, rotation, translation in threadings[:_ALIGN_THREADINGS]:
        previous = None
        for _ in range(_ALIGN_ITERATIONS):
            moved = x @ rotation.T + translation
            d2 = np.sum((moved[:, None, :] - y[None, :, :]) ** 2, axis=2)
            qi, rj = _alignDP(1.0 / (1.0 + d2 / (d0 * d0)), _ALIGN_GAP_OPEN)
            key = (qi.tobytes(), rj.tobytes())
            if key == previous or qi.size < 3:
                break
            previous = key
            score, rotation, translation = _refineOnPairs(x[qi], y[rj], rotation, translation, d0, n)
            if key not in seen:
                seen.add(key)
                if score > best[0] or best[1] is None:
                    best = (max(score, best[0]), qi, rj)
    score = best[0]
    if best[1] is not None and best[1].size >= 3:
        score = max(score, _tmSearch(x[best[1]], y[best[2]], d0, n)[0])
    # The best threading with the full search (for equal lengths also the identity threading).
    offsets = {threadings[0][1]} | ({0} if n == m else set())
    for offset in offsets:
        qi = np.arange(max(0, -offset), min(n, m - offset))
        score = max(score, _tmSearch(x[qi], y[qi + offset], d0, n)[0])
    return float(min(score, 1.0))


def _checkAlignment(alignment):
    if alignment not in ("index", "structural"):
        raise ValueError(f"alignment must be 'index' or 'structural', got {alignment!r}")


def pairwiseTMScores(structures, alignment="index"):
    """Matrix of TM-scores between every two structures of an ensemble.

    Parameters
    ----------
    structures : sequence of array_like, each shape [L_k, 3], nm
        One point per residue (usually CA); at least 1 structure, each with >= 3 points, all finite.
    alignment : {'index', 'structural'}
        'index' (default): residue i of one structure goes with residue i of the other (:func:`tmScore`);
        all structures must have the same length. 'structural': sequence-independent alignment as in
        :func:`novelty` (slower; lengths may differ).

    Returns
    -------
    numpy.ndarray, shape [K, K], float64
        Entry [i, j]: the TM-score of structure i against structure j, normalised by the length of
        structure j ('index') or of structure i ('structural'); the diagonal is 1. With 'index' the matrix
        is symmetric: both directions are searched (they score the same superpositions) and the larger
        value -- the better lower bound of the maximum -- is kept.
    """
    _checkAlignment(alignment)
    items = _structureList(structures, "structures", 1)
    k = len(items)
    if alignment == "index":
        lengths = sorted({s.shape[0] for s in items})
        if len(lengths) > 1:
            raise ValueError(f"alignment='index' needs structures of one length, got lengths {lengths}; "
                             "use alignment='structural'")
    out = np.eye(k)
    for i in range(k):
        for j in range(i + 1, k):
            if alignment == "index":
                out[i, j] = out[j, i] = max(tmScore(items[i], items[j]), tmScore(items[j], items[i]))
            else:
                out[i, j] = _structuralTMScore(items[i], items[j])
                out[j, i] = _structuralTMScore(items[j], items[i])
    return out


def diversity(structures, alignment="index"):
    """Structural diversity of an ensemble: ``1 - mean pairwise TM-score``.

    Parameters
    ----------
    structures : sequence of array_like, each shape [L_k, 3], nm
        At least 2 structures (see :func:`pairwiseTMScores`).
    alignment : {'index', 'structural'}
        As for :func:`pairwiseTMScores`.

    Returns
    -------
    float in [0, 1)
        One minus the mean of the off-diagonal entries of :func:`pairwiseTMScores` (ordered pairs): 0 for
        identical (or rigidly moved) copies, near 1 for unrelated structures (random pairs of protein
        structures typically score TM ~0.2-0.3, i.e. diversity ~0.7-0.8).
    """
    matrix = pairwiseTMScores(structures, alignment=alignment)
    k = matrix.shape[0]
    if k < 2:
        raise ValueError("diversity needs at least 2 structures")
    offDiagonal = matrix[~np.eye(k, dtype=bool)]
    return float(1.0 - offDiagonal.mean())


def novelty(structure, references, alignment="structural"):
    """Highest TM-score of a structure against any of a set of references (lower = more novel).

    Parameters
    ----------
    structure : array_like, shape [L, 3], nm
        The query (usually CA positions); L >= 3, all finite.
    references : sequence of array_like, each shape [L_k, 3], nm
        At least one reference, each with >= 3 points; lengths may differ from L with 'structural'.
    alignment : {'structural', 'index'}
        'structural' (default): sequence-independent. 'index': residue i <-> residue i (:func:`tmScore`,
        normalised by L); every reference must then have length L.

    Returns
    -------
    dict
        ``{'max_tm': highest TM-score, 'index': position of that reference in ``references``}``.

    Notes
    -----
    The structural alignment follows TM-align's scheme in a simplified form; TM-scores are normalised by
    the query length L (d0 from L), over the aligned pairs:

    1. Gapless threadings at every offset that overlaps at least half of the shorter chain are each scored
       (superposition of all overlapping pairs, refined on the pairs closer than d0).
    2. The best 3 are refined alternately: score matrix ``1 / (1 + d_ij^2 / d0^2)`` under the current
       superposition, dynamic programming (gap-opening penalty 0.6 as in TM-align, no extension penalty,
       free end gaps), superposition refined on the new alignment -- up to 8 rounds or until the alignment
       repeats.
    3. The best alignment found, the best threading and (for equal lengths) the identity correspondence
       get the full superposition search of :func:`tmScore`; the highest score is returned.

    The result is a lower bound of the optimal sequence-independent TM-score (as TM-align's own is); it
    lacks TM-align's secondary-structure and fragment-based starts, so it can miss the best alignment of
    structures related only through a small rearranged core. For equal lengths it is never below the
    sequence-dependent :func:`tmScore` (the identity correspondence is among the candidates). Cost:
    O(L * L_k) memory and about O((L + L_k) * L) time per reference -- roughly 0.5-1 s per pair of
    300-residue chains on one CPU core.
    """
    _checkAlignment(alignment)
    x = _points(structure, "structure", 3)
    refs = _structureList(references, "references", 1)
    if alignment == "index":
        for k, r in enumerate(refs):
            if r.shape[0] != x.shape[0]:
                raise ValueError(f"alignment='index' needs references of the query's length {x.shape[0]}; "
                                 f"references[{k}] has {r.shape[0]}; use alignment='structural'")
    scores = []
    for r in refs:
        if alignment == "index":
            scores.append(tmScore(x, r))
        else:
            scores.append(_structuralTMScore(x, r))
    best = int(np.argmax(scores))
    return {"max_tm": float(scores[best]), "index": best}
