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
    d0 = _tmD0(n)
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
            candidates.append((_tmScoreOfDistances(dist, d0, n), rotation, translation))
            cutoff = d0
            newMask = dist < cutoff
            while np.count_nonzero(newMask) < 3:
                cutoff += _TM_RELAX_STEP_NM
                newMask = dist < cutoff
            if np.array_equal(newMask, mask):
                break
            mask = newMask
    candidates.sort(key=lambda c: -c[0])
    best = candidates[0][0]
    for score, rotation, translation in candidates[:_TM_POLISHED]:
        dist = _distances(a, b, rotation, translation)
        for _ in range(_TM_POLISH_STEPS):
            weights = 1.0 / (1.0 + (dist / d0) ** 2) ** 2
            rotation, translation = _weightedKabschTransform(a, b, weights)
            dist = _distances(a, b, rotation, translation)
            newScore = _tmScoreOfDistances(dist, d0, n)
            best = max(best, newScore)
            if newScore - score < 1e-12:
                break
            score = newScore
    return float(min(best, 1.0))


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
    cut = float(cutoff)
    if not np.isfinite(cut) or cut <= 0.0:
        raise ValueError(f"cutoff must be finite and > 0, got {cutoff}")
    try:
        minSep = int(minSeparation)
        valid = minSep == minSeparation and minSep >= 0
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"minSeparation must be an integer >= 0, got {minSeparation!r}")
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
