"""A pure-PyTorch twin of the C++ EnergyModel (models/src/EnergyModel.cpp, FlashIPALayer.cpp, FrameBuilder.cpp).

It computes the same function as the plugin, from the same safetensors checkpoint, with ordinary
``torch.nn`` modules and autograd: the baseline "same network in PyTorch" that the CUDA benchmark drives
through ``openmm.PythonForce`` (see :mod:`openmmflashipa.pythonforce`), and an independent check of the
C++ model in the tests.

Main entry points:

- :func:`read_safetensors` -- tensors and metadata of a safetensors file, read with the ``safetensors`` library.
- :func:`load_energy_model` -- build an :class:`EnergyModel` from a checkpoint's metadata and load its
  parameters (names exactly as the C++ ``named_parameters()``).
- :func:`energy` -- E(x, sigma) in kT for frame atoms ``[B, L, 3, 3]`` (nm).
- :func:`energy_and_forces` -- ``U = scale * kT * E`` in kJ/mol and ``-dU/dx`` in kJ/mol/nm, as the force.

Only ``torch``, ``safetensors`` and the Python standard library are used; importing this module needs nothing else.
"""

import json
import math
import os
import re
import struct

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BOLTZMANN_KJ_PER_MOL_K",
    "SafetensorsError",
    "read_safetensors",
    "ModelConfig",
    "FlashIPALayer",
    "EnergyModel",
    "check_frames",
    "build_frames",
    "default_model_path",
    "load_energy_model",
    "energy",
    "energy_and_forces",
]

#: Boltzmann's constant in kJ/mol/K (kT = BOLTZMANN_KJ_PER_MOL_K * T), as FlashIPAPlugin::BoltzmannKJPerMolK.
BOLTZMANN_KJ_PER_MOL_K = 0.0083144626

#: Number of residue types (FlashIPAPlugin::ResidueType::Count).
RESIDUE_TYPE_COUNT = 26
#: First nucleotide type (FlashIPAPlugin::ResidueType::FirstNucleotide): types from here on have RNA frames.
FIRST_NUCLEOTIDE = 21

FORMAT_NAME = "openmm-flashipa-energy-model"
FORMAT_VERSION = "1"

# ---------------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------------

class SafetensorsError(ValueError):
    """A malformed safetensors file (the message names the file and the defect)."""


def _unique_object(pairs):
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise ValueError("duplicate key %r" % duplicate)
    return dict(pairs)


def parse_safetensors(data, name="<bytes>"):
    """Parse an in-memory safetensors file with the format's own library (``safetensors``).

    Returns ``(tensors, metadata)``: a dict name -> CPU tensor (each owning its memory) and a dict of string
    metadata. Nothing in the file is executed; every defect raises :class:`SafetensorsError`, including two
    the library lets through and this project's files never hold: a tensor name given twice in the header
    (the library keeps the last) and a BOOL tensor with a byte other than 0 or 1.
    """
    data = bytes(data)

    def fail(cause):
        raise SafetensorsError("safetensors file '%s': %s" % (name, cause))

    try:
        tensors = safetensors.torch.load(data)
    except Exception as error:  # the library's SafetensorError and its header checks
        fail(str(error))
    # The library has checked the header; read it once more for the metadata and for repeated names.
    (header_size,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + header_size].decode("utf-8"), object_pairs_hook=_unique_object)
    except (UnicodeDecodeError, ValueError) as error:
        fail("invalid JSON header: %s" % error)
    metadata = dict(header.get("__metadata__") or {})
    for key, tensor in tensors.items():
        if tensor.dtype == torch.bool and bool((tensor.view(torch.uint8) > 1).any()):
            fail("tensor '%s' is BOOL but holds a byte other than 0 or 1" % key)
    return tensors, metadata


def read_safetensors(path):
    """Read a safetensors file: ``(tensors, metadata)``; see :func:`parse_safetensors`."""
    path = os.fspath(path)
    with open(path, "rb") as handle:
        data = handle.read()
    return parse_safetensors(data, path)


# ---------------------------------------------------------------------------------------------------
# Model configuration
# ---------------------------------------------------------------------------------------------------

_INT_FIELDS = {  # name -> minimum
    "nodeDim": 1, "headDim": 1, "numHeads": 1, "queryPoints": 1, "valuePoints": 1, "pairRank": 0,
    "pairDim": 1, "relPosFrequencies": 0, "numBlocks": 1, "transitionFactor": 1, "sigmaFeatures": 1,
    "geometryPrior": 0,
}
_OPTIONAL_INT_FIELDS = ("geometryPrior",)  # absent from older checkpoints: read as 0
_FLOAT_FIELDS = ("sigmaMin", "sigmaMax")
_INTEGER = re.compile(r"[+-]?[0-9]+\Z")
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\Z")


class ModelConfig:
    """The architecture of an EnergyModel (FlashIPAPlugin::ModelConfig), read from checkpoint metadata."""

    def __init__(self, **fields):
        defaults = dict(nodeDim=64, headDim=16, numHeads=4, queryPoints=4, valuePoints=8, pairRank=2, pairDim=16,
                        relPosFrequencies=4, numBlocks=2, transitionFactor=2, sigmaFeatures=8,
                        geometryPrior=0, sigmaMin=0.01, sigmaMax=2.0)
        unknown = set(fields) - set(defaults)
        if unknown:
            raise ValueError("model configuration: unknown field(s) %s" % ", ".join(sorted(unknown)))
        defaults.update(fields)
        for key, value in defaults.items():
            setattr(self, key, value)
        self.validate()

    def validate(self):
        for key, minimum in _INT_FIELDS.items():
            if getattr(self, key) < minimum:
                raise ValueError("model configuration: %s = %d must be >= %d" % (key, getattr(self, key), minimum))
        if self.geometryPrior not in (0, 1, 2, 3, 4, 5, 6):
            raise ValueError("model configuration: geometryPrior = %d must be 0, 1, 2, 3, 4, 5 or 6" % self.geometryPrior)
        if not (self.sigmaMin > 0 and self.sigmaMax > self.sigmaMin):
            raise ValueError("model configuration: need 0 < sigmaMin < sigmaMax (nm)")

    @property
    def pairValueDim(self):
        return max(1, self.pairDim // 4) if self.pairRank > 0 else 0

    @property
    def biasRank(self):
        return self.pairRank + 2 * self.relPosFrequencies

    @classmethod
    def from_metadata(cls, metadata):
        fields = {}
        for key in _INT_FIELDS:
            text = metadata.get("config." + key)
            if text is None and key in _OPTIONAL_INT_FIELDS:
                fields[key] = 0
                continue
            if text is None:
                raise ValueError("model configuration: metadata lacks 'config.%s'" % key)
            if not _INTEGER.match(text):
                raise ValueError("model configuration: 'config.%s' = '%s' is not an integer" % (key, text))
            fields[key] = int(text)
        for key in _FLOAT_FIELDS:
            text = metadata.get("config." + key)
            if text is None:
                raise ValueError("model configuration: metadata lacks 'config.%s'" % key)
            if not _NUMBER.match(text):
                raise ValueError("model configuration: 'config.%s' = '%s' is not a number" % (key, text))
            fields[key] = float(text)
        return cls(**fields)

    def __repr__(self):
        items = ", ".join("%s=%r" % (key, getattr(self, key)) for key in list(_INT_FIELDS) + list(_FLOAT_FIELDS))
        return "ModelConfig(%s)" % items


# ---------------------------------------------------------------------------------------------------
# Frames (FrameBuilder.cpp)
# ---------------------------------------------------------------------------------------------------

MIN_BOND_LENGTH = 1e-3  # nm, FrameBuilder::MinBondLength
MIN_SINE = 1e-3  # FrameBuilder::MinSine
_GUARD_EPSILON = 1e-12


def _describe_residue(flat_index, batch_shape):
    if len(batch_shape) >= 2:
        residues = batch_shape[-1]
        return "structure %d, residue %d" % (flat_index // residues, flat_index % residues)
    return "residue %d" % flat_index


def check_frames(atoms):
    """Raise ValueError naming the first residue of atoms ``[..., 3, 3]`` whose frame atoms are not
    finite, coincident or collinear (the same tests and thresholds as FrameBuilder::check)."""
    if atoms.dim() < 2 or atoms.shape[-1] != 3 or atoms.shape[-2] != 3:
        raise ValueError("frame atoms must have shape [..., 3, 3]")
    with torch.no_grad():
        flat = atoms.detach().to(torch.float64).reshape(-1, 3, 3)
        batch_shape = tuple(atoms.shape[:-2])
        a, b, c = flat[:, 0], flat[:, 1], flat[:, 2]
        bc, ba = c - b, a - b
        bond = bc.norm(dim=-1)
        ba_length = ba.norm(dim=-1)
        sine = torch.linalg.cross(bc, ba).norm(dim=-1) / (bond * ba_length + 1e-300)
        not_finite = ~torch.isfinite(flat).all(-1).all(-1)
        coincident = bond < MIN_BOND_LENGTH
        collinear = (ba_length < MIN_BOND_LENGTH) | (sine < MIN_SINE)
        # One host synchronisation for the common (valid) case.
        if not bool((not_finite | coincident | collinear).any()):
            return
        for bad, why in ((not_finite, "have non-finite coordinates"),
                         (coincident, "are coincident (|c - b| below 1e-3 nm): cannot build a frame"),
                         (collinear, "are collinear or coincident (a, b, c on one line): cannot build a frame")):
            index = torch.nonzero(bad)
            if index.numel():
                raise ValueError("frame atoms of %s %s" % (_describe_residue(int(index[0, 0]), batch_shape), why))


def _unit(v, guarded):
    squared = (v * v).sum(-1, keepdim=True)
    if guarded:
        squared = squared + _GUARD_EPSILON
    return v / torch.sqrt(squared)


def build_frames(atoms, checked=True):
    """Gram-Schmidt frames (R [..., 3, 3] with axes as columns, t [..., 3]) from atoms [..., 3 (a, b, c), 3]."""
    if checked:
        check_frames(atoms)
    a, b, c = atoms[..., 0, :], atoms[..., 1, :], atoms[..., 2, :]
    e1 = _unit(c - b, not checked)
    u = a - b
    e2 = _unit(u - (e1 * u).sum(-1, keepdim=True) * e1, not checked)
    e3 = torch.linalg.cross(e1, e2)
    return torch.stack([e1, e2, e3], -1), b


# ---------------------------------------------------------------------------------------------------
# FlashIPA layer (FlashIPALayer.cpp)
# ---------------------------------------------------------------------------------------------------

_POINT_NORM_EPSILON = 1e-8


def _rel_pos_frequency(k):
    return 2.0 * math.pi / (4.0 * math.pow(2.0, k))


class FlashIPALayer(nn.Module):
    """Invariant Point Attention with a factorised pair representation; "math" and "sdpa" backends."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        H, c, cs = config.numHeads, config.headDim, config.nodeDim
        self.headWeights = nn.Parameter(torch.full((H,), math.log(math.e - 1.0)))
        self.relPosWeights = nn.Parameter(torch.zeros(H, max(config.relPosFrequencies, 0)))
        self.linearQ = nn.Linear(cs, H * c)
        self.linearK = nn.Linear(cs, H * c)
        self.linearV = nn.Linear(cs, H * c)
        self.linearQPoints = nn.Linear(cs, H * config.queryPoints * 3)
        self.linearKPoints = nn.Linear(cs, H * config.queryPoints * 3)
        self.linearVPoints = nn.Linear(cs, H * config.valuePoints * 3)
        if config.pairRank > 0:
            self.linearBias = nn.Linear(config.pairDim, H, bias=False)
            self.linearPairDown = nn.Linear(config.pairDim, config.pairValueDim, bias=False)
        else:
            self.linearBias = None
            self.linearPairDown = None
        self.linearOut = nn.Linear(H * (c + 4 * config.valuePoints + config.pairValueDim), cs)
        self.register_buffer("omega", torch.tensor([_rel_pos_frequency(k) for k in range(config.relPosFrequencies)],
                                                   dtype=torch.float64), persistent=False)

    def _project(self, s, z1, z2, rotations, translations, positions, mask):
        cfg = self.config
        B, L = s.shape[0], s.shape[1]
        H, c = cfg.numHeads, cfg.headDim
        p = {}
        p["mask"] = mask if mask is not None else torch.ones(B, L, dtype=torch.bool, device=s.device)
        p["q"] = self.linearQ(s).view(B, L, H, c)
        p["k"] = self.linearK(s).view(B, L, H, c)
        p["v"] = self.linearV(s).view(B, L, H, c)
        # Centre on the mean frame origin of the real residues (the function is unchanged).
        weights = p["mask"].to(s.dtype).unsqueeze(-1)
        centre = (translations * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1.0)
        centred = translations - centre
        p["rotations"], p["centred"] = rotations, centred

        def to_global(local):
            return torch.einsum("blij,blhpj->blhpi", rotations, local) + centred.view(B, L, 1, 1, 3)

        p["qPoints"] = to_global(self.linearQPoints(s).view(B, L, H, cfg.queryPoints, 3))
        p["kPoints"] = to_global(self.linearKPoints(s).view(B, L, H, cfg.queryPoints, 3))
        p["vPoints"] = to_global(self.linearVPoints(s).view(B, L, H, cfg.valuePoints, 3))

        left, right = [], []
        p["pairLeft"] = p["pairRight"] = None
        if cfg.pairRank > 0:
            left.append(self.linearBias(z1).permute(0, 1, 3, 2))  # [B, L, H, r]
            right.append(self.linearBias(z2).permute(0, 1, 3, 2))
            p["pairLeft"] = self.linearPairDown(z1)  # [B, L, r, c_z/4]
            p["pairRight"] = self.linearPairDown(z2)
        if cfg.relPosFrequencies > 0:
            # cos(w (i - j)) = cos(wi) cos(wj) + sin(wi) sin(wj); the position reduced modulo each period
            # 4 * 2^k first, in float32 or wider (FlashIPALayer.cpp)
            wide = positions.to(torch.float64 if positions.dtype == torch.float64 else torch.float32)
            period = 2.0 * math.pi / self.omega.to(wide.dtype)
            angles = torch.remainder(wide.unsqueeze(-1), period.view(1, 1, -1)) * self.omega.to(wide.dtype).view(1, 1, -1)
            trig = torch.cat([torch.cos(angles), torch.sin(angles)], -1).to(s.dtype)  # [B, L, 2K]
            alpha = torch.cat([self.relPosWeights, self.relPosWeights], -1)  # [H, 2K]
            left.append(trig.unsqueeze(2) * alpha.view(1, 1, H, -1))
            right.append(trig.unsqueeze(2).expand(B, L, H, trig.shape[-1]))
        p["biasLeft"] = torch.cat(left, -1) if left else None
        p["biasRight"] = torch.cat(right, -1) if right else None
        p["gamma"] = F.softplus(self.headWeights)
        return p

    def _attend_math(self, p):
        cfg = self.config
        wL, wC = math.sqrt(1.0 / 3.0), math.sqrt(2.0 / (9.0 * cfg.queryPoints))
        logits = torch.einsum("bihc,bjhc->bhij", p["q"], p["k"]) / math.sqrt(cfg.headDim)
        if p["biasLeft"] is not None:
            logits = logits + torch.einsum("bihr,bjhr->bhij", p["biasLeft"], p["biasRight"])
        diff = p["qPoints"].unsqueeze(2) - p["kPoints"].unsqueeze(1)  # [B, L, L, H, P, 3]
        distance2 = diff.pow(2).sum((-1, -2)).permute(0, 3, 1, 2)  # [B, H, L, L]
        logits = wL * (logits - (p["gamma"] * (wC / 2)).view(1, -1, 1, 1) * distance2)
        mask = p["mask"]
        logits = logits.masked_fill(mask.logical_not().view(mask.shape[0], 1, 1, -1), float("-inf"))
        a = torch.softmax(logits, -1)
        scalar = torch.einsum("bhij,bjhc->bihc", a, p["v"])
        points = torch.einsum("bhij,bjhpx->bihpx", a, p["vPoints"])
        pair = torch.einsum("bhij,bjrd->bihrd", a, p["pairRight"]) if p["pairRight"] is not None else None
        return scalar, points, pair

    def _attend_sdpa(self, p, mask):
        cfg = self.config
        B, L = p["q"].shape[0], p["q"].shape[1]
        H, c, Pv = cfg.numHeads, cfg.headDim, cfg.valuePoints
        wL, wC = math.sqrt(1.0 / 3.0), math.sqrt(2.0 / (9.0 * cfg.queryPoints))
        w = (p["gamma"] * (wL * wC)).view(1, 1, H, 1)
        q_norm2 = p["qPoints"].pow(2).sum(-1)  # [B, L, H, Pq]
        k_norm2 = p["kPoints"].pow(2).sum(-1)
        ones = torch.ones_like(q_norm2)
        q_parts = [p["q"], w * p["qPoints"].flatten(3), q_norm2, ones]
        k_parts = [p["k"] * (wL / math.sqrt(c)), p["kPoints"].flatten(3), -0.5 * w * ones, -0.5 * w * k_norm2]
        if p["biasLeft"] is not None:
            q_parts.append(p["biasLeft"])
            k_parts.append(wL * p["biasRight"])
        v_parts = [p["v"], p["vPoints"].flatten(3)]
        if p["pairRight"] is not None:
            v_parts.append(p["pairRight"].flatten(2).unsqueeze(2).expand(B, L, H, -1))
        Q, K, V = torch.cat(q_parts, -1), torch.cat(k_parts, -1), torch.cat(v_parts, -1)
        width = max(Q.shape[-1], V.shape[-1])

        def pad(t):
            return t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1]))

        Q, K, V = pad(Q).transpose(1, 2), pad(K).transpose(1, 2), pad(V).transpose(1, 2)  # [B, H, L, D]
        key_mask = p["mask"].view(B, 1, 1, L) if mask is not None else None
        out = F.scaled_dot_product_attention(Q, K, V, attn_mask=key_mask, dropout_p=0.0, is_causal=False,
                                             scale=1.0).transpose(1, 2)  # [B, L, H, D]
        scalar = out[..., :c]
        points = out[..., c:c + 3 * Pv].reshape(B, L, H, Pv, 3)
        pair = None
        if p["pairRight"] is not None:
            r, dz = cfg.pairRank, cfg.pairValueDim
            pair = out[..., c + 3 * Pv:c + 3 * Pv + r * dz].reshape(B, L, H, r, dz)
        return scalar, points, pair

    def _unlift(self, p, scalar, points_global, pair):
        B, L = scalar.shape[0], scalar.shape[1]
        local = torch.einsum("blji,blhpj->blhpi", p["rotations"], points_global - p["centred"].view(B, L, 1, 1, 3))
        norms = torch.sqrt(local.pow(2).sum(-1) + _POINT_NORM_EPSILON)
        features = [scalar.flatten(2), local.flatten(2), norms.flatten(2)]
        if pair is not None:
            features.append((p["pairLeft"].unsqueeze(2) * pair).sum(3).flatten(2))
        out = self.linearOut(torch.cat(features, -1))
        return out * p["mask"].unsqueeze(-1).to(out.dtype)

    def forward(self, s, z1, z2, rotations, translations, positions, mask=None, backend="sdpa"):
        """The update to the node representation [B, L, c_s]; mask None = all residues real."""
        p = self._project(s, z1, z2, rotations, translations, positions, mask)
        if backend == "math":
            scalar, points, pair = self._attend_math(p)
        elif backend == "sdpa":
            scalar, points, pair = self._attend_sdpa(p, mask)
        elif backend == "fused":
            raise ValueError("the fused attention backend exists only in the C++ plugin; use \"sdpa\" or \"math\"")
        else:
            raise ValueError("unknown attention backend '%s' (expected \"sdpa\" or \"math\")" % backend)
        return self._unlift(p, scalar, points, pair)


# ---------------------------------------------------------------------------------------------------
# Energy model (EnergyModel.cpp)
# ---------------------------------------------------------------------------------------------------

_GEOMETRY_FEATURES = 26
_CHAIN_GAP = 64.0
_PLACEHOLDER_RESIDUE = ((0.0, 0.145, 0.0), (0.0, 0.0, 0.0), (0.153, 0.0, 0.0))


def _squash(v):
    return 2.5 * v / torch.sqrt(1.0 + v.pow(2).sum(-1, keepdim=True))


def sequence_positions(chains):
    """Sequence positions [B, L] (float64): the index plus a gap of 64 at each chain change."""
    changes = (chains[:, 1:] != chains[:, :-1]).to(torch.float64)
    breaks = torch.cat([torch.zeros(chains.shape[0], 1, dtype=torch.float64, device=chains.device),
                        changes.cumsum(1)], 1)
    index = torch.arange(chains.shape[1], dtype=torch.float64, device=chains.device).unsqueeze(0)
    return index + _CHAIN_GAP * breaks


def local_geometry(atoms, rotations, translations, chains, mask):
    """Per-residue SE(3)-invariant features [B, L, 26] (own a and c, chain neighbours' atoms, flags)."""
    B, L = atoms.shape[0], atoms.shape[1]
    origin = translations.unsqueeze(2)

    def in_frame(x):
        return torch.einsum("blji,blnj->blni", rotations, x - origin)

    own = in_frame(atoms)[:, :, [0, 2]]
    same_chain = chains[:, 1:] == chains[:, :-1]
    both_real = mask[:, 1:] & mask[:, :-1]
    linked = (same_chain & both_real).to(atoms.dtype)
    zero_link = torch.zeros(B, 1, dtype=atoms.dtype, device=atoms.device)
    has_prev, has_next = torch.cat([zero_link, linked], 1), torch.cat([linked, zero_link], 1)
    zero_atoms = torch.zeros(B, 1, 3, 3, dtype=atoms.dtype, device=atoms.device)
    prev_atoms = torch.cat([zero_atoms, atoms[:, :-1]], 1)
    next_atoms = torch.cat([atoms[:, 1:], zero_atoms], 1)
    prev = _squash(in_frame(prev_atoms)) * has_prev.view(B, L, 1, 1)
    nxt = _squash(in_frame(next_atoms)) * has_next.view(B, L, 1, 1)
    return torch.cat([_squash(own).flatten(2), prev.flatten(2), nxt.flatten(2),
                      has_prev.unsqueeze(-1), has_next.unsqueeze(-1)], -1)


class EnergyModel(nn.Module):
    """E_theta(x, sigma) in kT (EnergyModelImpl): parameter names match the C++ named_parameters()."""

    def __init__(self, config, priorKinds=0):
        super().__init__()
        config.validate()
        self.config = config
        cs = config.nodeDim
        if config.geometryPrior:
            # The pair table comes from the checkpoint (the C++ GeometryPrior.cpp defines it); NaN until loaded.
            self.geometryPriorPairs = nn.Parameter(torch.full((priorKinds, 4), float("nan")), requires_grad=False)
            self.geometryPriorStats = nn.Parameter(torch.full((priorKinds, 2), float("nan")), requires_grad=False)
        else:
            self.geometryPriorPairs = self.geometryPriorStats = None
        if config.geometryPrior >= 4:
            self.geometryPriorBondCovariance = nn.Parameter(torch.full((3,), float("nan")), requires_grad=False)
        else:
            self.geometryPriorBondCovariance = None
        self.typeEmbedding = nn.Embedding(RESIDUE_TYPE_COUNT, cs)
        self.sigmaEmbedding = nn.Linear(config.sigmaFeatures + 1, cs)
        self.geometryIn = nn.Linear(_GEOMETRY_FEATURES, cs)
        self.geometryHidden = nn.Linear(cs, cs)
        self.inputNorm = nn.LayerNorm(cs)
        if config.pairRank > 0:
            self.pairLeft = nn.Linear(cs, config.pairRank * config.pairDim)
            self.pairRight = nn.Linear(cs, config.pairRank * config.pairDim)
        else:
            self.pairLeft = self.pairRight = None
        self.ipaLayers = nn.ModuleList([FlashIPALayer(config) for _ in range(config.numBlocks)])
        self.ipaNorms = nn.ModuleList([nn.LayerNorm(cs) for _ in range(config.numBlocks)])
        self.transitions = nn.ModuleList([
            nn.Sequential(nn.Linear(cs, config.transitionFactor * cs), nn.SiLU(),
                          nn.Linear(config.transitionFactor * cs, cs))
            for _ in range(config.numBlocks)])
        self.transitionNorms = nn.ModuleList([nn.LayerNorm(cs) for _ in range(config.numBlocks)])
        self.energyHidden = nn.Linear(cs, cs)
        self.energyOut = nn.Linear(cs, 1)
        #: attention backend used when forward() is not told one
        self.backend = "sdpa"

    def forward(self, atoms, types, chains, sigma, mask=None, backend=None, checked=True):
        """Energies [B] in kT.

        atoms [B, L, 3, 3] nm; types, chains [B, L] int64; sigma (nm) a number or a [B] / scalar tensor;
        mask [B, L] bool (True = real residue) or None; backend "sdpa" or "math" (default: self.backend);
        checked: validate on the host (ValueError for degenerate frames, residue types outside [0, 26) or
        sigma <= 0), as the C++ forward(validate=true); or skip every host check and guard degenerate frames
        numerically (False), as forward(validate=false).
        """
        cfg = self.config
        backend = self.backend if backend is None else backend
        if atoms.dim() != 4 or atoms.shape[2] != 3 or atoms.shape[3] != 3:
            raise ValueError("atoms must have shape [B, L, 3, 3]")
        B, L = atoms.shape[0], atoms.shape[1]
        if L == 0:
            raise ValueError("the structure has no residues")
        if tuple(types.shape) != (B, L) or tuple(chains.shape) != (B, L):
            raise ValueError("types and chains must have shape [B, L]")
        if checked and types.numel() > 0 and bool(((types < 0) | (types >= RESIDUE_TYPE_COUNT)).any()):
            raise ValueError("residue types must lie in [0, %d)" % RESIDUE_TYPE_COUNT)
        real = mask.to(torch.bool) if mask is not None else torch.ones(B, L, dtype=torch.bool, device=atoms.device)
        if mask is not None:
            placeholder = torch.tensor(_PLACEHOLDER_RESIDUE, dtype=torch.float64).to(atoms.device, atoms.dtype)
            atoms = torch.where(real.view(B, L, 1, 1), atoms, placeholder)
        if not torch.is_tensor(sigma):
            sigma = torch.tensor(float(sigma), dtype=torch.float64)
        sig = sigma.to(atoms.device, atoms.dtype).reshape(-1).expand(B)
        if checked and not bool((sig > 0).all()):
            raise ValueError("sigma must be positive")

        rotations, translations = build_frames(atoms, checked)

        # Node features.
        u = (torch.log(sig) - math.log(cfg.sigmaMin)) / (math.log(cfg.sigmaMax) - math.log(cfg.sigmaMin))
        parts = [u.unsqueeze(-1)]
        for k in range(cfg.sigmaFeatures):
            angle = u * (math.pi * (k // 2 + 1))
            parts.append((torch.sin(angle) if k % 2 == 0 else torch.cos(angle)).unsqueeze(-1))
        sigma_features = self.sigmaEmbedding(torch.cat(parts, -1)).unsqueeze(1)  # [B, 1, cs]
        geometry = self.geometryHidden(F.silu(self.geometryIn(local_geometry(atoms, rotations, translations,
                                                                              chains, real))))
        s = self.inputNorm(self.typeEmbedding(types) + sigma_features + geometry)

        positions = sequence_positions(chains).to(atoms.dtype)
        z1 = z2 = None
        if cfg.pairRank > 0:
            z1 = self.pairLeft(s).view(B, L, cfg.pairRank, cfg.pairDim)
            z2 = self.pairRight(s).view(B, L, cfg.pairRank, cfg.pairDim)
        layer_mask = real if mask is not None else None
        for ipa, ipa_norm, transition, transition_norm in zip(self.ipaLayers, self.ipaNorms, self.transitions,
                                                              self.transitionNorms):
            s = ipa_norm(s + ipa(s, z1, z2, rotations, translations, positions, layer_mask, backend))
            s = transition_norm(s + transition(s))
        per_residue = self.energyOut(F.silu(self.energyHidden(s))).squeeze(-1) * real.to(s.dtype)  # [B, L]
        energy = per_residue.sum(1) / sig
        if self.geometryPriorStats is not None:
            energy = energy + geometry_prior(atoms, types, chains, real, sig, self.geometryPriorPairs,
                                             self.geometryPriorStats, version=cfg.geometryPrior,
                                             bond_covariance=self.geometryPriorBondCovariance)
        return energy


def chain_weight(sigma, d0, is_rna):
    """Version 2's weight of a bond's term at noise levels sigma (GeometryPrior::chainWeight, docs/MODEL.md):
    the mode-averaged ratio of a harmonic chain's exact score to the sum of its pair marginals, in closed form
    in t = sigma^2 / a with the crossover a = 4 d0^2 / 3 (the same constant as GeometryPrior.cpp)."""
    t = sigma.pow(2) / (4.0 / 3.0 * d0 * d0)
    if is_rna:  # a path of three atoms: Laplacian eigenvalues 1 and 3
        return (1.0 + 2.0 * t) / 10.0 * (1.0 / (1.0 + t) + 9.0 / (1.0 + 3.0 * t))
    s = torch.sqrt(1.0 + 4.0 * t)  # a long chain: lambda = 2 - 2 cos(theta), theta uniform
    return 4.0 / 3.0 * (1.0 + 2.0 * t) * (s + 2.0) / (s * (s + 1.0).pow(2))


def solve_bond_system(bonds, present, diagonal, coupling):
    """(a I + sigma^2 T) y = b by parallel cyclic reduction (GeometryPrior::solveBondSystem): bonds [B, M, 3],
    present [B, M] bool, diagonal [B] = a + 2 sigma^2, coupling [B] = sigma^2 between adjacent present slots."""
    B, M = present.shape
    on = present.to(bonds.dtype)
    diag = on * diagonal.view(-1, 1) + (1.0 - on)
    linked = torch.zeros_like(on)
    linked[:, 1:] = on[:, :-1] * on[:, 1:]
    sub = -coupling.view(-1, 1) * linked
    sup = torch.zeros_like(sub)
    sup[:, :-1] = sub[:, 1:]
    rhs = bonds * on.unsqueeze(-1)

    def before(t, stride, fill):  # t[:, j - stride]
        if stride >= M:
            return torch.full_like(t, fill)
        pad = torch.full_like(t[:, :stride], fill)
        return torch.cat([pad, t[:, :M - stride]], 1)

    def after(t, stride, fill):  # t[:, j + stride]
        if stride >= M:
            return torch.full_like(t, fill)
        pad = torch.full_like(t[:, :stride], fill)
        return torch.cat([t[:, stride:], pad], 1)

    stride = 1
    while stride < M:
        alpha = -sub / before(diag, stride, 1.0)
        gamma = -sup / after(diag, stride, 1.0)
        diag, rhs, sub, sup = (diag + alpha * before(sup, stride, 0.0) + gamma * after(sub, stride, 0.0),
                               rhs + alpha.unsqueeze(-1) * before(rhs, stride, 0.0)
                               + gamma.unsqueeze(-1) * after(rhs, stride, 0.0),
                               alpha * before(sub, stride, 0.0), gamma * after(sup, stride, 0.0))
        stride *= 2
    return rhs / diag.unsqueeze(-1) * on.unsqueeze(-1)


def backbone_bond_slots(types, chains, real):
    """The protein backbone path's bond slots [B, 3L] bool (GeometryPrior::backboneBondSlots): residue i's N-CA,
    CA-C and C(i)-N(i+1), the link only where the next residue is a real protein residue of the same chain id."""
    B, L = types.shape
    protein = real & (types < FIRST_NUCLEOTIDE)
    link = torch.zeros(B, L, dtype=torch.bool, device=types.device)
    link[:, :-1] = protein[:, :-1] & protein[:, 1:] & (chains[:, :-1] == chains[:, 1:])
    return torch.stack([protein, protein, link], 2).reshape(B, 3 * L)


def backbone_chain_energy(atoms, types, chains, real, sigma, pairs, stats):
    """Version 3's chain term [B] (GeometryPrior::backboneChainEnergy, docs/MODEL.md): on each protein chain's
    backbone path N CA C N+1 ..., 1/2 [b^T (a I + sigma^2 T)^-1 b - b^T b / (a + 2 sigma^2)] per coordinate,
    with a the protein bonds' mean d0^2 / 3."""
    B, L = types.shape
    path = atoms.reshape(B, 3 * L, 3)
    bonds = path[:, 1:] - path[:, :-1]
    present = backbone_bond_slots(types, chains, real)[:, :3 * L - 1]
    protein_kinds = [k for k, row in enumerate(pairs.tolist()) if not row[0]]
    a = stats[protein_kinds, 0].pow(2).mean() / 3.0
    sigma2 = sigma.pow(2)
    diagonal = a + 2.0 * sigma2
    y = solve_bond_system(bonds, present, diagonal, sigma2)
    on = present.to(atoms.dtype).unsqueeze(-1)
    return 0.5 * ((y * bonds).sum((1, 2)) - (bonds.pow(2) * on).sum((1, 2)) / diagonal)


# GeometryPrior::CorrelationFadeSigma (nm): version 4's bond correlations fade in with the noise.
CORRELATION_FADE_SIGMA = 0.05


def _inverse3(m):
    """The inverse of each 3 x 3 matrix of m [..., 3, 3] from its cofactors (as GeometryPrior.cpp)."""
    e = lambda i, j: m[..., i, j]
    c = [[e(1, 1) * e(2, 2) - e(1, 2) * e(2, 1), e(1, 2) * e(2, 0) - e(1, 0) * e(2, 2), e(1, 0) * e(2, 1) - e(1, 1) * e(2, 0)],
         [e(0, 2) * e(2, 1) - e(0, 1) * e(2, 2), e(0, 0) * e(2, 2) - e(0, 2) * e(2, 0), e(0, 1) * e(2, 0) - e(0, 0) * e(2, 1)],
         [e(0, 1) * e(1, 2) - e(0, 2) * e(1, 1), e(0, 2) * e(1, 0) - e(0, 0) * e(1, 2), e(0, 0) * e(1, 1) - e(0, 1) * e(1, 0)]]
    det = e(0, 0) * c[0][0] + e(0, 1) * c[0][1] + e(0, 2) * c[0][2]
    adjugate = torch.stack([torch.stack([c[j][i] for j in range(3)], -1) for i in range(3)], -2)
    return adjugate / det[..., None, None]


def solve_block_tridiagonal(diagonal, upper, rhs):
    """K y = r for a symmetric positive definite block-tridiagonal K by block parallel cyclic reduction
    (GeometryPrior::solveBlockTridiagonal): diagonal and upper blocks [B, L, 3, 3] (the last upper block is
    ignored), right-hand sides [B, L, 3, C]."""
    L = diagonal.shape[1]
    eye = torch.eye(3, dtype=diagonal.dtype, device=diagonal.device)

    def shifted(t, stride, before, fill):  # t[:, i - stride] (before) or t[:, i + stride]
        shape = list(t.shape)
        shape[1] = min(stride, L)
        pad = fill.expand(shape)
        if stride >= L:
            return pad.clone()
        return torch.cat([pad, t[:, :L - stride]], 1) if before else torch.cat([t[:, stride:], pad], 1)

    zero = torch.zeros(3, 3, dtype=diagonal.dtype, device=diagonal.device)
    zero_rhs = torch.zeros(3, rhs.shape[-1], dtype=rhs.dtype, device=rhs.device)
    D, U, r = diagonal, upper.clone(), rhs
    U[:, L - 1] = 0.0
    A = shifted(U.transpose(-1, -2), 1, True, zero)
    stride = 1
    while stride < L:
        inverse = _inverse3(D)  # once per level; both neighbours read it shifted
        alpha = -A @ shifted(inverse, stride, True, eye)
        gamma = -U @ shifted(inverse, stride, False, eye)
        D, r, A, U = (D + alpha @ shifted(U, stride, True, zero) + gamma @ shifted(A, stride, False, zero),
                      r + alpha @ shifted(r, stride, True, zero_rhs) + gamma @ shifted(r, stride, False, zero_rhs),
                      alpha @ shifted(A, stride, True, zero), gamma @ shifted(U, stride, False, zero))
        stride *= 2
    return _inverse3(D) @ r


def correlated_chain_energy(atoms, types, chains, real, sigma, covariance):
    """Version 4's chain term [B] (GeometryPrior::correlatedChainEnergy, docs/MODEL.md): on each protein
    chain's backbone path, 1/2 [b^T (C_g + sigma^2 T)^-1 b - b^T b / (c0 + 2 sigma^2)] per coordinate, C_g the
    banded bond covariance (c0, g c1, g c2) from covariance = (c0, c1, c2), zero across chain breaks, with
    g = sigma^2 / (sigma^2 + CORRELATION_FADE_SIGMA^2)."""
    B, L = types.shape
    path = atoms.reshape(B, 3 * L, 3)
    bonds = torch.cat([path[:, 1:] - path[:, :-1], torch.zeros_like(path[:, :1])], 1)
    on = backbone_bond_slots(types, chains, real).to(atoms.dtype)
    padded = torch.cat([on, torch.zeros_like(on[:, :2])], 1)
    next1 = on * padded[:, 1:3 * L + 1]
    next2 = next1 * padded[:, 2:3 * L + 2]
    sigma2 = sigma.pow(2).view(B, 1)
    c0, c1, c2 = covariance[0], covariance[1], covariance[2]
    g = sigma2 / (sigma2 + CORRELATION_FADE_SIGMA ** 2)  # the correlations fade in with sigma
    diag = (on * (c0 + 2.0 * sigma2) + (1.0 - on)).view(B, L, 3)
    e1 = (next1 * (g * c1 - sigma2)).view(B, L, 3)
    e2 = (next2 * (g * c2)).view(B, L, 3)
    zero = torch.zeros_like(diag[..., 0])
    D = torch.stack([torch.stack([diag[..., 0], e1[..., 0], e2[..., 0]], -1),
                     torch.stack([e1[..., 0], diag[..., 1], e1[..., 1]], -1),
                     torch.stack([e2[..., 0], e1[..., 1], diag[..., 2]], -1)], -2)
    U = torch.stack([torch.stack([zero, zero, zero], -1), torch.stack([e2[..., 1], zero, zero], -1),
                     torch.stack([e1[..., 2], e2[..., 2], zero], -1)], -2)
    rhs = (bonds * on.unsqueeze(-1)).view(B, L, 3, 3)
    y = solve_block_tridiagonal(D, U, rhs)
    return 0.5 * ((y * rhs).sum((1, 2, 3)) - rhs.pow(2).sum((1, 2, 3)) / (c0 + 2.0 * sigma2.view(B)))


def geometry_prior(atoms, types, chains, real, sigma, pairs, stats, version=1, bond_covariance=None):
    """The analytic geometry prior [B] in kT (GeometryPrior::energy, docs/MODEL.md): for each pair kind
    (rna, offset, atom i, atom j) with (d0, s0), minus the log-density of the pair's difference vector under
    noise sigma: log r + (r - d0)^2 / 2v - log(1 - exp(-2 r d0 / v)), v = s0^2 + 2 sigma^2; version 2
    multiplies each kind's sum by chain_weight(sigma, d0); version 3 adds backbone_chain_energy, version 4
    correlated_chain_energy with the bond covariances (c0, c1, c2), version 5 that and exclusion_energy, version 6
    the same with the exclusion only between residues at least three apart along a segment."""
    if version >= 4 and bond_covariance is None:
        raise ValueError("geometry prior versions 4 to 6 need the bond covariances (c0, c1, c2)")
    B, L = types.shape
    rna = types >= FIRST_NUCLEOTIDE
    two_sigma2 = 2.0 * sigma.to(atoms.dtype).pow(2).view(B, 1)
    total = torch.zeros(B, dtype=atoms.dtype, device=atoms.device)
    for (is_rna, offset, i, j), (d0, s0) in zip(pairs.tolist(), stats.unbind(0)):
        is_rna, offset, i, j = bool(is_rna), int(offset), int(i), int(j)
        if offset == 0:
            use = real & (rna == is_rna)
            r = atoms[:, :, i] - atoms[:, :, j]
        else:
            if L < 2:
                continue
            use = real[:, :-1] & real[:, 1:] & (chains[:, :-1] == chains[:, 1:]) & (rna[:, :-1] == is_rna) & \
                (rna[:, 1:] == is_rna)
            r = atoms[:, :-1, i] - atoms[:, 1:, j]
        d = torch.sqrt(r.pow(2).sum(-1) + 1e-12)
        v = s0 * s0 + two_sigma2
        a = 2.0 * d * d0 / v
        e = torch.log(d) + (d - d0).pow(2) / (2.0 * v) - torch.log(-torch.expm1(-a))
        term = (e * use.to(e.dtype)).sum(1)
        if version == 2:
            term = term * chain_weight(sigma.to(atoms.dtype).view(B), d0, is_rna)
        total = total + term
    if version == 3:
        total = total + backbone_chain_energy(atoms, types, chains, real, sigma.to(atoms.dtype).view(B), pairs, stats)
    if version >= 4:
        total = total + correlated_chain_energy(atoms, types, chains, real, sigma.to(atoms.dtype).view(B),
                                                bond_covariance.to(atoms.dtype))
    if version >= 5:
        total = total + exclusion_energy(atoms, chains, real, sigma.to(atoms.dtype).view(B), nearest=exclusion_nearest(version))
    return total


# GeometryPrior::ExclusionRadius and ExclusionWidth (nm): version 5's wall between non-neighbouring residues.
EXCLUSION_RADIUS = 0.27
EXCLUSION_WIDTH = 0.01


def exclusion_nearest(version):
    """GeometryPrior::exclusionNearest: the smallest separation along a chain segment at which the exclusion term
    counts a pair of residues (version 5: 2, version 6: 3)."""
    return 3 if version >= 6 else 2


def exclusion_energy(atoms, chains, real, sigma, nearest=2):
    """The exclusion term [B] of versions 5 and 6 (kT; GeometryPrior::exclusionEnergy): over the frame-atom pairs
    of real residues that are neither the same residue nor within nearest - 1 residues along one chain segment
    (nearest = 2: all but linked neighbours), -log(1 - F(r)) with F the probability that a
    Gaussian of spread s (s^2 = 2 sigma^2 + EXCLUSION_WIDTH^2) about a point at distance r lies inside the ball of
    radius EXCLUSION_RADIUS; 1 - F in log space inside the wall, -log1p(-F) outside."""
    B, L = chains.shape
    n = 3 * L
    x = atoms.reshape(B, n, 3)
    r = torch.sqrt((x.unsqueeze(2) - x.unsqueeze(1)).pow(2).sum(-1) + 1e-12)
    residue = torch.arange(L, device=atoms.device).repeat_interleave(3)
    later = residue.unsqueeze(0) > residue.unsqueeze(1)
    following = residue.unsqueeze(0) < residue.unsqueeze(1) + nearest
    chain_atom, real_atom = chains.repeat_interleave(3, 1), real.bool().repeat_interleave(3, 1)
    linked = following.unsqueeze(0) & (chain_atom.unsqueeze(2) == chain_atom.unsqueeze(1))
    use = later.unsqueeze(0) & ~linked & real_atom.unsqueeze(2) & real_atom.unsqueeze(1)
    r0 = EXCLUSION_RADIUS
    s = torch.sqrt(2.0 * sigma.pow(2) + EXCLUSION_WIDTH ** 2).view(B, 1, 1)
    a, b, q = (r - r0) / s, (r + r0) / s, 2.0 * r * r0 / s.pow(2)
    inside = a <= 0
    ai = torch.where(inside, a, torch.zeros_like(a))
    bracket = math.sqrt(math.pi / 2) * (torch.special.erfcx(-ai / math.sqrt(2)) + torch.special.erfcx(b / math.sqrt(2)) * torch.exp(-q)) \
        - (s / r) * torch.expm1(-q)
    energy_inside = 0.5 * ai.pow(2) + 0.5 * math.log(2 * math.pi) - torch.log(bracket)
    ao = torch.where(inside, torch.ones_like(a), a)
    density = lambda v: torch.exp(-0.5 * v.pow(2)) / math.sqrt(2 * math.pi)  # noqa: E731
    f = torch.special.ndtr(-ao) - torch.special.ndtr(-b) - (s / r) * (density(ao) - density(b))
    energy = torch.where(inside, energy_inside, -torch.log1p(-f.clamp(min=0.0)))
    return (energy * use.to(energy.dtype)).sum((1, 2))


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------

def default_model_path():
    """The shipped model, resolved as the plugin does: $FLASHIPA_DEFAULT_MODEL, else the file next to
    libFlashIPAModels (asked from the compiled FlashIPAForce)."""
    path = os.environ.get("FLASHIPA_DEFAULT_MODEL")
    if path:
        return path
    from .openmmflashipa import FlashIPAForce  # the plugin knows where it installed its model
    return FlashIPAForce("").getResolvedModelPath()


def load_energy_model(path=None, device="cpu", dtype=torch.float64, backend="sdpa"):
    """Build an :class:`EnergyModel` from a checkpoint written by the C++ saveEnergyModel.

    The architecture comes from the metadata (``config.*``; ``format`` must be
    "openmm-flashipa-energy-model" and ``format_version`` "1"); every parameter's name, shape and dtype
    (F32 or F64) is checked and values must be finite, as loadEnergyModel does. ``path`` None selects
    the shipped model. The model is returned in eval mode, on device/dtype, with parameters that do not
    require gradients (forces need gradients with respect to positions only).
    """
    path = default_model_path() if path is None else os.fspath(path)
    tensors, metadata = read_safetensors(path)

    def fail(cause):
        raise ValueError("model checkpoint '%s': %s" % (path, cause))

    if metadata.get("format") != FORMAT_NAME:
        fail("not an openmm-flashipa energy model (metadata 'format' must be '%s')" % FORMAT_NAME)
    if metadata.get("format_version") != FORMAT_VERSION:
        fail("unsupported format version (this reader reads version %s)" % FORMAT_VERSION)
    try:
        config = ModelConfig.from_metadata(metadata)
    except ValueError as error:
        fail(str(error))
    priorKinds = tensors["geometryPriorPairs"].shape[0] if config.geometryPrior and "geometryPriorPairs" in tensors else 0
    model = EnergyModel(config, priorKinds)
    used = set()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            value = tensors.get(name)
            if value is None:
                fail("missing tensor '%s'" % name)
            if value.dtype not in (torch.float32, torch.float64):
                fail("tensor '%s' has dtype %s, expected F32 or F64" % (name, value.dtype))
            if tuple(value.shape) != tuple(parameter.shape):
                fail("tensor '%s' has shape %s, expected %s" % (name, list(value.shape), list(parameter.shape)))
            if not bool(torch.isfinite(value).all()):
                fail("tensor '%s' holds non-finite values" % name)
            parameter.copy_(value)
            used.add(name)
    unexpected = [name for name in tensors if name not in used]
    if unexpected:
        fail("unexpected tensor '%s' (not part of the architecture in the metadata)" % unexpected[0])
    model.metadata = metadata
    model.path = path
    model.backend = backend
    model = model.to(device=device, dtype=dtype)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def energy(model, atoms, types, chains, sigma, mask=None, backend=None, checked=True):
    """E(x, sigma) in kT, [B], for frame atoms [B, L, 3, 3] in nm (see :meth:`EnergyModel.forward`)."""
    return model(atoms, types, chains, sigma, mask=mask, backend=backend, checked=checked)


def energy_and_forces(model, atoms, types, chains, sigma, scale=1.0, temperature=300.0, backend=None,
                      checked=True):
    """``U = scale * kT * sum_b E_b(x, sigma)`` in kJ/mol and ``F = -dU/dx`` in kJ/mol/nm, as the force.

    atoms [L, 3, 3] or [B, L, 3, 3] (nm; converted to the model's device and dtype); types and chains
    [L] or [B, L]. Returns (energy: 0-d tensor, forces: tensor shaped like atoms), on the model's device.

    Like the plugin's ForceEvaluator, ``checked`` tests the frames on the host (ValueError naming the
    first degenerate residue) and the model then runs with guarded normalisations (``|v|^2 + 1e-12``),
    which differs from the unguarded :func:`energy` by about 1e-12 / |v|^2 relative. ``checked=False``
    skips the host test (no synchronisation; degenerate input gives finite, arbitrary values).
    """
    parameter = next(model.parameters())
    single = atoms.dim() == 3
    x = atoms.detach().to(parameter.device, parameter.dtype)
    types, chains = types.to(parameter.device), chains.to(parameter.device)
    if single:
        x, types, chains = x.unsqueeze(0), types.reshape(1, -1), chains.reshape(1, -1)
    kT = BOLTZMANN_KJ_PER_MOL_K * float(temperature)
    if checked:
        # As the plugin's ForceEvaluator: a clear error for degenerate frames on the host, then the model
        # with guarded normalisations (validate = false), the function the plugin differentiates.
        check_frames(x)
        if not torch.is_tensor(sigma) and not float(sigma) > 0:
            raise ValueError("sigma must be positive")
    with torch.enable_grad():
        x.requires_grad_(True)
        e = model(x, types, chains, sigma, backend=backend, checked=False).sum()
        (gradient,) = torch.autograd.grad(e, x)
    factor = float(scale) * kT
    forces = gradient * (-factor)
    return (e.detach() * factor), (forces.squeeze(0) if single else forces)
