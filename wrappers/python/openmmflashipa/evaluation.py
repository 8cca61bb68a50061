"""Evaluation of a model on the project's validation split: a report with plots (``flashipa evaluate``).

Four sections, each a function that returns a JSON-ready dict, run together by :func:`evaluate`:

- :func:`generation`: generated proteins (and RNA) per length, refined, then DSSP composition (pydssp),
  radius of gyration against the training set's Rg(L), geometric validity, clashes per 100 residues, knots
  and chain crossings, diversity (mean pairwise TM-score within a length) and novelty (highest TM-score to
  training chains of the same length), backbones per second;
- :func:`designability`: the mission's self-consistency check against simulation, made meaningful: a
  sequence designed for each generated protein backbone with ProteinMPNN (:mod:`openmmflashipa.mpnn`), the
  all-atom model built from it, simulated with amber14 + OBC2 and *without* the learned force; the Cα-RMSD
  drift from the generated backbone (after its frame repair, which is reported too) over time. Validation natives with their own sequence, and with a
  ProteinMPNN sequence, give the ceiling;
- :func:`refinement`: validation natives perturbed by Gaussian noise (0.1 nm per heavy-atom coordinate),
  amber14 + OBC2 alone against amber + the learned force (minimisation, then optionally short MD), RMSD to
  the native after each; and MD drift of the natives with and without the force;
- :func:`discrimination`: the learned energy of each validation native against its decoys (perturbed,
  threaded, shuffled sequence, mirror image).

The report's targets are the model issue's (docs/MODEL.md); :func:`targets` states which are met.
"""

import csv
import datetime
import json
import math
import os
import time

import numpy as np
import openmm
import openmm.unit as unit

from . import backbone as _backbone
from . import metrics
from . import progress as _progress
from .annealing import AnnealingIntegrator
from .generate import generate, choosePlatform, frameSystem
from .refine import refine, withoutFlashIPA, allAtomSystem, repairGeometry, MINIMIZE_TOLERANCE
from .selfconsistency import measure, designedBackbone, _frameIndices, _heavy
from .structure import readStructure
from .topology import LINK_BREAK, C4_BREAK, DEFAULT_SIGMA

# The model issue's targets (docs/MODEL.md, "Targets"); the report says which are met.
HELIX_RANGE = (0.35, 0.60)
STRAND_MIN = 0.15
RG_TOLERANCE = 0.15
VALID_MIN = 0.95
DESIGNABLE_RMSD = 0.2        # nm, Calpha RMSD to the generated backbone over the whole simulation
DESIGNABLE_FRACTION = 0.5
REFINEMENT_RATIO = 0.85      # amber + learned force RMSD <= this x amber alone
DISCRIMINATION_MIN = 0.95

AMINO_ACIDS = ("ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE", "LEU", "LYS", "MET", "PHE",
               "PRO", "SER", "THR", "TRP", "TYR", "VAL")


# ---------------------------------------------------------------- data


class DataSet:
    """The training data set file (scripts/build_dataset.py, data/README.md), read once.

    Attributes: ``atoms`` [N, 3, 3] nm, ``types`` [N], ``segment`` [N], ``offsets`` [C + 1], ``isRna`` [C],
    ``split`` [C] (0 train, 1 validation), ``oxygen`` [N, 3] (protein O, NaN where absent)."""

    def __init__(self, path):
        from .torch_twin import read_safetensors
        if not os.path.exists(path):
            raise ValueError("no data set file %s: build it with scripts/build_dataset.py" % path)
        tensors, metadata = read_safetensors(path)
        if metadata.get("format") != "openmm-flashipa-dataset":
            raise ValueError("%s is not an openmm-flashipa data set (format %r)" % (path, metadata.get("format")))
        self.path = path
        self.atoms = tensors["atoms"].numpy().astype(np.float64)
        self.types = tensors["types"].numpy()
        self.segment = tensors["segment"].numpy()
        self.offsets = tensors["chain_offsets"].numpy()
        self.isRna = tensors["is_rna"].numpy().astype(bool)
        self.split = tensors["split"].numpy()
        self.oxygen = tensors["protein_O"].numpy().astype(np.float64)

    def __len__(self):
        return len(self.offsets) - 1

    def chain(self, index):
        """(atoms [L, 3, 3], types [L], segment [L], oxygen [L, 3]) of chain `index`."""
        s = slice(int(self.offsets[index]), int(self.offsets[index + 1]))
        return self.atoms[s], self.types[s], self.segment[s], self.oxygen[s]

    def chains(self, moltype, split, minLength=1, maxLength=None, singleSegment=False):
        """Indices of the chains of one molecule type ('protein'/'rna') and split ('train'/'val')."""
        if moltype not in ("protein", "rna") or split not in ("train", "val"):
            raise ValueError("moltype must be 'protein' or 'rna' and split 'train' or 'val'")
        rna, splitCode, out = moltype == "rna", {"train": 0, "val": 1}[split], []
        for c in range(len(self)):
            length = int(self.offsets[c + 1] - self.offsets[c])
            if self.isRna[c] != rna or self.split[c] != splitCode or length < minLength:
                continue
            if maxLength is not None and length > maxLength:
                continue
            if singleSegment and self.segment[self.offsets[c + 1] - 1] != 0:
                continue
            out.append(c)
        return out


def _spread(items, count):
    """`count` items spread evenly over a list sorted by the caller (all of them if fewer)."""
    if count >= len(items):
        return list(items)
    picks = np.linspace(0, len(items) - 1, count).round().astype(int)
    return [items[i] for i in picks]


def trainingReference(data, moltype, maxChains=400, seed=0):
    """What generated chains are compared with: the train split's Rg(L) fit, secondary structure and Calpha traces.

    Returns a dict with ``rg_fit`` (a, nu of Rg = a L^nu, nm, least squares in log-log over single-segment chains;
    nu = 0.4 with fewer than three lengths), ``ss`` (mean helix/strand/coil fractions of single-segment protein
    chains; pydssp), ``chains`` (the number used), and ``traces`` {length: [Calpha or C4' arrays]} for novelty."""
    candidates = data.chains(moltype, "train", minLength=20, singleSegment=True)
    candidates.sort(key=lambda c: int(data.offsets[c + 1] - data.offsets[c]))
    chosen = _spread(candidates, maxChains)
    lengths, radii, fractions, paired, torsions, traces = [], [], [], [], [], {}
    for c in chosen:
        atoms, _, _, oxygen = data.chain(c)
        centre = atoms[:, 1]
        lengths.append(len(atoms))
        radii.append(metrics.radiusOfGyration(centre))
        traces.setdefault(len(atoms), []).append(centre)
        if moltype == "protein":
            fractions.append(metrics.secondaryStructureFractions(metrics.secondaryStructure(
                _backbone.proteinBackboneWithOxygen(atoms, oxygen))))
            torsions.append(ramachandran(atoms))
        else:
            paired.append(pairedFraction(atoms))
    if len(set(lengths)) >= 3:
        nu, log_a = np.polyfit(np.log(lengths), np.log(radii), 1)
    else:  # too few lengths to fit an exponent: the compact-globule value 0.4, the prefactor fitted
        nu = 0.4
        log_a = float(np.mean(np.log(radii) - nu * np.log(lengths)))
    reference = {"moltype": moltype, "chains": len(chosen), "rg_fit": {"a": float(np.exp(log_a)), "nu": float(nu)},
                 "traces": traces}
    if fractions:
        reference["ss"] = {k: float(np.mean([f[k] for f in fractions])) for k in fractions[0]}
    if paired:
        reference["paired_fraction"] = float(np.mean(paired))
    if torsions:
        reference["ramachandran"] = {k: float(np.mean([t[k] for t in torsions])) for k in torsions[0]}
    return reference


def referenceRg(reference, length):
    """The training set's radius of gyration at `length` residues (nm), from its power-law fit."""
    fit = reference["rg_fit"]
    return fit["a"] * float(length) ** fit["nu"]


def novelty(trace, reference, window=0.1, maxReferences=20):
    """Highest TM-score (normalised by the generated chain's length, sequence-independent structural alignment:
    metrics.novelty) of a generated trace to the training traces whose length is within +-window (fraction) of
    its own, the `maxReferences` closest in length. None where no training chain is that close in length."""
    length = len(trace)
    close = sorted((abs(n - length), n) for n in reference["traces"] if abs(n - length) <= window * length)
    references = [t for _, n in close for t in reference["traces"][n]][:maxReferences]
    if not references:
        return None
    return float(metrics.novelty(trace, references, alignment="structural")["max_tm"])


def _dihedral(p0, p1, p2, p3):
    """Dihedral angles (degrees) of point quadruples [n, 3] each, IUPAC sign convention."""
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1 = b1 / np.linalg.norm(b1, axis=-1, keepdims=True)
    v = b0 - np.sum(b0 * b1, -1, keepdims=True) * b1
    w = b2 - np.sum(b2 * b1, -1, keepdims=True) * b1
    return np.degrees(np.arctan2(np.sum(np.cross(b1, v) * w, -1), np.sum(v * w, -1)))


def ramachandran(frames):
    """Backbone torsions of one protein chain (frames [L, 3, 3] = N, CA, C, nm, consecutive residues bonded):
    the fractions of residues 2..L-1 with phi > 0 (left-handed; about 5 % in real proteins, mostly glycine), in
    the right-handed helix region (phi < 0, -100 < psi < 50) and in the strand region (phi < 0, psi > 90 or
    psi < -150). A generator that does not know the backbone's chirality puts half its residues at phi > 0."""
    frames = np.asarray(frames, dtype=np.float64)
    if len(frames) < 3:
        return {"phi_positive": None, "rama_alpha": None, "rama_beta": None}
    n, ca, c = frames[:, 0], frames[:, 1], frames[:, 2]
    phi = _dihedral(c[:-2], n[1:-1], ca[1:-1], c[1:-1])
    psi = _dihedral(n[1:-1], ca[1:-1], c[1:-1], n[2:])
    return {"phi_positive": float(np.mean(phi > 0)),
            "rama_alpha": float(np.mean((phi < 0) & (psi > -100) & (psi < 50))),
            "rama_beta": float(np.mean((phi < 0) & ((psi > 90) | (psi < -150))))}


def pairedFraction(frames, low=0.95, high=1.15, minSeparation=4):
    """A base-pairing proxy for RNA backbones without bases: the fraction of nucleotides whose C1' (placed from
    the frame, ideal_geometry) lies low..high nm from the C1' of a nucleotide at least `minSeparation` along the
    chain, each nucleotide paired at most once (closest first). Watson-Crick and wobble pairs put the two C1'
    atoms 1.0-1.1 nm apart. A proxy: compare it with the same number for training chains (the report does)."""
    c1 = _backbone.placeBackboneAtoms(frames, "rna")["C1'"]
    n = len(c1)
    d = np.linalg.norm(c1[:, None] - c1[None], axis=-1)
    i, j = np.nonzero((d >= low) & (d <= high) & (np.abs(np.arange(n)[:, None] - np.arange(n)[None]) >= minSeparation))
    used, pairs = set(), 0
    for k in np.argsort(np.abs(d[i, j] - 0.5 * (low + high)), kind="stable"):
        a, b = int(i[k]), int(j[k])
        if a < b and a not in used and b not in used:
            used.update((a, b))
            pairs += 1
    return 2.0 * pairs / n if n else 0.0


# ---------------------------------------------------------------- generation


def _structureMetrics(refined, generated, moltype):
    """Metrics of one refined generated chain (selfconsistency.measure plus knots and crossings)."""
    indices = _frameIndices(refined)
    heavy, heavy_residues = _heavy(refined.topology, refined)
    xyz = refined.particlePositions
    frames = xyz[indices]
    values, ss = measure(frames, generated.frames[:, 1], moltype, xyz[heavy], heavy_residues)
    length = len(generated)
    values["length"] = length
    values["level"] = refined.level
    values["valid"] = bool(values["bond_violation_fraction"] == 0 and values["clashes"] == 0)
    values["clashes_per_100"] = 100.0 * values["clashes"] / length
    values["knotted"] = bool(metrics.isKnotted(frames[:, 1]))
    values["crossings"] = int(metrics.chainCrossings(frames[:, 1]))
    if ss is not None:
        values["ss"] = "".join(ss)
    if moltype == "rna":
        values["paired_fraction"] = pairedFraction(frames)
    else:
        values.update(ramachandran(frames))
    return values, frames[:, 1]


def generation(moltype, lengths, perLength, reference, seed=0, numSteps=None, platform=None, modelPath=None,
               refineProtocol="md", refineSteps=500, progress=True, scoreScale=1.0):
    """Generate `perLength` chains at each length, refine each, and measure them (see the module).

    Returns {"rows": one dict per chain, "lengths": per-length summary, "backbones_per_second": ...,
    "structures": {length: [refined Calpha/C4' traces]}, "backbones": {length: [Backbone]}} (the last two for
    the designability section and the caller; not written to JSON)."""
    rows, traces, backbones = [], {}, {}
    seconds = 0.0
    bar = _progress.bar(len(lengths) * perLength, "evaluation: generated %s" % moltype, enabled=progress,
                        unit="chain")
    for k, length in enumerate(lengths):
        kwargs = dict(scoreScale=scoreScale, **({} if numSteps is None else {"numSteps": numSteps}))
        started = time.perf_counter()
        chains = generate(moltype, length, perLength, seed=seed + k, platform=platform, modelPath=modelPath,
                          progress=False, **kwargs)
        seconds += time.perf_counter() - started
        backbones[length] = chains
        for j, chain in enumerate(chains):
            # The sample as the flow left it, before any repair: is it a chain at all?
            raw = {"raw_link_median": float(np.median(metrics.linkLengths(chain.frames, moltype))),
                   "raw_connected": connectedFraction(chain.frames, moltype)}
            try:
                refined = refine(chain, platform=platform, protocol=refineProtocol, steps=refineSteps,
                                 seed=seed + j, modelPath=modelPath, progress=False)
                values, trace = _structureMetrics(refined, chain, moltype)
                values["rg_ratio"] = values["radius_of_gyration"] / referenceRg(reference, length)
                values["novelty"] = novelty(trace, reference)
                traces.setdefault(length, []).append(trace)
            except Exception as error:  # recorded, never hidden: a failed refinement counts as invalid
                values = {"length": length, "valid": False, "error": str(error).splitlines()[0][:200]}
            values.update(raw)
            values["sample"] = j
            rows.append(values)
            bar.update(1)
    bar.close()
    summary = {}
    for length in lengths:
        mine = [r for r in rows if r["length"] == length]
        done = [r for r in mine if "error" not in r]
        entry = {"chains": len(mine), "refined": len(done), "valid": _fraction([r["valid"] for r in mine]),
                 "raw_connected": float(np.mean([r["raw_connected"] for r in mine])) if mine else None,
                 "raw_link_median": float(np.median([r["raw_link_median"] for r in mine])) if mine else None}
        for key in ("ss_helix", "ss_strand", "ss_coil", "rg_ratio", "clashes_per_100", "novelty", "paired_fraction",
                    "phi_positive", "rama_alpha", "rama_beta"):
            values = [r[key] for r in done if r.get(key) is not None]
            entry[key] = float(np.mean(values)) if values else None
        entry["knotted"] = _fraction([r["knotted"] for r in done])
        entry["crossings"] = float(np.mean([r["crossings"] for r in done])) if done else None
        group = traces.get(length, [])
        entry["diversity"] = float(metrics.diversity(group)) if len(group) >= 2 else None
        summary[length] = entry
    return {"moltype": moltype, "rows": rows, "lengths": summary,
            "backbones_per_second": sum(len(v) for v in backbones.values()) / seconds if seconds > 0 else None,
            "generation_seconds": seconds, "backbones": backbones}


def connectedFraction(frames, moltype):
    """The fraction of a chain's links (:func:`metrics.linkLengths`) within the chain-break thresholds of
    topology.py: protein C(i)-N(i+1) <= LINK_BREAK (0.2 nm), RNA C4'(i)-C4'(i+1) <= C4_BREAK (0.8 nm)."""
    threshold = LINK_BREAK if moltype == "protein" else C4_BREAK
    return float(np.mean(metrics.linkLengths(frames, moltype) <= threshold))


def _validationChains(data, moltype, maxChains, maxLength):
    """Up to maxChains single-segment validation chains of 20..maxLength residues, spread over their lengths."""
    candidates = data.chains(moltype, "val", minLength=20, maxLength=maxLength, singleSegment=True)
    candidates.sort(key=lambda c: int(data.offsets[c + 1] - data.offsets[c]))
    return _spread(candidates, maxChains)


def _fraction(flags):
    flags = list(flags)
    return float(np.mean(flags)) if flags else None


# ---------------------------------------------------------------- designability (self-consistency)


def simulateDrift(structure, reference, picoseconds, snapshots, platform=None, temperature=300.0, seed=0,
                  withForce=False, modelPath=None, progress=False, label="drift"):
    """Refine `structure` all-atom (amber14 + OBC2; the learned force only if withForce) by minimisation, then
    Langevin at `temperature` for `picoseconds`; the Calpha RMSD to `reference` ([L, 3] nm, the generated or
    native trace) at every snapshot. Returns {"times_ps", "rmsd", "max_rmsd", "final_rmsd", "sequence"}."""
    refined = refine(structure, platform=platform, protocol="minimize", level="all-atom",
                     scale=1.0 if withForce else 0.0, seed=seed, modelPath=modelPath, progress=False)
    system = refined.system if withForce else withoutFlashIPA(refined.system)
    integrator = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, 1.0 / unit.picosecond,
                                                 0.002 * unit.picosecond)
    integrator.setRandomNumberSeed(int(seed) + 1)
    context = openmm.Context(system, integrator, choosePlatform(platform))
    context.setPositions(refined.particlePositions)
    context.setVelocitiesToTemperature(temperature * unit.kelvin, int(seed) + 1)
    indices = _frameIndices(refined)[:, 1]
    total = max(1, int(round(picoseconds / 0.002)))
    per = max(1, total // snapshots)
    times, rmsd = [], []
    bar = _progress.bar(per * snapshots, label, enabled=progress)
    for k in range(snapshots + 1):
        if k:
            integrator.step(per)
            bar.update(per)
        xyz = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        times.append(k * per * 0.002)
        rmsd.append(metrics.kabschRMSD(np.asarray(xyz)[indices], reference))
    bar.close()
    return {"times_ps": times, "rmsd": rmsd, "max_rmsd": float(max(rmsd)), "final_rmsd": float(rmsd[-1]),
            "start_rmsd": float(rmsd[0])}


def designability(backbones, natives, picoseconds, snapshots=10, platform=None, temperature=300.0, seed=0,
                  designTemperature=0.1, mpnnWeights=None, progress=True):
    """Self-consistency against simulation for generated protein backbones and for validation natives.

    backbones: list of generated protein Backbone; natives: list of (name, topology, positions) of validation
    proteins. For each generated backbone: repair the frame geometry (no learned force; the repair's own Calpha
    RMSD is recorded), design a sequence with ProteinMPNN for the repaired backbone, build and simulate the
    all-atom model without the learned force, and record the Calpha RMSD to the repaired backbone. For each
    native: the same simulation with its own sequence and with a ProteinMPNN sequence on its backbone. A chain
    counts as designable when the RMSD stays within DESIGNABLE_RMSD at every snapshot."""
    rows = []
    bar = _progress.bar(len(backbones) + 2 * len(natives), "evaluation: designability", enabled=progress,
                        unit="chain")
    for j, generated in enumerate(backbones):
        row = {"kind": "generated", "length": len(generated), "sample": j}
        try:
            repaired = repairGeometry(generated, platform=platform)
            structure, design = designedBackbone(repaired.frames, temperature=designTemperature, seed=seed + j,
                                                 weights=mpnnWeights)
            row["sequence"] = design.sequence
            # The reference is the repaired backbone, the one the sequence was designed for; how far the repair
            # moved the sampler's output is reported beside it.
            row["repair_rmsd"] = float(metrics.kabschRMSD(repaired.frames[:, 1], generated.frames[:, 1]))
            row.update(simulateDrift(structure, repaired.frames[:, 1],
                                     picoseconds, snapshots, platform, temperature, seed + j))
        except Exception as error:  # recorded: a chain that cannot be built or simulated is not designable
            row["error"] = str(error).splitlines()[0][:200]
        rows.append(row)
        bar.update(1)
    for name, topology, positions in natives:
        frames, oxygen, own = _nativeBackbone(topology, positions)
        for kind in ("native, own sequence", "native, ProteinMPNN sequence"):
            row = {"kind": kind, "name": name, "length": len(frames)}
            try:
                if kind.endswith("own sequence"):
                    structure = (topology, positions)
                    row["sequence"] = own
                else:
                    structure, design = designedBackbone(frames, oxygen, temperature=designTemperature, seed=seed,
                                                         weights=mpnnWeights)
                    row["sequence"] = design.sequence
                    row["recovery"] = float(np.mean([a == b for a, b in zip(design.sequence, own)]))
                row.update(simulateDrift(structure, frames[:, 1], picoseconds, snapshots, platform, temperature, seed))
            except Exception as error:
                row["error"] = str(error).splitlines()[0][:200]
            rows.append(row)
            bar.update(1)
    bar.close()
    summary = {}
    for kind in ("generated", "native, own sequence", "native, ProteinMPNN sequence"):
        mine = [r for r in rows if r["kind"] == kind]
        if mine:
            summary[kind] = {"chains": len(mine),
                             "designable": _fraction([r.get("max_rmsd", math.inf) <= DESIGNABLE_RMSD for r in mine]),
                             "median_final_rmsd": _median([r.get("final_rmsd") for r in mine]),
                             "median_repair_rmsd": _median([r.get("repair_rmsd") for r in mine])}
    return {"picoseconds": picoseconds, "temperature_K": temperature, "design_temperature": designTemperature,
            "threshold_nm": DESIGNABLE_RMSD, "rows": rows, "summary": summary}


def _median(values):
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def _nativeBackbone(topology, positions):
    """(frames [L, 3, 3] N, CA, C; carbonyl O [L, 3], NaN where absent; one-letter sequence) of a one-chain protein."""
    from .mpnn import ONE_LETTER
    xyz = np.asarray(positions.value_in_unit(unit.nanometer), dtype=np.float64)
    frames, oxygen, sequence = [], [], []
    for residue in topology.residues():
        atoms = {a.name: a.index for a in residue.atoms()}
        if not all(name in atoms for name in ("N", "CA", "C")) or residue.name not in AMINO_ACIDS:
            continue
        frames.append(xyz[[atoms["N"], atoms["CA"], atoms["C"]]])
        oxygen.append(xyz[atoms["O"]] if "O" in atoms else np.full(3, np.nan))
        sequence.append(ONE_LETTER[residue.name])
    return np.array(frames), np.array(oxygen), "".join(sequence)


# ---------------------------------------------------------------- refinement


def perturb(positions, noise, seed):
    """Positions plus Gaussian noise of `noise` nm per coordinate (a fixed seed)."""
    xyz = np.asarray(positions.value_in_unit(unit.nanometer), dtype=np.float64)
    return unit.Quantity(xyz + np.random.default_rng(seed).normal(0.0, noise, xyz.shape), unit.nanometer)


def _minimiseAndRun(topology, positions, withForce, iterations, picoseconds, platform, seed, temperature=300.0):
    """amber14 + OBC2 (+ the learned force): L-BFGS, then `picoseconds` of Langevin. ((topology, minimised),
    (topology, after MD) or None)."""
    system, fixedTopology, fixedPositions = allAtomSystem(topology, positions, withForce=withForce)
    integrator = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, 1.0 / unit.picosecond,
                                                 0.002 * unit.picosecond)
    integrator.setRandomNumberSeed(int(seed) + 1)
    context = openmm.Context(system, integrator, choosePlatform(platform))
    context.setPositions(fixedPositions)
    openmm.LocalEnergyMinimizer.minimize(context, MINIMIZE_TOLERANCE, iterations)
    minimised = context.getState(getPositions=True).getPositions(asNumpy=True)
    after = None
    if picoseconds > 0:
        context.setVelocitiesToTemperature(temperature * unit.kelvin, int(seed) + 1)
        integrator.step(int(round(picoseconds / 0.002)))
        after = context.getState(getPositions=True).getPositions(asNumpy=True)
    return fixedTopology, minimised, after


def refinement(natives, noise=0.1, iterations=500, picoseconds=0.0, driftPicoseconds=0.0, platform=None, seed=2024,
               progress=True):
    """Perturbed validation natives refined by amber14 + OBC2 alone and with the learned force (see the module).

    natives: list of (name, topology, positions). Per native: the N/CA/C RMSD to the native of the perturbed
    start, after each route's minimisation and (picoseconds > 0) after its MD; with driftPicoseconds > 0 the
    native itself simulated with and without the force (Calpha RMSD at the end)."""
    rows = []
    bar = _progress.bar(len(natives), "evaluation: refinement", enabled=progress, unit="chain")
    for k, (name, topology, positions) in enumerate(natives):
        noisy = perturb(positions, noise, seed + k)
        row = {"name": name, "residues": topology.getNumResidues(),
               "start": metrics.backboneRMSD(topology, noisy, topology, positions)}
        for label, withForce in (("amber", False), ("amber + learned", True)):
            try:
                fixed, minimised, after = _minimiseAndRun(topology, noisy, withForce, iterations, picoseconds,
                                                          platform, seed + k)
                row[label] = metrics.backboneRMSD(fixed, minimised, topology, positions)
                if after is not None:
                    row[label + ", MD"] = metrics.backboneRMSD(fixed, after, topology, positions)
            except Exception as error:
                row.setdefault("errors", {})[label] = str(error).splitlines()[0][:200]
        if driftPicoseconds > 0:
            frames, _, _ = _nativeBackbone(topology, positions)
            for label, withForce in (("drift without force", False), ("drift with force", True)):
                try:
                    drift = simulateDrift((topology, positions), frames[:, 1], driftPicoseconds, 1, platform,
                                          seed=seed + k, withForce=withForce)
                    row[label] = drift["final_rmsd"]
                except Exception as error:
                    row.setdefault("errors", {})[label] = str(error).splitlines()[0][:200]
        rows.append(row)
        bar.update(1)
    bar.close()
    keys = ["start", "amber", "amber + learned", "amber, MD", "amber + learned, MD", "drift without force",
            "drift with force"]
    means = {key: _mean([r.get(key) for r in rows]) for key in keys}
    ratio = None
    if means["amber"] and means["amber + learned"] is not None:
        ratio = means["amber + learned"] / means["amber"]
    return {"noise_nm": noise, "iterations": iterations, "picoseconds": picoseconds,
            "drift_picoseconds": driftPicoseconds, "rows": rows, "mean": means, "ratio": ratio}


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


# ---------------------------------------------------------------- discrimination


def decoys(atoms, types, rng, donors, noise=0.1):
    """{kind: (atoms, types)} decoys of one native chain (frame atoms [L, 3, 3] nm, types [L]):
    perturbed (Gaussian noise of `noise` nm on every frame atom), threaded (the native sequence on another
    chain's backbone of at least the same length, cropped; from `donors`, a list of atom arrays), shuffled (the
    native backbone with its sequence permuted) and mirrored (the mirror image, every coordinate negated in x)."""
    out = {"perturbed": (atoms + rng.normal(0.0, noise, atoms.shape), types),
           "shuffled": (atoms, rng.permutation(types)),
           "mirrored": (atoms * np.array([-1.0, 1.0, 1.0]), types)}
    usable = [d for d in donors if len(d) >= len(atoms)]
    if usable:
        donor = usable[rng.integers(len(usable))]
        start = rng.integers(len(donor) - len(atoms) + 1)
        out["threaded"] = (donor[start:start + len(atoms)], types)
    return out


def discrimination(data, moltype="protein", maxChains=50, maxLength=300, sigma=DEFAULT_SIGMA, seed=0, modelPath=None,
                   progress=True):
    """The learned energy E(x, sigma) of validation natives against their decoys (see :func:`decoys`).

    A native counts as discriminated when its energy is below every one of its decoys'. Computed with the
    PyTorch twin of the model on the CPU in float64 (the same function as the force)."""
    import torch
    from . import torch_twin
    model = torch_twin.load_energy_model(modelPath, dtype=torch.float64)
    chosen = _validationChains(data, moltype, maxChains, maxLength)
    donors = {c: data.chain(c)[0] for c in data.chains(moltype, "val", minLength=20, singleSegment=True)}
    rng = np.random.default_rng(seed)
    sigmaTensor = torch.tensor([sigma], dtype=torch.float64)

    def energy(atoms, types):
        with torch.no_grad():
            x = torch.tensor(atoms, dtype=torch.float64)[None]
            t = torch.tensor(np.asarray(types), dtype=torch.int64)[None]
            return float(torch_twin.energy(model, x, t, torch.zeros_like(t), sigmaTensor)[0])

    rows = []
    bar = _progress.bar(len(chosen), "evaluation: discrimination", enabled=progress, unit="chain")
    for c in chosen:
        atoms, types, _, _ = data.chain(c)
        donors_other = [d for other, d in donors.items() if other != c]
        row = {"chain": int(c), "length": len(atoms), "native": energy(atoms, types)}
        for kind, (x, t) in decoys(atoms, types, rng, donors_other).items():
            try:
                row[kind] = energy(x, t)
            except ValueError as error:  # a decoy with a degenerate frame is no competitor
                row.setdefault("errors", {})[kind] = str(error).splitlines()[0][:200]
        competitors = [row[k] for k in ("perturbed", "threaded", "shuffled", "mirrored") if k in row]
        row["lowest"] = bool(all(row["native"] < e for e in competitors))
        rows.append(row)
        bar.update(1)
    bar.close()
    perKind = {kind: _fraction([r["native"] < r[kind] for r in rows if kind in r])
               for kind in ("perturbed", "threaded", "shuffled", "mirrored")}
    return {"moltype": moltype, "sigma_nm": sigma, "rows": rows, "native_lowest": _fraction([r["lowest"] for r in rows]),
            "native_below": perKind}


def denoising(data, moltype="protein", sigmas=(0.3, 1.0), maxChains=4, maxLength=200, numSteps=40, sigmaMin=0.01,
              seed=0, platform=None, modelPath=None, progress=True):
    """Whether the model brings sequence neighbours together from a given noise level (docs/MODEL.md): validation
    natives noised by each sigma (nm, per coordinate), then the probability-flow ODE down to sigmaMin with
    :class:`AnnealingIntegrator` (the product's denoising route), with the natives' residue types.

    Reported per sigma: the fraction of links connected (:func:`connectedFraction`) and the Calpha (C4') RMSD
    to the native. A failed run is recorded, never hidden."""
    chosen = _validationChains(data, moltype, maxChains, maxLength)
    rng = np.random.default_rng(seed)
    chosenPlatform = choosePlatform(platform)
    rows = []
    bar = _progress.bar(len(chosen) * len(sigmas), "evaluation: denoising", enabled=progress, unit="run")
    for c in chosen:
        atoms, types, _, _ = data.chain(c)
        system, _ = frameSystem(moltype, len(atoms), modelPath, types=types)
        integrator = AnnealingIntegrator(max(sigmas), sigmaMin, numSteps)
        context = openmm.Context(system, integrator, chosenPlatform)
        for sigma in sigmas:
            row = {"chain": int(c), "length": len(atoms), "sigma_nm": float(sigma)}
            try:
                context.setPositions(((atoms + sigma * rng.standard_normal(atoms.shape)).reshape(-1, 3)))
                integrator.restart(sigma)
                integrator.step(numSteps)
                x = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
                x = np.asarray(x, dtype=np.float64).reshape(atoms.shape)
                row["connected"] = connectedFraction(x, moltype)
                row["rmsd_nm"] = float(metrics.kabschRMSD(x[:, 1], atoms[:, 1]))
            except Exception as error:
                row["error"] = str(error).splitlines()[0][:200]
            rows.append(row)
            bar.update(1)
        del context
    bar.close()
    summary = {}
    for sigma in sigmas:
        runs = [r for r in rows if r["sigma_nm"] == float(sigma)]
        done = [r for r in runs if "error" not in r]
        summary[str(sigma)] = {"runs": len(runs), "completed": len(done),
                               "connected": float(np.mean([r["connected"] for r in done])) if done else None,
                               "rmsd_nm": float(np.mean([r["rmsd_nm"] for r in done])) if done else None}
    return {"moltype": moltype, "num_steps": numSteps, "sigma_min_nm": sigmaMin, "rows": rows, "sigmas": summary}


# ---------------------------------------------------------------- validation natives from files


def validationNatives(manifest, dataDir, count, minLength=50, maxLength=200, moltype="protein"):
    """`count` validation proteins (one segment, every residue with frame atoms, standard residues only) spread
    over the length range, read from the shared data folder: [(name, topology, positions)]."""
    rows = []
    with open(manifest) as handle:
        for r in csv.DictReader(handle, delimiter="\t"):
            if r["moltype"] != moltype or r["split"] != "val" or r["segments"] != "1":
                continue
            n = int(r["residues"])
            if minLength <= n <= maxLength:
                rows.append((n, r["file"]))
    rows.sort()
    natives = []
    # Candidates spread over the length range, four per wanted native: some files hold non-standard residues.
    for n, path in _spread(rows, 4 * count):
        try:
            topology, positions = readStructure(os.path.join(dataDir, path))
        except ValueError:
            continue
        residues = list(topology.residues())
        if any(res.name not in AMINO_ACIDS for res in residues) or len(residues) != n:
            continue
        natives.append((os.path.basename(path).replace(".cif.gz", ""), topology, positions))
    return _spread(natives, count)


# ---------------------------------------------------------------- report


def targets(report):
    """[(target, value, met)] for the model issue's targets the report measured."""
    out = []
    gen = report.get("generation", {}).get("protein")
    if gen:
        entries = [e for e in gen["lengths"].values() if e["refined"]]
        helix = [e["ss_helix"] for e in entries if e["ss_helix"] is not None]
        strand = [e["ss_strand"] for e in entries if e["ss_strand"] is not None]
        if helix:
            out.append(("protein helix fraction in [%.2f, %.2f] at every length" % HELIX_RANGE,
                        "%.2f-%.2f" % (min(helix), max(helix)), all(HELIX_RANGE[0] <= h <= HELIX_RANGE[1] for h in helix)))
        if strand:
            out.append(("protein strand fraction >= %.2f at every length" % STRAND_MIN, "%.2f-%.2f" % (min(strand), max(strand)),
                        all(s >= STRAND_MIN for s in strand)))
    for moltype in ("protein", "rna"):
        g = report.get("generation", {}).get(moltype)
        if not g:
            continue
        entries = list(g["lengths"].values())
        valid = [e["valid"] for e in entries if e["valid"] is not None]
        if valid:
            out.append(("%s valid after refinement >= %.2f at every length" % (moltype, VALID_MIN),
                        "%.2f-%.2f" % (min(valid), max(valid)), all(v >= VALID_MIN for v in valid)))
        ratios = [e["rg_ratio"] for e in entries if e["rg_ratio"] is not None]
        if ratios:
            out.append(("%s Rg within %d %% of the training set at every length" % (moltype, 100 * RG_TOLERANCE),
                        "%.2f-%.2f" % (min(ratios), max(ratios)), all(abs(r - 1) <= RG_TOLERANCE for r in ratios)))
        knots = [e["knotted"] for e in entries if e["knotted"] is not None]
        if knots:
            out.append(("%s: no knots" % moltype, "%.2f knotted" % max(knots), max(knots) == 0))
    des = report.get("designability", {}).get("summary", {}).get("generated")
    if des and des["designable"] is not None:
        out.append(("generated proteins designable (Calpha RMSD <= %.1f nm throughout) >= %.0f %%"
                    % (DESIGNABLE_RMSD, 100 * DESIGNABLE_FRACTION), "%.2f of %d" % (des["designable"], des["chains"]),
                    des["designable"] >= DESIGNABLE_FRACTION))
    ref = report.get("refinement")
    if ref and ref.get("ratio") is not None:
        out.append(("refinement: amber + learned <= %.2f x amber alone" % REFINEMENT_RATIO, "%.2f" % ref["ratio"],
                    ref["ratio"] <= REFINEMENT_RATIO))
        m = ref["mean"]
        if m.get("drift with force") is not None and m.get("drift without force") is not None:
            out.append(("native MD drift with the force <= without", "%.3f vs %.3f nm" % (m["drift with force"],
                                                                                           m["drift without force"]),
                        m["drift with force"] <= m["drift without force"]))
    dis = report.get("discrimination")
    if dis and dis.get("native_lowest") is not None:
        out.append(("native lowest against its decoys >= %.2f" % DISCRIMINATION_MIN, "%.2f" % dis["native_lowest"],
                    dis["native_lowest"] >= DISCRIMINATION_MIN))
    return out


def _fmt(value, digits=3):
    if value is None:
        return "—"
    if isinstance(value, float):
        return "%.*f" % (digits, value)
    return str(value)


def markdown(report):
    """The report as Markdown: settings, one table per section, the targets."""
    lines = ["# Model evaluation", "", "- model: %s" % report["model"], "- date: %s" % report["date"],
             "- platform: %s" % report["platform"], "- settings: `%s`" % json.dumps(report["settings"]), ""]
    for moltype, g in report.get("generation", {}).items():
        lines += ["## Generated %s" % moltype, "",
                  "%.3g backbones/s (generation alone)." % (g["backbones_per_second"] or 0), "",
                  "| length | chains | raw links connected | raw median link (nm) | valid | helix | strand | coil "
                  "| Rg / training Rg(L) | clashes /100 res | knotted "
                  "| crossings | diversity (1 - mean pairwise TM) | novelty (max TM to training) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for length, e in g["lengths"].items():
            lines.append("| %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                length, e["chains"], _fmt(e.get("raw_connected"), 2), _fmt(e.get("raw_link_median"), 3),
                _fmt(e["valid"], 2), _fmt(e["ss_helix"], 2), _fmt(e["ss_strand"], 2),
                _fmt(e["ss_coil"], 2), _fmt(e["rg_ratio"], 2), _fmt(e["clashes_per_100"], 2), _fmt(e["knotted"], 2),
                _fmt(e["crossings"], 1), _fmt(e["diversity"], 2), _fmt(e["novelty"], 2)))
        lines += ["", "Raw: the samples as the flow left them (links connected within the chain-break thresholds); "
                      "the other columns after the frame repair and refinement."]
        ref = report.get("training_reference", {}).get(moltype, {})
        if moltype == "rna":
            lines.append("")
            lines.append("Base-paired fraction (C1'-C1' proxy, `pairedFraction`): %s" % ", ".join(
                "%s nt %s" % (L, _fmt(e.get("paired_fraction"), 2)) for L, e in g["lengths"].items()) +
                "; training chains %s." % _fmt(ref.get("paired_fraction"), 2))
        if moltype == "protein":
            lines.append("")
            rama = ref.get("ramachandran", {})
            perLength = ", ".join("%s: %s / %s / %s" % (L, _fmt(e.get("phi_positive"), 2), _fmt(e.get("rama_alpha"), 2),
                                                         _fmt(e.get("rama_beta"), 2)) for L, e in g["lengths"].items())
            lines.append("Backbone torsions (`ramachandran`, fraction of residues with phi > 0 / in the helix region / "
                         "in the strand region): %s; training chains %s / %s / %s." % (
                             perLength, _fmt(rama.get("phi_positive"), 2), _fmt(rama.get("rama_alpha"), 2),
                             _fmt(rama.get("rama_beta"), 2)))
        if ref.get("ss"):
            lines.append("")
            lines.append("Training set (%d train chains): helix %.2f, strand %.2f; Rg = %.3f L^%.3f nm." % (
                ref["chains"], ref["ss"]["helix"], ref["ss"]["strand"], ref["rg_fit"]["a"], ref["rg_fit"]["nu"]))
        lines.append("")
    des = report.get("designability")
    if des:
        lines += ["## Self-consistency against simulation (ProteinMPNN sequence, amber14 + OBC2, no learned force)", "",
                  "%.0f ps at %.0f K; designable = Calpha RMSD to the backbone <= %.2f nm at every snapshot." % (
                      des["picoseconds"], des["temperature_K"], des["threshold_nm"]), "",
                  "Generated backbones are measured against their frame-repaired form (what the sequence was designed "
                  "for); the last column is how far the repair moved the sampler's output.", "",
                  "| chains | n | designable | median final RMSD (nm) | median repair RMSD (nm) |", "|---|---|---|---|---|"]
        for kind, s in des["summary"].items():
            lines.append("| %s | %d | %s | %s | %s |" % (kind, s["chains"], _fmt(s["designable"], 2),
                                                      _fmt(s["median_final_rmsd"]), _fmt(s.get("median_repair_rmsd"))))
        lines.append("")
    ref = report.get("refinement")
    if ref:
        lines += ["## Refinement of perturbed validation natives (%.2f nm noise; N/CA/C RMSD to native, nm)" % ref["noise_nm"], "",
                  "| native | residues | start | amber | amber + learned | amber, MD | amber + learned, MD | drift without | drift with |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in ref["rows"] + [dict(name="**mean**", residues="", **ref["mean"])]:
            lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                r["name"], r["residues"], _fmt(r.get("start")), _fmt(r.get("amber")), _fmt(r.get("amber + learned")),
                _fmt(r.get("amber, MD")), _fmt(r.get("amber + learned, MD")), _fmt(r.get("drift without force")),
                _fmt(r.get("drift with force"))))
        lines += ["", "Ratio amber + learned / amber: %s." % _fmt(ref["ratio"], 3), ""]
    den = report.get("denoising")
    if den:
        lines += ["## Denoising validation natives (%s; %d ODE steps down to %.2f nm)" % (
                      den["moltype"], den["num_steps"], den["sigma_min_nm"]), "",
                  "Links connected (within the chain-break thresholds) and Calpha RMSD to the native after the flow from "
                  "the native noised by sigma: whether the model brings sequence neighbours together from that noise.", "",
                  "| sigma (nm) | runs | completed | links connected | RMSD to native (nm) |", "|---|---|---|---|---|"]
        for sigma, e in den["sigmas"].items():
            lines.append("| %s | %d | %d | %s | %s |" % (sigma, e["runs"], e["completed"], _fmt(e["connected"], 2),
                                                       _fmt(e["rmsd_nm"])))
        lines.append("")
    dis = report.get("discrimination")
    if dis:
        lines += ["## Discrimination (learned energy at sigma = %.2f nm)" % dis["sigma_nm"], "",
                  "Native lowest against all its decoys: %s of %d chains. Native below each kind: %s." % (
                      _fmt(dis["native_lowest"], 2), len(dis["rows"]),
                      ", ".join("%s %s" % (k, _fmt(v, 2)) for k, v in dis["native_below"].items())), ""]
    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for name, value, met in targets(report):
        lines.append("| %s | %s | %s |" % (name, value, "yes" if met else "**no**"))
    return "\n".join(lines) + "\n"


def plots(report, out):
    """PNG plots next to the report: Rg against length with the training fit; DSSP composition per length;
    designability RMSD curves; refinement RMSDs per route. Returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []

    def save(fig, path):
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    for moltype, g in report.get("generation", {}).items():
        rows = [r for r in g["rows"] if "radius_of_gyration" in r]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.scatter([r["length"] for r in rows], [r["radius_of_gyration"] for r in rows], s=12, label="generated")
        fit = report["training_reference"][moltype]["rg_fit"]
        grid = np.linspace(min(r["length"] for r in rows), max(r["length"] for r in rows), 50)
        ax.plot(grid, fit["a"] * grid ** fit["nu"], "k-", label="training set fit")
        ax.fill_between(grid, (1 - RG_TOLERANCE) * fit["a"] * grid ** fit["nu"],
                        (1 + RG_TOLERANCE) * fit["a"] * grid ** fit["nu"], color="0.85", label="+-15 %")
        ax.set_xlabel("residues")
        ax.set_ylabel("radius of gyration (nm)")
        ax.set_title("generated %s" % moltype)
        ax.legend()
        written.append(save(fig, os.path.join(out, "rg_%s.png" % moltype)))
        if moltype == "protein":
            lengths = list(g["lengths"])
            fig, ax = plt.subplots(figsize=(6, 4))
            bottom = np.zeros(len(lengths))
            for key, colour in (("ss_helix", "tab:red"), ("ss_strand", "tab:blue"), ("ss_coil", "0.7")):
                values = np.array([g["lengths"][L][key] or 0.0 for L in lengths])
                ax.bar([str(L) for L in lengths], values, bottom=bottom, color=colour, label=key[3:])
                bottom += values
            ss = report["training_reference"][moltype].get("ss")
            if ss:
                ax.axhline(ss["helix"], color="tab:red", ls="--", lw=1, label="training helix")
            ax.set_xlabel("residues")
            ax.set_ylabel("fraction of residues")
            ax.legend(fontsize=8)
            written.append(save(fig, os.path.join(out, "ss_protein.png")))
    des = report.get("designability")
    if des and any("rmsd" in r for r in des["rows"]):
        fig, ax = plt.subplots(figsize=(6, 4))
        colours = {"generated": "tab:orange", "native, own sequence": "tab:green", "native, ProteinMPNN sequence": "tab:blue"}
        seen = set()
        for r in des["rows"]:
            if "rmsd" not in r:
                continue
            label = r["kind"] if r["kind"] not in seen else None
            seen.add(r["kind"])
            ax.plot(r["times_ps"], r["rmsd"], color=colours[r["kind"]], alpha=0.6, label=label)
        ax.axhline(des["threshold_nm"], color="k", ls="--", lw=1)
        ax.set_xlabel("time (ps)")
        ax.set_ylabel("Calpha RMSD to the backbone (nm)")
        ax.legend(fontsize=8)
        written.append(save(fig, os.path.join(out, "designability.png")))
    ref = report.get("refinement")
    if ref and ref["rows"]:
        keys = [k for k in ("start", "amber", "amber + learned", "amber, MD", "amber + learned, MD") if ref["mean"].get(k) is not None]
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in ref["rows"]:
            ax.plot(range(len(keys)), [r.get(k, np.nan) for k in keys], "o-", alpha=0.6)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(keys, rotation=20, fontsize=8)
        ax.set_ylabel("N/CA/C RMSD to native (nm)")
        written.append(save(fig, os.path.join(out, "refinement.png")))
    return written


def _jsonReady(value):
    if isinstance(value, dict):
        return {str(k): _jsonReady(v) for k, v in value.items() if k not in ("backbones", "traces")}
    if isinstance(value, (list, tuple)):
        return [_jsonReady(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


SECTIONS = ("generation", "denoising", "designability", "refinement", "discrimination")


def evaluate(out, dataset, manifest, dataDir, sections=SECTIONS, proteinLengths=(50, 100, 150, 200, 250, 300),
             rnaLengths=(40, 70, 100, 150), perLength=4, designable=20, designLength=100, natives=4,
             designPicoseconds=1000.0, refinePicoseconds=0.0, driftPicoseconds=0.0, refineIterations=500,
             discriminationChains=50, denoisingChains=8, numSteps=None, refineSteps=500, platform=None, modelPath=None,
             seed=0, progress=True, scoreScale=1.0):
    """Run the chosen sections and write ``report.json``, ``report.md`` and the plots into `out`.
    ``scoreScale`` is the generator's lambda (openmmflashipa.generate) for the generated chains.

    Defaults are the model issue's full evaluation (a GPU job: about a GPU-minute per designability chain);
    pass smaller numbers for a quick look. Returns the report dict."""
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError("unknown section(s) %s; choose from %s" % (", ".join(unknown), ", ".join(SECTIONS)))
    data = DataSet(dataset)
    platformName = choosePlatform(platform).getName()
    report = {"model": modelPath or "the shipped model", "date": datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC"),
              "platform": platformName, "dataset": os.path.basename(dataset),
              "settings": {"sections": list(sections), "protein_lengths": list(proteinLengths),
                           "rna_lengths": list(rnaLengths), "per_length": perLength, "designable": designable,
                           "design_length": designLength, "natives": natives, "design_ps": designPicoseconds,
                           "refine_ps": refinePicoseconds, "drift_ps": driftPicoseconds, "seed": seed,
                           "num_steps": numSteps, "score_scale": scoreScale}}
    os.makedirs(out, exist_ok=True)
    nativeList = None
    if "generation" in sections:
        report["generation"], report["training_reference"] = {}, {}
        for moltype, lengths in (("protein", proteinLengths), ("rna", rnaLengths)):
            if not lengths:
                continue
            reference = trainingReference(data, moltype, seed=seed)
            report["training_reference"][moltype] = reference
            report["generation"][moltype] = generation(moltype, list(lengths), perLength, reference, seed=seed,
                                                       numSteps=numSteps, platform=platform, modelPath=modelPath,
                                                       refineSteps=refineSteps, progress=progress,
                                                       scoreScale=scoreScale)
    if "denoising" in sections:
        report["denoising"] = denoising(data, maxChains=denoisingChains, seed=seed, platform=platform,
                                        modelPath=modelPath, progress=progress)
    if "designability" in sections:
        kwargs = dict(scoreScale=scoreScale, **({} if numSteps is None else {"numSteps": numSteps}))
        backbones = generate("protein", designLength, designable, seed=seed + 1000, platform=platform,
                             modelPath=modelPath, progress=False, **kwargs) if designable > 0 else []
        nativeList = validationNatives(manifest, dataDir, natives)
        report["designability"] = designability(backbones, nativeList, designPicoseconds, platform=platform, seed=seed,
                                                progress=progress)
    if "refinement" in sections:
        nativeList = nativeList or validationNatives(manifest, dataDir, natives)
        report["refinement"] = refinement(nativeList, iterations=refineIterations, picoseconds=refinePicoseconds,
                                          driftPicoseconds=driftPicoseconds, platform=platform, progress=progress)
    if "discrimination" in sections:
        report["discrimination"] = discrimination(data, maxChains=discriminationChains, seed=seed, modelPath=modelPath,
                                                  progress=progress)
    report = _jsonReady(report)
    report["targets"] = [{"target": t, "measured": v, "met": bool(m)} for t, v, m in targets(report)]
    with open(os.path.join(out, "report.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    with open(os.path.join(out, "report.md"), "w") as handle:
        handle.write(markdown(report))
    report["plots"] = plots(report, out)
    return report
