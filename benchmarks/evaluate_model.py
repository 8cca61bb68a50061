#!/usr/bin/env python
"""Evaluate a FlashIPA energy-model checkpoint on the validation split of the training set.

Reads the data set built by scripts/build_dataset.py (build/dataset/flashipa-dataset.safetensors, with
data/manifest.tsv naming each chain's source file) and uses only chains with split = validation. Three
measurements, protein and RNA separately (units: nm, kJ/mol; model energies E in kT):

1. Denoising (OpenMM, the plugin's FlashIPAForce, the product path). The native frame atoms (protein N, CA,
   C; RNA C3', C4', O4') get isotropic Gaussian noise of each --sigmas value (nm per coordinate); then
   openmm.LocalEnergyMinimizer minimises the learned energy at flashipaSigma = sigma_ref (the noise sigma,
   or --sigma-ref) in a System whose only particles are that chain's frame atoms. Reported: backbone RMSD to
   the native (Kabsch superposition) before and after, median over chains. For protein the same is done
   with amber14-all + implicit solvent (OBC2 or GBn2) on the all-atom chain read from the source file
   (standard residues only, hydrogens from Modeller.addHydrogens, every atom perturbed; the N, CA, C atoms
   get exactly the same noise as in the frame-only system); chains amber cannot template are skipped and
   counted. The learned and amber RMSDs are also compared on the same atoms (the N, CA, C of the residues
   present in both) of the chains where both worked. --with-hybrid adds amber + FlashIPAForce together.
   Project target: at sigma = 0.1 nm, median RMSD after <= 0.5 x median RMSD before (protein and RNA).
   Also (frame atoms only): --annealed-steps > 0 runs the probability-flow ODE from the noise sigma down in
   OpenMM (openmmflashipa.AnnealingIntegrator; what works, docs/DESIGN-DECISIONS.md), and --frame-variants
   adds the learned energy + ideal frame geometry and that geometry alone (the control).
2. Score (the PyTorch twin, CPU): the trainer's validation loss (training/src/Trainer.cpp): a crop of up to
   --crop residues, centred, randomly rotated; centred noise eps; x~ = x + sigma eps; sigma stratified
   log-uniform over the model's [sigmaMin, sigmaMax]; loss = sum (sigma dE/dx~ - eps)^2 / (9 per residue)
   per noise band (< 0.05, 0.05-0.2, 0.2-0.5, >= 0.5 nm), against the zero predictor (sum eps^2 / count).
   Note the sign: the trainer fits sigma grad E ~ +eps, i.e. the score -grad E ~ -eps / sigma.
3. Energy vs RMSD (the twin, at --energy-sigma): Spearman rank correlation between E and RMSD to native
   over --copies perturbed copies per chain (noise sigma evenly spread over [0, --max-copy-sigma], the
   first copy the native), per chain (median) and pooled ((E - E_native) / L over all chains); and decoys:
   sequence-shuffled (same coordinates, permuted residue types), reversed chain direction (protein only:
   residue order reversed, N and C swapped), threaded (the native sequence on another validation chain's
   backbone of the same type) and mirror image (x -> -x). Reported: fraction of comparisons where the
   native has the lower energy.

Outputs in --out: report.md (the table printed to stdout), report.json (every number, per chain too) and
PNG plots. Progress goes to stderr. The same --seed gives the same chains, noise and decoys.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/evaluate_model.py --max-chains-per-type 8
    .venv/bin/python benchmarks/evaluate_model.py --model models/checkpoints/run/model.safetensors \
        --platform CUDA --out benchmarks/results/model_eval
"""

import argparse
import csv
import datetime
import json
import math
import os
import sys
import time
import warnings

import torch  # before the plugin's extension (see openmmflashipa/__init__.py)

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit

import openmmflashipa
from openmmflashipa import backbone, metrics, torch_twin
from openmmflashipa.annealing import AnnealingIntegrator
from openmmflashipa.checksums import fileSha256

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import build_dataset  # noqa: E402  (the data set's reading rules: pick_atoms, residue names, break test)

DEFAULT_DATASET = os.path.join(ROOT, "build", "dataset", "flashipa-dataset.safetensors")
DEFAULT_MANIFEST = os.path.join(ROOT, "data", "manifest.tsv")
DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data")
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "model_eval")

PATH_OPTIONS = ("model", "dataset", "manifest", "data", "out")
MOLTYPES = ("protein", "rna")
BAND_EDGES = (0.05, 0.2, 0.5)  # nm, Trainer.cpp validationSigmaBands()
BAND_NAMES = ("<0.05", "0.05-0.2", "0.2-0.5", ">=0.5")
TARGET_SIGMA = 0.1
FRAME_MASSES = {"protein": (14.007, 12.011, 12.011), "rna": (12.011, 12.011, 15.999)}
MATCH_TOLERANCE = 1e-3  # nm: a file residue is the data set's residue if its frame atoms lie this close


def log(message):
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# Statistics and geometry (numpy only)
# ---------------------------------------------------------------------------------------------------

def rankdata(values):
    """Ranks 1..n of a 1-D array, ties given their average rank (as scipy.stats.rankdata)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def spearman(x, y):
    """Spearman rank correlation (Pearson correlation of average ranks); NaN if either side is constant
    or there are fewer than two finite pairs."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 2:
        return float("nan")
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def kabsch_rmsd(x, reference):
    """RMSD of points x [..., 3] to reference [..., 3] after the optimal proper rotation and translation."""
    return metrics.kabschRMSD(np.reshape(np.asarray(x, dtype=np.float64), (-1, 3)),
                              np.reshape(np.asarray(reference, dtype=np.float64), (-1, 3)))


def random_rotation(rng):
    """A uniformly distributed rotation matrix (QR of a Gaussian matrix with the sign fix)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def median(values):
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.median(values)) if values else None


def fraction(flags):
    flags = list(flags)
    return float(np.mean(flags)) if flags else None


def chain_rng(seed, *keys):
    """A generator that depends only on the seed and the keys (chain index, stage, ...): any subset of the
    chains gets the same numbers."""
    return np.random.default_rng([int(seed)] + [int(k) for k in keys])


# ---------------------------------------------------------------------------------------------------
# Data set and chain selection
# ---------------------------------------------------------------------------------------------------

class Chain:
    """One validation chain (a window of at most --max-length residues) of the data set."""

    def __init__(self, index, moltype, atoms, types, segments, row, start, full_length):
        self.index = index          # chain index in the data set
        self.moltype = moltype      # "protein" | "rna"
        self.atoms = atoms          # [L, 3, 3] float64 nm, frame atoms a, b, c
        self.types = types          # [L] int64
        self.segments = segments    # [L] int64 (the model's chain ids)
        self.row = row              # data/manifest.tsv row
        self.start = start          # first residue of the window within the chain
        self.full_length = full_length

    @property
    def length(self):
        return len(self.types)

    @property
    def name(self):
        """The source file's name without folder and extension (unique; structure and chain are not)."""
        return os.path.basename(self.row["file"]).split(".")[0]

    def describe(self):
        return {"index": self.index, "name": self.name, "file": self.row["file"], "length": self.length,
                "full_length": self.full_length, "window_start": self.start,
                "segments": int(len(np.unique(self.segments)))}


def load_dataset(path):
    tensors, metadata = torch_twin.read_safetensors(path)
    if metadata.get("format") != "openmm-flashipa-dataset":
        raise SystemExit("%s is not an openmm-flashipa data set" % path)
    data = {name: tensor.numpy() for name, tensor in tensors.items()}
    data["metadata"] = metadata
    return data


def read_manifest(path, data):
    """The manifest rows, checked against the data set (same chains, lengths and split)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    offsets = data["chain_offsets"]
    if len(rows) != len(offsets) - 1:
        raise SystemExit("%s has %d rows but the data set %d chains: rebuild them together (scripts/"
                         "build_dataset.py)" % (path, len(rows), len(offsets) - 1))
    for c, row in enumerate(rows):
        same = (int(row["residues"]) == offsets[c + 1] - offsets[c]
                and (row["moltype"] == "rna") == bool(data["is_rna"][c])
                and (row["split"] == "val") == bool(data["split"][c]))
        if not same:
            raise SystemExit("%s row %d (%s) does not describe data set chain %d" % (path, c, row["file"], c))
    return rows


def select_chains(data, rows, moltype, max_chains, max_length, min_length, seed):
    """Up to max_chains validation chains of one type (a seeded sample, in data-set order), each cropped to
    a seeded window of max_length residues when longer."""
    offsets = data["chain_offsets"]
    want_rna = moltype == "rna"
    eligible = [c for c in range(len(offsets) - 1)
                if data["split"][c] == 1 and bool(data["is_rna"][c]) == want_rna
                and offsets[c + 1] - offsets[c] >= min_length]
    order = chain_rng(seed, 1 if want_rna else 0).permutation(len(eligible))
    return make_chains(data, rows, sorted(eligible[i] for i in order[:max_chains]), max_length, seed)


def make_chains(data, rows, indices, max_length, seed):
    """Chain objects for data-set chain indices (windows of max_length residues at a seeded start)."""
    offsets = data["chain_offsets"]
    chains = []
    for c in indices:
        begin, end = int(offsets[c]), int(offsets[c + 1])
        full = end - begin
        start = 0
        if full > max_length:
            start = int(chain_rng(seed, c, 7).integers(0, full - max_length + 1))
        window = slice(begin + start, begin + start + min(full, max_length))
        moltype = "rna" if data["is_rna"][c] else "protein"
        chains.append(Chain(c, moltype, data["atoms"][window].astype(np.float64), data["types"][window].copy(),
                            data["segment"][window].copy(), rows[c], start, full))
    return chains


# ---------------------------------------------------------------------------------------------------
# OpenMM: platforms, the frame-only system and minimisation
# ---------------------------------------------------------------------------------------------------

def default_platform():
    names = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
    for name in ("CUDA", "CPU", "Reference"):
        if name in names and openmmflashipa.hasPlatformKernels(name):
            return name
    return "Reference"


def make_context(system, platform_name, precision, integrator=None):
    platform = openmm.Platform.getPlatformByName(platform_name)
    properties = {}
    names = platform.getPropertyNames()
    if "Precision" in names and precision:
        properties["Precision"] = precision
    if "DeterministicForces" in names:
        properties["DeterministicForces"] = "true"
    return openmm.Context(system, integrator or openmm.VerletIntegrator(0.001), platform, properties)


def frame_system(chain, model_path, learned=True, restrained=False):
    """A System of the chain's frame atoms (3 particles per residue); residue i is particles 3i, 3i+1, 3i+2
    and its model chain id is its data-set segment. learned: the FlashIPAForce; restrained: the backbone
    module's ideal frame geometry (bonds, 1-3 distances, links; medians of the training split)."""
    system = openmm.System()
    force = openmmflashipa.FlashIPAForce("" if model_path is None else model_path)
    for i in range(chain.length):
        for mass in FRAME_MASSES[chain.moltype]:
            system.addParticle(mass)
        force.addResidue(3 * i, 3 * i + 1, 3 * i + 2, int(chain.types[i]), int(chain.segments[i]))
    if learned:
        system.addForce(force)
    if restrained:
        backbone.addFrameRestraints(system, [(3 * i, 3 * i + 1, 3 * i + 2) for i in range(chain.length)],
                                    chain.moltype, [int(s) for s in chain.segments])
    return system


# The frame-only minimisations: the learned energy alone (the measurement), the learned energy with
# ideal frame geometry (the backbone-level System the workflows use) and that geometry alone (the control:
# how much of the gain is the bonds' doing).
FRAME_VARIANTS = (("learned", True, False), ("restrained", True, True), ("geometry", False, True))


def rms_force(context):
    forces = context.getState(getForces=True).getForces(asNumpy=True).value_in_unit(
        unit.kilojoule_per_mole / unit.nanometer)
    return float(np.sqrt(np.mean(np.asarray(forces) ** 2)))


def minimise(context, positions, tolerance, max_iterations, parameters=None):
    """Set positions [N, 3] nm and global parameters, minimise. Returns (final positions [N, 3], details:
    final energy kJ/mol, RMS force component before and after (kJ/mol/nm), seconds).

    No MinimizationReporter: with a Python reporter, OpenMM's wrapper keeps the GIL during minimize() and
    the plugin's LibTorch backward pass then fails ("autograd engine was called while holding the GIL")."""
    context.setPositions(positions)
    for name, value in (parameters or {}).items():
        context.setParameter(name, value)
    details = {"rms_force_start": rms_force(context)}
    started = time.time()
    openmm.LocalEnergyMinimizer.minimize(context, tolerance, max_iterations)
    details["seconds"] = time.time() - started
    state = context.getState(getPositions=True, getEnergy=True, getForces=True)
    final = np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64)
    forces = np.asarray(state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))
    details.update(energy=state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
                   rms_force_end=float(np.sqrt(np.mean(forces ** 2))))
    return final, details


# ---------------------------------------------------------------------------------------------------
# The all-atom protein chain from its source file (amber14 comparison)
# ---------------------------------------------------------------------------------------------------

STANDARD_AMINO_ACIDS = frozenset(build_dataset.AMINO_ACIDS)


def read_file_residues(path):
    """Residues of the first model's first chain in file order, as the data set reads them:
    list of (name, sequence number, {atom: position in nm}, {atom: element symbol})."""
    import gemmi
    structure = gemmi.read_structure(path)
    residues = []
    if len(structure) == 0 or len(structure[0]) == 0:
        return residues
    for residue in structure[0][0].first_conformer():
        atoms = build_dataset.pick_atoms(residue, False)
        elements = {}
        for atom in residue:
            elements.setdefault(atom.name, atom.element.name)
        residues.append((residue.name.strip().upper(), residue.seqid.num,
                         {name: np.array(pos) / 10.0 for name, pos in atoms.items()}, elements))
    return residues


def match_residues(chain, residues):
    """For each residue of the chain window, the index of the file residue with the same N, CA, C (or -1)."""
    candidates = [j for j, r in enumerate(residues) if all(n in r[2] for n in ("N", "CA", "C"))]
    if not candidates:
        return np.full(chain.length, -1)
    frames = np.array([[residues[j][2][n] for n in ("N", "CA", "C")] for j in candidates])  # [M, 3, 3]
    match = np.full(chain.length, -1)
    for i in range(chain.length):
        deviation = np.abs(frames - chain.atoms[i]).max(axis=(1, 2))
        best = int(np.argmin(deviation))
        if deviation[best] < MATCH_TOLERANCE:
            match[i] = candidates[best]
    return match


def carboxylate_oxygen(atoms):
    """OXT placed as the mirror image of O through the CA-C axis (planar carboxylate)."""
    axis = atoms["C"] - atoms["CA"]
    axis = axis / np.linalg.norm(axis)
    v = atoms["O"] - atoms["C"]
    along = (v @ axis) * axis
    return atoms["C"] + along - (v - along)


def allatom_segments(residues, first, last):
    """Runs of consecutive standard residues (file indices first..last) with N, CA, C, split where the
    data set splits (C(i)-N(i+1) > 0.2 nm) or a residue was left out; runs shorter than 3 are dropped."""
    segments, current, previous = [], [], None
    for j in range(first, last + 1):
        name, _, atoms, _ = residues[j]
        usable = name in STANDARD_AMINO_ACIDS and all(n in atoms for n in ("N", "CA", "C"))
        joined = (usable and previous == j - 1 and current
                  and np.linalg.norm(residues[j - 1][2]["C"] - atoms["N"]) * 10.0 <= build_dataset.PROTEIN_BREAK_A)
        if current and not joined:
            segments.append(current)
            current = []
        if usable:
            current.append(j)
            previous = j
    if current:
        segments.append(current)
    return [s for s in segments if len(s) >= build_dataset.MIN_SEGMENT]


def allatom_topology(residues, segments):
    """(Topology, positions [N, 3] nm) of the segments, one openmm chain each, OXT added at C termini."""
    topology, positions = app.Topology(), []
    for s, segment in enumerate(segments):
        openmm_chain = topology.addChain(id=str(s))
        for k, j in enumerate(segment):
            name, _, atoms, elements = residues[j]
            atoms = dict(atoms)
            if k == len(segment) - 1 and "OXT" not in atoms and "O" in atoms:
                atoms["OXT"] = carboxylate_oxygen(atoms)
                elements["OXT"] = "O"
            residue = topology.addResidue(name, openmm_chain, id=str(j))  # file index: unique (insertion codes)
            for atom_name, position in atoms.items():
                topology.addAtom(atom_name, app.element.get_by_symbol(elements[atom_name].capitalize()), residue)
                positions.append(position)
    topology.createStandardBonds()
    positions = np.array(positions)
    topology.createDisulfideBonds(positions * unit.nanometer)
    return topology, positions


class AllAtomChain:
    """The protein chain's all-atom model with hydrogens: topology, native positions, and for the common
    residues (in both the frame-only window and this model) their frame index and atom indices."""

    def __init__(self, topology, positions, common, backbone, system):
        self.topology = topology
        self.system = system          # amber14 + implicit solvent alone
        self.positions = positions    # [N, 3] nm
        self.common = common          # [K] indices into the chain window
        self.backbone = backbone      # [K, 3] atom indices of N, CA, C


def build_allatom(chain, data_dir, forcefield, options):
    """The AllAtomChain of a protein chain, or (None, reason) when it cannot be built or templated."""
    path = os.path.join(data_dir, chain.row["file"])
    if not os.path.exists(path):
        return None, "source file missing"
    residues = read_file_residues(path)
    match = match_residues(chain, residues)
    if (match < 0).all():
        return None, "no residue of the data set found in the source file"
    segments = allatom_segments(residues, int(match[match >= 0].min()), int(match[match >= 0].max()))
    if not segments:
        return None, "no run of >= 3 standard residues"
    topology, positions = allatom_topology(residues, segments)
    try:
        modeller = app.Modeller(topology, positions * unit.nanometer)
        modeller.addHydrogens(forcefield)
        system = amber_system(modeller.topology, forcefield, options)
    except Exception as error:  # template failures: missing heavy atoms, unusual names, ...
        return None, str(error).strip().splitlines()[0][:200]
    flat = {}
    for residue in modeller.topology.residues():
        flat[(residue.chain.id, residue.id)] = {a.name: a.index for a in residue.atoms()}
    file_to_key = {j: (str(s), str(j)) for s, seg in enumerate(segments) for j in seg}
    common, backbone = [], []
    for i, j in enumerate(match):
        key = file_to_key.get(int(j))
        if key is not None and key in flat:
            common.append(i)
            backbone.append([flat[key][n] for n in ("N", "CA", "C")])
    if not common:
        return None, "no common residues"
    native = np.asarray(modeller.positions.value_in_unit(unit.nanometer), dtype=np.float64)
    return AllAtomChain(modeller.topology, native, np.array(common), np.array(backbone), system), None


def amber_system(topology, forcefield, options, hybrid=False, model_path=None):
    """amber14 + implicit solvent (no constraints; NoCutoff, or CutoffNonPeriodic with options.amber_cutoff),
    with OBC2's CustomGBForce replaced by the equivalent native GBSAOBCForce unless options.gb_kernel is
    "custom"; with hybrid, plus the FlashIPAForce of openmmflashipa.createForce (one model chain per openmm
    chain, i.e. per segment)."""
    cutoff = options.amber_cutoff
    method = app.CutoffNonPeriodic if cutoff else app.NoCutoff
    extra = {"nonbondedCutoff": cutoff * unit.nanometer} if cutoff else {}
    system = forcefield.createSystem(topology, nonbondedMethod=method, constraints=None, **extra)
    if options.implicit == "obc2" and options.gb_kernel == "native":
        replace_custom_obc2(system, cutoff)
    if hybrid:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            force = openmmflashipa.createForce(topology, modelPath=model_path)
        force.setForceGroup(1)
        system.addForce(force)
    return system


def replace_custom_obc2(system, cutoff):
    """Swap amber14's implicit/obc2.xml CustomGBForce (customgbforces.GBSAOBC2Force: per particle charge,
    offset radius or = radius - 0.009 nm, scaled offset radius sr = scale * or; ACE surface term) for
    OpenMM's native GBSAOBCForce (the same OBC2 model, alpha 1, beta 0.8, gamma 4.85, ACE), which the CPU
    platform evaluates several times faster. Energies agree to ~1e-5 relative (checked in the tests)."""
    index = [i for i, f in enumerate(system.getForces()) if isinstance(f, openmm.CustomGBForce)]
    if len(index) != 1:
        raise ValueError("expected one CustomGBForce (amber14 implicit/obc2.xml), found %d" % len(index))
    custom = system.getForce(index[0])
    native = openmm.GBSAOBCForce()
    native.setSoluteDielectric(1.0)
    native.setSolventDielectric(78.5)
    if cutoff:
        native.setNonbondedMethod(openmm.GBSAOBCForce.CutoffNonPeriodic)
        native.setCutoffDistance(cutoff)
    else:
        native.setNonbondedMethod(openmm.GBSAOBCForce.NoCutoff)
    for i in range(custom.getNumParticles()):
        charge, offset_radius, scaled = custom.getParticleParameters(i)
        native.addParticle(charge, offset_radius + 0.009, scaled / offset_radius)
    native.setForceGroup(custom.getForceGroup())
    system.removeForce(index[0])
    system.addForce(native)


# ---------------------------------------------------------------------------------------------------
# 1. Denoising
# ---------------------------------------------------------------------------------------------------

def frame_noise(chain, sigma_index, sigma, seed):
    """Gaussian noise [L, 3, 3] (nm) of the chain's frame atoms for one noise level."""
    return sigma * chain_rng(seed, chain.index, 11, sigma_index).standard_normal(chain.atoms.shape)


def allatom_noise(chain, allatom, noise, sigma_index, sigma, seed):
    """Noise for every atom of the all-atom model; the common N, CA, C atoms get the frame-only noise."""
    result = sigma * chain_rng(seed, chain.index, 12, sigma_index).standard_normal(allatom.positions.shape)
    result[allatom.backbone.reshape(-1)] = noise[allatom.common].reshape(-1, 3)
    return result


def rmsd_entries(prefix, final, native, subset):
    """{prefix: RMSD over all frame atoms} plus {prefix_common: RMSD over the subset rows} when there is a
    subset (the residues shared with the all-atom chain); coordinates shaped [L, 3, 3]."""
    entries = {prefix: kabsch_rmsd(final, native)}
    if subset is not None:
        entries[prefix + "_common"] = kabsch_rmsd(final[subset], native[subset])
    return entries


def denoise_chain(chain, args, forcefield):
    """Every noise level for one chain: learned (frame-only), amber and optionally the hybrid."""
    started = time.time()
    record = dict(chain.describe(), sigmas={})
    contexts = {name: make_context(frame_system(chain, args.model, learned, restrained),
                                   args.frame_platform or args.platform, args.precision)
                for name, learned, restrained in FRAME_VARIANTS if name in args.frame_variants}
    allatom, reason, amber_context, hybrid_context = None, None, None, None
    if chain.moltype == "protein" and not args.no_amber:
        allatom, reason = build_allatom(chain, args.data, forcefield, args)
        if reason:
            record["amber_skipped"] = reason
        if allatom is not None:
            record["amber_atoms"] = int(len(allatom.positions))
            record["common_residues"] = int(len(allatom.common))
            amber_context = make_context(allatom.system, args.platform, args.precision)
            if args.with_hybrid:
                hybrid_context = make_context(amber_system(allatom.topology, forcefield, args, True, args.model),
                                              args.platform, args.precision)
    annealer = None
    if args.annealed_steps:
        annealer = make_context(frame_system(chain, args.model), args.platform, args.precision,
                                AnnealingIntegrator(max(args.sigmas), args.annealed_sigma_min, args.annealed_steps))
    native = chain.atoms
    common = allatom.common if allatom is not None else None
    for k, sigma in enumerate(args.sigmas):
        sigma_ref = args.sigma_ref if args.sigma_ref else sigma
        noise = frame_noise(chain, k, sigma, args.seed)
        start = native + noise
        entry = {"sigma_ref": sigma_ref}
        entry.update(rmsd_entries("before", start, native, common))
        for name, context in contexts.items():
            parameters = {openmmflashipa.FlashIPAForce.Sigma(): sigma_ref} if name != "geometry" else {}
            try:
                final, details = minimise(context, start.reshape(-1, 3), args.tolerance, args.max_iterations,
                                          parameters)
                final = final.reshape(native.shape)
                entry.update(rmsd_entries(name, final, native, common))
                entry.update({name + "_" + key: value for key, value in details.items()})
            except Exception as error:
                entry[name + "_error"] = str(error).strip().splitlines()[0][:200]
        if annealer is not None:
            entry.update(anneal(annealer, start, native, common, sigma))
        if amber_context is not None:
            entry.update(amber_run(amber_context, hybrid_context, allatom, chain, noise, k, sigma, sigma_ref, args))
        record["sigmas"]["%g" % sigma] = entry
    record["seconds"] = time.time() - started
    return record


def anneal(context, start, native, common, sigma):
    """The probability-flow ODE from sigma down (annealing.py), started at the noisy frame atoms."""
    integrator = context.getIntegrator()
    integrator.restart(sigma)
    context.setPositions(start.reshape(-1, 3))
    started = time.time()
    try:
        integrator.step(integrator.numSteps())
        final = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        final = np.asarray(final, dtype=np.float64).reshape(native.shape)
        if not np.all(np.isfinite(final)):
            raise ValueError("non-finite positions")
    except Exception as error:
        return {"annealed_error": str(error).strip().splitlines()[0][:200]}
    out = rmsd_entries("annealed", final, native, common)
    out["annealed_seconds"] = time.time() - started
    return out


def amber_run(amber_context, hybrid_context, allatom, chain, noise, k, sigma, sigma_ref, args):
    """Amber (and hybrid) minimisation from the all-atom native plus noise; backbone RMSDs on common N, CA, C."""
    native = allatom.positions
    start = native + allatom_noise(chain, allatom, noise, k, sigma, args.seed)
    native_backbone = native[allatom.backbone]
    out = {"amber_before": kabsch_rmsd(start[allatom.backbone], native_backbone)}
    runs = [("amber", amber_context, {})]
    if hybrid_context is not None:
        runs.append(("hybrid", hybrid_context, {openmmflashipa.FlashIPAForce.Sigma(): sigma_ref}))
    for name, context, parameters in runs:
        try:
            final, details = minimise(context, start, args.tolerance, args.max_iterations, parameters)
            out[name] = kabsch_rmsd(final[allatom.backbone], native_backbone)
            out.update({name + "_" + k: v for k, v in details.items()})
        except Exception as error:
            out[name + "_error"] = str(error).strip().splitlines()[0][:200]
    return out


def summarise_denoising(records, sigmas):
    """Medians per noise level: the full learned set, and the common set (chains where amber worked)."""
    summary = {}
    for sigma in sigmas:
        key = "%g" % sigma
        entries = [r["sigmas"][key] for r in records]
        learned = [e for e in entries if "learned" in e]
        paired = [e for e in entries if "amber" in e]
        row = {"chains": len(entries), "learned_ok": len(learned),
               "learned_failed": sum(1 for e in entries if "learned_error" in e),
               "before": median(e["before"] for e in learned), "learned": median(e["learned"] for e in learned),
               "learned_improved_fraction": fraction(e["learned"] < e["before"] for e in learned)}
        row["ratio"] = (row["learned"] / row["before"]) if learned and row["before"] else None
        row["learned_median_seconds"] = median(e["learned_seconds"] for e in learned)
        for variant in ("restrained", "geometry", "annealed"):
            done = [e for e in entries if variant in e]
            if done or any(variant + "_error" in e for e in entries):
                row[variant + "_ok"] = len(done)
                row[variant + "_before"] = median(e["before"] for e in done)
                row[variant] = median(e[variant] for e in done)
                row[variant + "_ratio"] = (row[variant] / row[variant + "_before"]) if done else None
        row["learned_median_rms_force_start"] = median(e["learned_rms_force_start"] for e in learned)
        if any("amber_atoms" in r or "amber_skipped" in r for r in records):
            row["paired_chains"] = len(paired)
            row["amber_skipped"] = sum(1 for r in records if "amber_skipped" in r)
            row["amber_failed"] = sum(1 for e in entries if "amber_error" in e)
            row["paired_before"] = median(e["before_common"] for e in paired)
            row["paired_learned"] = median(e["learned_common"] for e in paired if "learned_common" in e)
            row["paired_annealed"] = median(e["annealed_common"] for e in paired if "annealed_common" in e)
            row["paired_amber_before"] = median(e["amber_before"] for e in paired)
            row["paired_amber"] = median(e["amber"] for e in paired)
            row["amber_median_seconds"] = median(e["amber_seconds"] for e in paired) if paired else None
            if any("hybrid" in e for e in paired):
                row["paired_hybrid"] = median(e.get("hybrid") for e in paired)
        summary[key] = row
    return summary


def run_denoising(chains_by_type, args):
    forcefield = app.ForceField("amber14-all.xml", "implicit/%s.xml" % args.implicit)
    results = {}
    for moltype, chains in chains_by_type.items():
        records = []
        for n, chain in enumerate(chains):
            record = denoise_chain(chain, args, forcefield)
            records.append(record)
            log("[denoise %s %d/%d] %s L=%d %s(%.1f s)" % (moltype, n + 1, len(chains), chain.name, chain.length,
                                                           progress_text(record), record["seconds"]))
        results[moltype] = {"chains": records, "summary": summarise_denoising(records, args.sigmas),
                            "amber_skipped": {r["name"]: r["amber_skipped"] for r in records
                                              if r.get("amber_skipped")}}
    return results


def progress_text(record):
    parts = []
    for key, e in record["sigmas"].items():
        text = "s=%s %.3f->%s" % (key, e["before"], ("%.3f" % e["learned"]) if "learned" in e else "fail (%s)" % e.get("learned_error", "?"))
        if "amber" in e:
            text += " amber->%.3f" % e["amber"]
        if "hybrid" in e:
            text += " hybrid->%.3f" % e["hybrid"]
        parts.append(text)
    if record.get("amber_skipped"):
        parts.append("amber skipped: %s" % record["amber_skipped"][:60])
    return "; ".join(parts) + " "


# ---------------------------------------------------------------------------------------------------
# 2. Score (denoising score-matching loss, as the trainer's validation)
# ---------------------------------------------------------------------------------------------------

def centred(x):
    return x - x.reshape(-1, 3).mean(0)


def score_samples(chain, sigmas, crop, rng):
    """Noised crops of one chain for the given sigmas: (x~ [K, Lc, 3, 3], eps, types, segments)."""
    length = min(chain.length, crop)
    xs, epss = [], []
    starts = rng.integers(0, chain.length - length + 1, size=len(sigmas))
    for start, sigma in zip(starts, sigmas):
        x = centred(chain.atoms[start:start + length]) @ random_rotation(rng).T
        eps = centred(rng.standard_normal(x.shape))
        xs.append(x + sigma * eps)
        epss.append(eps)
    types = np.stack([chain.types[s:s + length] for s in starts])
    segments = np.stack([chain.segments[s:s + length] for s in starts])
    return np.stack(xs), np.stack(epss), types, segments


def residual_sums(model, noised, eps, types, segments, sigmas):
    """Per sample sum of (sigma dE/dx~ - eps)^2 over coordinates (Trainer.cpp residualSums)."""
    dtype = next(model.parameters()).dtype
    x = torch.tensor(noised, dtype=dtype).requires_grad_(True)
    sigma = torch.tensor(sigmas, dtype=dtype)
    with torch.enable_grad():
        e = model(x, torch.tensor(types), torch.tensor(segments), sigma, checked=False)
        (gradient,) = torch.autograd.grad(e.sum(), x)
    residual = sigma.view(-1, 1, 1, 1) * gradient - torch.tensor(eps, dtype=dtype)
    return residual.double().pow(2).sum((1, 2, 3)).numpy()


def band_of(sigma):
    return int(np.searchsorted(BAND_EDGES, sigma, side="right"))


def run_score(model, chains_by_type, args):
    """Band losses per type, normalised per coordinate, against the zero predictor."""
    config = model.config
    results = {}
    for moltype, chains in chains_by_type.items():
        rng = chain_rng(args.seed, 21, MOLTYPES.index(moltype))
        total = len(chains) * args.score_samples
        u = (np.arange(total) + rng.random(total)) / max(total, 1)
        sigmas = np.exp(math.log(config.sigmaMin) + u * (math.log(config.sigmaMax) - math.log(config.sigmaMin)))
        sigmas = rng.permutation(sigmas).reshape(len(chains), args.score_samples) if total else sigmas
        sums = np.zeros((len(BAND_NAMES), 3))  # loss sum, baseline sum, coordinate count
        samples = np.zeros(len(BAND_NAMES), dtype=int)
        for chain, chain_sigmas in zip(chains, sigmas):
            noised, eps, types, segments = score_samples(chain, chain_sigmas, args.crop, rng)
            losses = residual_sums(model, noised, eps, types, segments, chain_sigmas)
            for sigma, loss, e in zip(chain_sigmas, losses, eps):
                band = band_of(sigma)
                sums[band] += (loss, float((e ** 2).sum()), e.size)
                samples[band] += 1
        results[moltype] = score_summary(sums, samples)
        log("[score %s] loss %s vs zero predictor %s" % (moltype, fmt(results[moltype]["all"]["loss"]),
                                                         fmt(results[moltype]["all"]["baseline"])))
    return results


def score_summary(sums, samples):
    """Per band and overall: samples, loss and zero-predictor baseline per coordinate, and their ratio."""
    def entry(loss, baseline, count, n):
        if not count:
            return {"samples": int(n), "loss": None, "baseline": None, "ratio": None}
        return {"samples": int(n), "loss": float(loss / count), "baseline": float(baseline / count),
                "ratio": float(loss / baseline) if baseline else None}

    bands = {name: entry(sums[b, 0], sums[b, 1], sums[b, 2], samples[b]) for b, name in enumerate(BAND_NAMES)}
    return {"bands": bands, "all": entry(sums[:, 0].sum(), sums[:, 1].sum(), sums[:, 2].sum(), samples.sum())}


# ---------------------------------------------------------------------------------------------------
# 3. Energy vs RMSD, decoys
# ---------------------------------------------------------------------------------------------------

def twin_energies(model, atoms, types, segments, sigma):
    """E in kT for a batch of structures of one length: atoms [B, L, 3, 3], types/segments [B, L] or [L]."""
    dtype = next(model.parameters()).dtype
    atoms = np.asarray(atoms)
    batch = atoms.shape[0]
    types = np.broadcast_to(types, (batch, atoms.shape[1]))
    segments = np.broadcast_to(segments, (batch, atoms.shape[1]))
    with torch.no_grad():
        e = model(torch.tensor(atoms, dtype=dtype), torch.tensor(np.ascontiguousarray(types)),
                  torch.tensor(np.ascontiguousarray(segments)), float(sigma), checked=False)
    return e.double().numpy()


def perturbed_copies(chain, copies, max_sigma, seed):
    """(copies [C, L, 3, 3], noise sigmas [C]); copy 0 is the native."""
    sigmas = np.linspace(0.0, max_sigma, copies)
    noise = chain_rng(seed, chain.index, 31).standard_normal((copies,) + chain.atoms.shape)
    return chain.atoms[None] + sigmas[:, None, None, None] * noise, sigmas


def reversed_chain(atoms, types, segments):
    """Chain direction reversed: residue order reversed and the a and c frame atoms swapped (N <-> C)."""
    return atoms[::-1][:, ::-1].copy(), types[::-1].copy(), (segments.max() - segments)[::-1].copy()


def threaded_pair(chain, donor, rng):
    """(native atoms, types, segments, donor atoms, donor segments) on a common length."""
    length = min(chain.length, donor.length)
    start = int(rng.integers(0, donor.length - length + 1))
    return (chain.atoms[:length], chain.types[:length], chain.segments[:length],
            donor.atoms[start:start + length], donor.segments[start:start + length])


def pick_donor(chain, chains):
    """Another chain of the list, preferring the next one (cyclically) at least as long."""
    others = [c for c in chains if c.index != chain.index]
    if not others:
        return None
    position = [c.index for c in chains].index(chain.index)
    ordered = chains[position + 1:] + chains[:position]
    for candidate in ordered:
        if candidate.length >= chain.length:
            return candidate
    return max(others, key=lambda c: c.length)


def energy_chain(model, chain, chains, args):
    """Perturbed-copy energies and RMSDs, and decoy energies, for one chain."""
    sigma = args.energy_sigma
    copies, copy_sigmas = perturbed_copies(chain, args.copies, args.max_copy_sigma, args.seed)
    energies = twin_energies(model, copies, chain.types, chain.segments, sigma)
    rmsds = np.array([kabsch_rmsd(c, chain.atoms) for c in copies])
    record = dict(chain.describe(), copy_sigma=copy_sigmas.tolist(), energy=energies.tolist(), rmsd=rmsds.tolist(),
                  spearman=spearman(energies, rmsds), decoys={})
    native = energies[0]
    rng = chain_rng(args.seed, chain.index, 41)
    shuffled = np.stack([rng.permutation(chain.types) for _ in range(args.shuffles)])
    same_coordinates = np.repeat(chain.atoms[None], args.shuffles, 0)
    shuffled_energies = twin_energies(model, same_coordinates, shuffled, chain.segments, sigma)
    record["decoys"]["shuffled"] = decoy_entry(native, shuffled_energies, chain.length)
    if chain.moltype == "protein":
        atoms, types, segments = reversed_chain(chain.atoms, chain.types, chain.segments)
        record["decoys"]["reversed"] = decoy_entry(native, twin_energies(model, atoms[None], types, segments, sigma),
                                                   chain.length)
    mirror = chain.atoms * np.array([-1.0, 1.0, 1.0])
    record["decoys"]["mirror"] = decoy_entry(native, twin_energies(model, mirror[None], chain.types, chain.segments,
                                                                   sigma), chain.length)
    record["decoys"]["mirror"]["rmsd"] = kabsch_rmsd(mirror, chain.atoms)
    donor = pick_donor(chain, chains)
    if donor is not None:
        own, types, segments, donor_atoms, donor_segments = threaded_pair(chain, donor, rng)
        pair = np.concatenate([twin_energies(model, own[None], types, segments, sigma),
                               twin_energies(model, donor_atoms[None], types, donor_segments, sigma)])
        record["decoys"]["threaded"] = decoy_entry(pair[0], pair[1:], len(types))
        record["decoys"]["threaded"]["donor"] = donor.name
    return record


def decoy_entry(native, decoys, length):
    decoys = np.asarray(decoys, dtype=np.float64).reshape(-1)
    return {"native_energy": float(native), "decoy_energies": decoys.tolist(),
            "native_lower_fraction": float(np.mean(native < decoys)),
            "delta_per_residue": float(np.mean(decoys - native) / length)}


def summarise_energy(records):
    pooled_delta, pooled_rmsd = [], []
    for r in records:
        e = np.asarray(r["energy"])
        pooled_delta.extend(((e - e[0]) / r["length"]).tolist())
        pooled_rmsd.extend(r["rmsd"])
    summary = {"chains": len(records),
               "median_spearman": median(r["spearman"] for r in records),
               "positive_spearman_fraction": fraction(r["spearman"] > 0 for r in records
                                                      if np.isfinite(r["spearman"])),
               "pooled_spearman": spearman(pooled_delta, pooled_rmsd) if records else None, "decoys": {}}
    kinds = sorted({k for r in records for k in r["decoys"]})
    for kind in kinds:
        entries = [r["decoys"][kind] for r in records if kind in r["decoys"]]
        summary["decoys"][kind] = {
            "chains": len(entries),
            "native_lower_fraction": fraction(f for e in entries for f in
                                              (np.asarray(e["decoy_energies"]) > e["native_energy"])),
            "native_lowest_chain_fraction": fraction(e["native_lower_fraction"] == 1.0 for e in entries),
            "median_delta_per_residue": median(e["delta_per_residue"] for e in entries)}
        if kind == "mirror":
            summary["decoys"][kind]["median_rmsd"] = median(e["rmsd"] for e in entries)
    return summary


def run_energy(model, chains_by_type, args):
    results = {}
    for moltype, chains in chains_by_type.items():
        records = []
        for n, chain in enumerate(chains):
            records.append(energy_chain(model, chain, chains, args))
            log("[energy %s %d/%d] %s L=%d spearman %s" % (moltype, n + 1, len(chains), chain.name, chain.length,
                                                          fmt(records[-1]["spearman"])))
        results[moltype] = {"chains": records, "summary": summarise_energy(records)}
    return results


# ---------------------------------------------------------------------------------------------------
# Report: Markdown, JSON, plots
# ---------------------------------------------------------------------------------------------------

def fmt(value, digits=3):
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return "%.*f" % (digits, value)


def denoising_tables(denoising, sigmas):
    lines = ["### 1. Denoising: median backbone RMSD to native (nm), before -> after minimisation", "",
             "learned = FlashIPAForce alone on the frame atoms (all chains; RMSD over all frame atoms); paired = "
             "the chains where amber14 worked, RMSD over the same N, CA, C atoms for every column; improved = "
             "fraction of chains whose RMSD went down; s/min = median seconds per minimisation (learned / amber).", "",
             "| type | sigma | chains (ok/failed) | before | learned | after/before | improved | s/min | "
             "paired chains | paired before | paired learned | paired annealed | paired amber | paired hybrid |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for moltype, result in denoising.items():
        for sigma in sigmas:
            row = result["summary"]["%g" % sigma]
            paired = [str(row.get("paired_chains", "-"))] + [fmt(row.get(k)) if k in row else "-" for k in
                                                             ("paired_before", "paired_learned", "paired_annealed",
                                                              "paired_amber", "paired_hybrid")]
            iterations = "%s / %s" % (fmt(row["learned_median_seconds"], 2),
                                      fmt(row.get("amber_median_seconds"), 1) if "paired_amber" in row else "-")
            lines.append("| %s | %g | %d/%d | %s | %s | %s | %s | %s | %s |" % (
                moltype, sigma, row["learned_ok"], row["learned_failed"], fmt(row["before"]), fmt(row["learned"]),
                fmt(row["ratio"], 2), fmt(row["learned_improved_fraction"], 2), iterations, " | ".join(paired)))
    lines += variant_table(denoising, sigmas, ("annealed",),
                           "Annealed denoising (all chains that finished): the probability-flow ODE of the learned "
                           "score in OpenMM (AnnealingIntegrator: Heun steps, flashipaSigma from the noise sigma down, "
                           "then Tweedie's step), frame atoms only, learned energy only.")
    lines += variant_table(denoising, sigmas, ("restrained", "geometry"),
                           "Frame-only variants (all chains that finished): restrained = learned energy + ideal frame "
                           "geometry (bonds, 1-3 distances, peptide / C4'-C4' links; training-split medians); "
                           "geometry = those restraints alone, the control.")
    for moltype, result in denoising.items():
        names = result["amber_skipped"]
        if names:
            lines += ["", "amber skipped for %d of %d %s chains: %s" % (
                len(names), len(result["chains"]), moltype,
                "; ".join("%s (%s)" % (k, v[:70]) for k, v in sorted(names.items())))]
    return lines


def variant_table(denoising, sigmas, variants, caption):
    """Lines of a table with chains ok, RMSD before, after and after/before per frame-only variant (nothing if
    none of the variants ran)."""
    if not any(v + "_ok" in result["summary"]["%g" % sigma] for result in denoising.values() for sigma in sigmas
               for v in variants):
        return []
    header = "| type | sigma | " + " | ".join("%s ok | before | %s | after/before" % (v, v) for v in variants) + " |"
    lines = ["", caption, "", header, "|---|---|" + "---|---|---|---|" * len(variants)]
    for moltype, result in denoising.items():
        for sigma in sigmas:
            row = result["summary"]["%g" % sigma]
            cells = []
            for v in variants:
                cells += [str(row.get(v + "_ok", "-")), fmt(row.get(v + "_before")), fmt(row.get(v)),
                          fmt(row.get(v + "_ratio"), 2)]
            lines.append("| %s | %g | %s |" % (moltype, sigma, " | ".join(cells)))
    return lines


def target_lines(denoising, targets):
    lines = ["", "**Target** (median RMSD after <= 0.5 x before at sigma = %g nm, learned energy alone):"
             % TARGET_SIGMA]
    for moltype in denoising:
        t = targets.get(moltype)
        if t is None:
            lines.append("- %s: not evaluated (sigma %g not among --sigmas)" % (moltype, TARGET_SIGMA))
        else:
            if not t.get("ran", True):
                lines.append("- %s: learned-only minimisation not run here (--frame-variants)" % moltype)
            else:
                lines.append("- %s: before %s, after %s, ratio %s, %d/%d chains finished -> **%s**" % (
                    moltype, fmt(t["before"]), fmt(t["after"]), fmt(t["ratio"], 2), t["finished"], t["chains"],
                    "met" if t["met"] and t["finished"] == t["chains"] else "NOT met"))
            a = t.get("annealed")
            if a:
                lines.append("  - annealed (probability-flow ODE, not a minimisation): before %s, after %s, ratio %s, "
                             "%d/%d finished -> %s" % (fmt(a["before"]), fmt(a["after"]), fmt(a["ratio"], 2),
                                                       a["finished"], t["chains"],
                                                       "halved" if a["met"] and a["finished"] == t["chains"]
                                                       else "not halved"))
            r = t.get("restrained")
            if r:
                lines.append("  - with ideal frame geometry: before %s, after %s, ratio %s, %d/%d finished -> "
                             "**%s** (geometry alone: ratio %s)" % (
                                 fmt(r["before"]), fmt(r["after"]), fmt(r["ratio"], 2), r["finished"], t["chains"],
                                 "met" if r["met"] and r["finished"] == t["chains"] else "NOT met",
                                 fmt(r["control_ratio"], 2)))
    return lines


def score_table(score):
    lines = ["", "### 2. Score: denoising loss per coordinate, mean (sigma dE/dx~ - eps)^2 (zero predictor in "
             "parentheses)", "", "| type | " + " | ".join("sigma " + b for b in BAND_NAMES) + " | all |",
             "|---|" + "---|" * (len(BAND_NAMES) + 1)]
    for moltype, result in score.items():
        cells = ["%s (%s) n=%d" % (fmt(result["bands"][b]["loss"]), fmt(result["bands"][b]["baseline"]),
                                    result["bands"][b]["samples"]) for b in BAND_NAMES]
        cells.append("%s (%s) n=%d" % (fmt(result["all"]["loss"]), fmt(result["all"]["baseline"]),
                                       result["all"]["samples"]))
        lines.append("| %s | %s |" % (moltype, " | ".join(cells)))
    return lines


def energy_table(energy, sigma):
    lines = ["", "### 3. Energy vs RMSD (E at sigma = %g nm)" % sigma, "",
             "| type | chains | median Spearman | Spearman > 0 | pooled Spearman | native < shuffled | "
             "native < reversed | native < threaded | native < mirror |", "|---|---|---|---|---|---|---|---|---|"]
    for moltype, result in energy.items():
        s = result["summary"]
        decoys = [fmt(s["decoys"][k]["native_lower_fraction"], 2) if k in s["decoys"] else "-"
                  for k in ("shuffled", "reversed", "threaded", "mirror")]
        lines.append("| %s | %d | %s | %s | %s | %s |" % (moltype, s["chains"], fmt(s["median_spearman"]),
                                                         fmt(s["positive_spearman_fraction"], 2),
                                                         fmt(s["pooled_spearman"]), " | ".join(decoys)))
    return lines


def check_targets(denoising):
    targets = {}
    for moltype, result in denoising.items():
        row = result["summary"].get("%g" % TARGET_SIGMA)
        if row is None:
            continue
        finished = row["learned"] is not None and row["before"] is not None
        targets[moltype] = {"before": row["before"], "after": row["learned"], "ratio": row["ratio"],
                            "met": finished and bool(row["learned"] <= 0.5 * row["before"]),
                            "finished": row["learned_ok"], "chains": row["chains"],
                            "ran": row["learned_ok"] + row["learned_failed"] > 0}
        for variant in ("annealed", "restrained"):
            if row.get(variant) is not None:
                targets[moltype][variant] = {
                    "before": row[variant + "_before"], "after": row[variant], "ratio": row[variant + "_ratio"],
                    "met": bool(row[variant] <= 0.5 * row[variant + "_before"]), "finished": row[variant + "_ok"]}
        if "restrained" in targets[moltype]:
            targets[moltype]["restrained"]["control_ratio"] = row.get("geometry_ratio")
    return targets


def markdown_report(report, args):
    lines = ["## FlashIPA model evaluation (validation split)", "",
             "model `%s` (sha256 %s..., training: %s); platform %s; seed %d; %s" % (
                 report["model"]["path"], report["model"]["sha256"][:12], report["model"]["training"],
                 report["config"]["platform"], args.seed,
                 ", ".join("%d %s chains" % (len(v), k) for k, v in report["chains"].items())), ""]
    if "denoising" in report:
        lines += denoising_tables(report["denoising"], args.sigmas)
        lines += target_lines(report["denoising"], report["targets"])
    if "score" in report:
        lines += score_table(report["score"])
    if "energy" in report:
        lines += energy_table(report["energy"], args.energy_sigma)
    lines += ["", "wall time %.1f s (%s)" % (report["timing"]["total"], ", ".join(
        "%s %.1f s" % (k, v) for k, v in report["timing"].items() if k != "total"))]
    return "\n".join(lines) + "\n"


def json_safe(value):
    """NaN/inf -> None, numpy scalars -> Python numbers, recursively."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def plot_denoising(denoising, sigmas, path, plt):
    types = list(denoising)
    figure, axes = plt.subplots(len(types), len(sigmas), figsize=(4 * len(sigmas), 4 * len(types)), squeeze=False)
    for row, moltype in enumerate(types):
        for col, sigma in enumerate(sigmas):
            ax = axes[row][col]
            entries = [r["sigmas"]["%g" % sigma] for r in denoising[moltype]["chains"]]
            pairs = [(e["before"], e["learned"]) for e in entries if "learned" in e]
            amber = [(e["amber_before"], e["amber"]) for e in entries if "amber" in e]
            top = max([v for p in pairs + amber for v in p] + [1e-3]) * 1.05
            ax.plot([0, top], [0, top], "k-", lw=0.8, label="y = x")
            ax.plot([0, top], [0, top / 2], "k--", lw=0.8, label="y = x/2")
            if pairs:
                ax.scatter(*zip(*pairs), s=14, label="learned (frame atoms)")
            if amber:
                ax.scatter(*zip(*amber), s=14, marker="^", label="amber14 (N, CA, C)")
            ax.set(xlim=(0, top), ylim=(0, top), xlabel="RMSD before (nm)", ylabel="RMSD after (nm)",
                   title="%s, sigma %g nm" % (moltype, sigma))
            ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_score(score, path, plt):
    types = list(score)
    figure, axes = plt.subplots(1, len(types), figsize=(5 * len(types), 4), squeeze=False)
    for ax, moltype in zip(axes[0], types):
        bands = score[moltype]["bands"]
        x = np.arange(len(BAND_NAMES))
        loss = [bands[b]["loss"] if bands[b]["loss"] is not None else np.nan for b in BAND_NAMES]
        base = [bands[b]["baseline"] if bands[b]["baseline"] is not None else np.nan for b in BAND_NAMES]
        ax.bar(x - 0.2, loss, 0.4, label="model")
        ax.bar(x + 0.2, base, 0.4, label="zero predictor")
        ax.set_xticks(x, ["sigma " + b for b in BAND_NAMES], fontsize=8)
        ax.set(ylabel="loss per coordinate", title="%s: denoising score loss" % moltype)
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_energy(energy, path, plt, per_type=4):
    types = list(energy)
    figure, axes = plt.subplots(1, len(types), figsize=(5 * len(types), 4), squeeze=False)
    for ax, moltype in zip(axes[0], types):
        for r in energy[moltype]["chains"][:per_type]:
            e = np.asarray(r["energy"])
            ax.plot(r["rmsd"], (e - e[0]) / r["length"], "o", ms=3,
                    label="%s (rho %s)" % (r["name"], fmt(r["spearman"], 2)))
        ax.set(xlabel="RMSD to native (nm)", ylabel="(E - E_native) / L (kT per residue)",
               title="%s: energy vs RMSD" % moltype)
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_plots(report, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    jobs = [("denoising", "rmsd_before_after.png", lambda d, p: plot_denoising(d, args.sigmas, p, plt)),
            ("score", "score_bands.png", lambda d, p: plot_score(d, p, plt)),
            ("energy", "energy_vs_rmsd.png", lambda d, p: plot_energy(d, p, plt))]
    for key, name, plot in jobs:
        if key in report:
            path = os.path.join(args.out, name)
            plot(report[key], path)
            written.append(name)
    return written


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------

def repo_path(path):
    """A path as the report records it: relative to the repository, so no machine's layout is written."""
    return os.path.relpath(os.path.abspath(path), ROOT) if isinstance(path, str) and path else path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint (.safetensors); default: the package's default model")
    p.add_argument("--dataset", default=DEFAULT_DATASET, help="data set file (default %(default)s)")
    p.add_argument("--manifest", default=DEFAULT_MANIFEST, help="per-chain manifest matching the data set")
    p.add_argument("--data", default=DEFAULT_DATA, help="source structures for the all-atom chains")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default %(default)s)")
    p.add_argument("--platform", default=None, help="OpenMM platform (default: CUDA if usable, else CPU)")
    p.add_argument("--precision", default="mixed", help="platform Precision where it has one (default mixed)")
    p.add_argument("--max-chains-per-type", type=int, default=40, help="validation chains per type (default 40)")
    p.add_argument("--max-length", type=int, default=300, help="longer chains are cropped to a seeded window")
    p.add_argument("--min-length", type=int, default=10, help="shorter chains are not used (default 10)")
    p.add_argument("--seed", type=int, default=2025)
    p.add_argument("--sections", default="denoise,score,energy", help="comma list of denoise, score, energy")
    g = p.add_argument_group("denoising")
    g.add_argument("--sigmas", type=lambda s: [float(v) for v in s.split(",")], default=[0.05, 0.1, 0.2],
                   help="noise levels, nm per coordinate (default 0.05,0.1,0.2)")
    g.add_argument("--sigma-ref", type=float, default=None,
                   help="flashipaSigma for minimisation (default: each noise sigma)")
    g.add_argument("--tolerance", type=float, default=1.0, help="minimiser tolerance, kJ/mol/nm (default 1)")
    g.add_argument("--max-iterations", type=int, default=500, help="minimiser iterations (default 500)")
    g.add_argument("--implicit", choices=("obc2", "gbn2"), default="obc2", help="implicit solvent for amber14")
    g.add_argument("--gb-kernel", choices=("native", "custom"), default="native",
                   help="OBC2 as OpenMM's native GBSAOBCForce (default, several times faster on CPU) or as "
                        "amber14's CustomGBForce")
    g.add_argument("--amber-cutoff", type=float, default=0.0,
                   help="nonbonded/GB cutoff for amber, nm (default 0 = NoCutoff)")
    g.add_argument("--no-amber", action="store_true", help="skip the amber14 comparison")
    g.add_argument("--frame-platform", default=None,
                   help="platform for the frame-only minimisations (default: --platform). On CUDA, OpenMM 8.6's "
                        "GPU minimiser segfaults when a force throws mid-minimisation, which the learned energy "
                        "alone does once it squeezes a frame; use CPU there")
    g.add_argument("--frame-variants", type=lambda text: [v for v in text.split(",") if v], default=["learned"],
                   help="frame-only minimisations, comma-separated: learned (the learned energy alone), restrained "
                        "(+ ideal frame geometry), geometry (the restraints alone, a control) (default: learned)")
    g.add_argument("--annealed-steps", type=int, default=10,
                   help="Heun steps of the annealed denoising (probability-flow ODE from the noise sigma down to "
                        "--annealed-sigma-min, then Tweedie's step; 0: skip) (default 10)")
    g.add_argument("--annealed-sigma-min", type=float, default=0.02, help="last sigma of the annealing (nm)")
    g.add_argument("--with-hybrid", action="store_true", help="also minimise amber14 + implicit + FlashIPAForce")
    g = p.add_argument_group("score and energy")
    g.add_argument("--crop", type=int, default=128, help="score-loss crop length (trainer default 128)")
    g.add_argument("--score-samples", type=int, default=8, help="noised crops per chain for the score loss")
    g.add_argument("--twin-dtype", choices=("float32", "float64"), default="float64")
    g.add_argument("--energy-sigma", type=float, default=0.1, help="sigma_ref for energy vs RMSD (nm)")
    g.add_argument("--copies", type=int, default=16, help="perturbed copies per chain (first = native)")
    g.add_argument("--max-copy-sigma", type=float, default=0.5, help="largest copy noise (nm)")
    g.add_argument("--shuffles", type=int, default=4, help="sequence-shuffled decoys per chain")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - {"denoise", "score", "energy"}
    if unknown:
        p.error("unknown section(s): %s" % ", ".join(sorted(unknown)))
    return args


def evaluate(args, chains=None):
    """Run the selected sections; returns the report dict (also written to args.out). chains: optional
    {moltype: [Chain]} to evaluate instead of the seeded sample (tests)."""
    started = time.time()
    args.platform = args.platform or default_platform()
    args.model = os.path.abspath(args.model) if args.model else None
    model_path = args.model or torch_twin.default_model_path()
    model = torch_twin.load_energy_model(model_path, dtype=getattr(torch, args.twin_dtype))
    data = load_dataset(args.dataset)
    rows = read_manifest(args.manifest, data)
    if chains is None:
        chains = {m: select_chains(data, rows, m, args.max_chains_per_type, args.max_length, args.min_length,
                                   args.seed) for m in MOLTYPES}
    chains = {m: c for m, c in chains.items() if c}
    log("evaluating %s on %s: %s" % (repo_path(model_path), args.platform,
                                     ", ".join("%d %s chains" % (len(c), m) for m, c in chains.items())))
    report = {"model": {"path": repo_path(model_path), "sha256": fileSha256(model_path),
                        "training": model.metadata.get("training", "unknown"),
                        "metadata": dict(model.metadata)},
              "dataset": {"path": repo_path(args.dataset), "sha256": fileSha256(args.dataset),
                          "split_sha256": data["metadata"].get("split_sha256")},
              "config": {k: repo_path(v) if k in PATH_OPTIONS else v for k, v in vars(args).items()},
              "versions": {"openmm": openmm.__version__, "torch": torch.__version__, "numpy": np.__version__,
                           "python": sys.version.split()[0]},
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(sys.argv),
              "chains": {m: [c.describe() for c in cs] for m, cs in chains.items()}, "timing": {}}
    if "score" in args.sections:
        t = time.time()
        report["score"] = run_score(model, chains, args)
        report["timing"]["score"] = time.time() - t
    if "energy" in args.sections:
        t = time.time()
        report["energy"] = run_energy(model, chains, args)
        report["timing"]["energy"] = time.time() - t
    if "denoise" in args.sections:
        t = time.time()
        report["denoising"] = run_denoising(chains, args)
        report["targets"] = check_targets(report["denoising"])
        report["timing"]["denoising"] = time.time() - t
    report["timing"]["total"] = time.time() - started
    write_outputs(report, args)
    return report


def write_outputs(report, args):
    os.makedirs(args.out, exist_ok=True)
    text = markdown_report(report, args)
    if not args.no_plots:
        report["plots"] = write_plots(report, args)
    with open(os.path.join(args.out, "report.md"), "w") as handle:
        handle.write(text)
    with open(os.path.join(args.out, "report.json"), "w") as handle:
        json.dump(json_safe(report), handle, indent=1, allow_nan=False)
    report["markdown"] = text


def main(argv=None):
    args = parse_args(argv)
    report = evaluate(args)
    sys.stdout.write(report["markdown"])
    log("wrote %s (report.md, report.json%s)" % (args.out, "".join(", " + p for p in report.get("plots", []))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
