"""The PyTorch twin of the model (openmmflashipa.torch_twin) and its PythonForce (openmmflashipa.pythonforce)
against the plugin's FlashIPAForce on the Reference platform.

Everything here runs on the CPU in float64: the twin must compute the plugin's function (energies and
forces equal to 1e-8 relative) from the same checkpoint, read with the `safetensors` library rather than the plugin's C++ reader.
"""

import os
import pickle
import struct

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import pytest
import torch

import openmmflashipa
from openmmflashipa import torch_twin
from openmmflashipa.pythonforce import TwinComputation, createPythonForce

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "data")
STRUCTURES = ["protein.pdb", "rna.pdb"]
TOLERANCE = 1e-8
KJ = unit.kilojoules_per_mole
KJ_NM = unit.kilojoules_per_mole / unit.nanometer


def relativeError(actual, expected):
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300))


@pytest.fixture(scope="module")
def model():
    return torch_twin.load_energy_model(None, device="cpu", dtype=torch.float64)


def loadStructure(name):
    pdb = app.PDBFile(os.path.join(DATA, name))
    return pdb.topology, pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer)


def complexStructure():
    """Protein and RNA as two chains of one topology (exercises the chain gap and chain-aware neighbours)."""
    proteinTopology, proteinPositions = loadStructure("protein.pdb")
    rnaTopology, rnaPositions = loadStructure("rna.pdb")
    modeller = app.Modeller(proteinTopology, proteinPositions * unit.nanometer)
    # Shift the RNA so that the two molecules do not overlap (the model is not periodic; any placement works).
    modeller.add(rnaTopology, (rnaPositions + np.array([3.0, 0.0, 0.0])) * unit.nanometer)
    return modeller.topology, np.array(modeller.getPositions().value_in_unit(unit.nanometer))


def systemFor(topology, force):
    system = openmm.System()
    for atom in topology.atoms():
        system.addParticle(atom.element.mass if atom.element is not None else 12.0)
    system.addForce(force)
    return system


def evaluate(system, positions, parameters=None):
    """(energy kJ/mol, forces [N, 3] kJ/mol/nm) on the Reference platform."""
    integrator = openmm.VerletIntegrator(0.001)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions * unit.nanometer)
    for name, value in (parameters or {}).items():
        context.setParameter(name, value)
    state = context.getState(getEnergy=True, getForces=True)
    energy = state.getPotentialEnergy().value_in_unit(KJ)
    forces = state.getForces(asNumpy=True).value_in_unit(KJ_NM)
    del context, integrator
    return energy, np.asarray(forces)


def residuesOf(force):
    """A FlashIPAForce's residues as (a, b, c, type, chain); read them before adding the force to a System,
    which takes ownership of it."""
    return [tuple(force.getResidueParameters(i)) for i in range(force.getNumResidues())]


def twinEnergyAndForces(model, residues, positions, scale=1.0, sigma=0.05, temperature=300.0, backend="sdpa"):
    """The twin's (energy, forces on all particles) for residues (a, b, c, type, chain)."""
    indices = np.array([r[:3] for r in residues], dtype=np.int64)
    atoms = torch.tensor(positions[indices], dtype=torch.float64)
    types = torch.tensor([r[3] for r in residues], dtype=torch.int64)
    chains = torch.tensor([r[4] for r in residues], dtype=torch.int64)
    energy, frameForces = torch_twin.energy_and_forces(model, atoms, types, chains, sigma, scale=scale,
                                                       temperature=temperature, backend=backend)
    forces = np.zeros_like(positions)
    forces[indices.reshape(-1)] = frameForces.numpy().reshape(-1, 3)
    return float(energy), forces


def structures():
    return [(name, *loadStructure(name)) for name in STRUCTURES] + [("complex", *complexStructure())]


# ---------------------------------------------------------------------------------------------------
# Checkpoint reading
# ---------------------------------------------------------------------------------------------------

def test_parameter_names_match_checkpoint(model):
    tensors, metadata = torch_twin.read_safetensors(model.path)
    assert metadata["format"] == "openmm-flashipa-energy-model"
    assert metadata["format_version"] == "1"
    assert sorted(name for name, _ in model.named_parameters()) == sorted(tensors)
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, tensors[name].to(torch.float64)), name
    assert "ipaLayers.0.linearQ.weight" in tensors and "transitions.0.0.weight" in tensors


def test_default_model_is_the_plugins(model):
    force = openmmflashipa.FlashIPAForce("")
    assert os.path.samefile(model.path, force.getResolvedModelPath())


def test_reader_rejects_truncated_file(model, tmp_path):
    data = open(model.path, "rb").read()
    for cut in (4, 8 + 10, len(data) - 1, len(data) - 1000):
        path = tmp_path / ("truncated%d.safetensors" % cut)
        path.write_bytes(data[:cut])
        with pytest.raises(torch_twin.SafetensorsError):
            torch_twin.read_safetensors(path)
        with pytest.raises(ValueError):
            torch_twin.load_energy_model(path)


def test_reader_rejects_malformed_headers(tmp_path):
    def fileWith(header, payload=b""):
        text = header.encode() if isinstance(header, str) else header
        return struct.pack("<Q", len(text)) + text + payload

    cases = {
        "huge header length": struct.pack("<Q", 2 ** 40) + b"{}",
        "not JSON": fileWith("{nope"),
        "not an object": fileWith("[1, 2]"),
        "unknown dtype": fileWith('{"x": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}', bytes(16)),
        "size mismatch": fileWith('{"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', bytes(8)),
        "negative shape": fileWith('{"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}'),
        "boolean shape": fileWith('{"x": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}', bytes(4)),
        "outside data": fileWith('{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', bytes(4)),
        "overlap": fileWith('{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},'
                            ' "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}', bytes(12)),
        "duplicate key": fileWith('{"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},'
                                  ' "x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', bytes(1)),
        "non-string metadata": fileWith('{"__metadata__": {"a": 1}}'),
        "bad bool": fileWith('{"x": {"dtype": "BOOL", "shape": [1], "data_offsets": [0, 1]}}', b"\x02"),
    }
    for name, data in cases.items():
        with pytest.raises(torch_twin.SafetensorsError):
            torch_twin.parse_safetensors(data, name)


def test_reader_round_trip():
    values = torch.arange(6, dtype=torch.float32).view(2, 3)
    header = '{"__metadata__": {"k": "v"}, "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},' \
             ' "e": {"dtype": "I64", "shape": [0], "data_offsets": [24, 24]}}'
    data = struct.pack("<Q", len(header)) + header.encode() + values.numpy().tobytes()
    tensors, metadata = torch_twin.parse_safetensors(data)
    assert metadata == {"k": "v"}
    assert torch.equal(tensors["w"], values) and tensors["e"].shape == (0,)


# ---------------------------------------------------------------------------------------------------
# The twin against the plugin
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", STRUCTURES + ["complex"])
def test_twin_matches_reference_platform(model, name):
    topology, positions = loadStructure(name) if name != "complex" else complexStructure()
    force = openmmflashipa.createForce(topology)
    residues = residuesOf(force)
    expectedEnergy, expectedForces = evaluate(systemFor(topology, force), positions)
    energy, forces = twinEnergyAndForces(model, residues, positions)
    assert abs(energy - expectedEnergy) <= TOLERANCE * abs(expectedEnergy)
    assert relativeError(forces, expectedForces) <= TOLERANCE
    assert np.abs(expectedForces).max() > 0


def test_twin_matches_reference_platform_with_parameters(model):
    topology, positions = loadStructure("protein.pdb")
    force = openmmflashipa.createForce(topology)
    residues = residuesOf(force)
    parameters = {"flashipaScale": 0.7, "flashipaSigma": 0.3, "flashipaTemperature": 310.0}
    expectedEnergy, expectedForces = evaluate(systemFor(topology, force), positions, parameters)
    energy, forces = twinEnergyAndForces(model, residues, positions, scale=0.7, sigma=0.3, temperature=310.0)
    assert abs(energy - expectedEnergy) <= TOLERANCE * abs(expectedEnergy)
    assert relativeError(forces, expectedForces) <= TOLERANCE


@pytest.mark.parametrize("name", STRUCTURES)
def test_math_and_sdpa_agree(model, name):
    topology, positions = loadStructure(name)
    residues = residuesOf(openmmflashipa.createForce(topology))
    eMath, fMath = twinEnergyAndForces(model, residues, positions, backend="math")
    eSdpa, fSdpa = twinEnergyAndForces(model, residues, positions, backend="sdpa")
    assert abs(eMath - eSdpa) <= 1e-10 * abs(eMath)
    assert relativeError(fSdpa, fMath) <= 1e-10


def test_masked_batch_equals_separate_structures(model):
    proteinTopology, proteinPositions = loadStructure("protein.pdb")
    rnaTopology, rnaPositions = loadStructure("rna.pdb")
    inputs = []
    for topology, positions in ((proteinTopology, proteinPositions), (rnaTopology, rnaPositions)):
        frames, _ = openmmflashipa.selectFrameResidues(topology)
        indices = np.array([f.atoms for f in frames])
        inputs.append((torch.tensor(positions[indices]), torch.tensor([f.residueType for f in frames]),
                       torch.tensor([f.chain for f in frames])))
    L = max(len(types) for _, types, _ in inputs)
    atoms = torch.zeros(2, L, 3, 3, dtype=torch.float64)
    types = torch.zeros(2, L, dtype=torch.int64)
    chains = torch.zeros(2, L, dtype=torch.int64)
    mask = torch.zeros(2, L, dtype=torch.bool)
    for b, (x, t, c) in enumerate(inputs):
        atoms[b, :len(t)], types[b, :len(t)], chains[b, :len(t)], mask[b, :len(t)] = x, t, c, True
    for backend in ("math", "sdpa"):
        batched = torch_twin.energy(model, atoms, types, chains, torch.tensor([0.05, 0.05], dtype=torch.float64),
                                    mask=mask, backend=backend)
        for b, (x, t, c) in enumerate(inputs):
            single = torch_twin.energy(model, x[None], t[None], c[None], 0.05, backend=backend)
            assert abs(float(batched[b]) - float(single)) <= 1e-10 * abs(float(single))


def test_twin_is_invariant(model):
    topology, positions = loadStructure("protein.pdb")
    frames, _ = openmmflashipa.selectFrameResidues(topology)
    indices = np.array([f.atoms for f in frames])
    atoms = torch.tensor(positions[indices])
    types = torch.tensor([f.residueType for f in frames])[None]
    chains = torch.tensor([f.chain for f in frames])[None]
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    if torch.det(rotation) < 0:
        rotation = -rotation
    moved = atoms @ rotation.T + torch.tensor([10.0, -20.0, 50.0], dtype=torch.float64)
    e0 = torch_twin.energy(model, atoms[None], types, chains, 0.05)
    e1 = torch_twin.energy(model, moved[None], types, chains, 0.05)
    assert abs(float(e1 - e0)) <= 1e-9 * abs(float(e0))


def test_degenerate_frames_raise(model):
    atoms = torch.tensor([[[0.0, 0.145, 0.0], [0.0, 0.0, 0.0], [0.153, 0.0, 0.0]],
                          [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.153, 0.0, 0.0]]], dtype=torch.float64)
    with pytest.raises(ValueError, match="residue 1"):
        torch_twin.energy_and_forces(model, atoms, torch.tensor([0, 0]), torch.tensor([0, 0]), 0.05)


# ---------------------------------------------------------------------------------------------------
# PythonForce
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", STRUCTURES + ["complex"])
def test_pythonforce_matches_flashipaforce(name):
    topology, positions = loadStructure(name) if name != "complex" else complexStructure()
    expectedEnergy, expectedForces = evaluate(systemFor(topology, openmmflashipa.createForce(topology)), positions)
    pythonForce = createPythonForce(topology, device="cpu", dtype="float64")
    assert isinstance(pythonForce, openmm.PythonForce)
    energy, forces = evaluate(systemFor(topology, pythonForce), positions)
    assert abs(energy - expectedEnergy) <= TOLERANCE * abs(expectedEnergy)
    assert relativeError(forces, expectedForces) <= TOLERANCE


def test_pythonforce_parameters_and_sources():
    topology, positions = loadStructure("rna.pdb")
    def plugin():
        return openmmflashipa.createForce(topology, sigma=0.2, scale=2.0, temperature=280.0)

    parameters = {"flashipaScale": 0.5, "flashipaSigma": 0.1, "flashipaTemperature": 320.0}
    expected = evaluate(systemFor(topology, plugin()), positions, parameters)
    expectedDefaults = evaluate(systemFor(topology, plugin()), positions)
    frames, _ = openmmflashipa.selectFrameResidues(topology)
    # Sources: a FlashIPAForce, the same as the openmm.Force that System.getForce returns, FrameResidues, tuples.
    holder = systemFor(topology, plugin())
    for source in (plugin(), holder.getForce(0), frames, [(*f.atoms, f.residueType, f.chain) for f in frames]):
        kwargs = {} if isinstance(source, openmm.Force) else {"sigma": 0.2, "scale": 2.0, "temperature": 280.0 * unit.kelvin}
        def pythonForce():
            return createPythonForce(source, device="cpu", dtype=torch.float64, **kwargs)

        assert pythonForce().getGlobalParameters()["flashipaSigma"] == pytest.approx(0.2)
        energy, forces = evaluate(systemFor(topology, pythonForce()), positions, parameters)
        assert abs(energy - expected[0]) <= TOLERANCE * abs(expected[0])
        assert relativeError(forces, expected[1]) <= TOLERANCE
        energy, _ = evaluate(systemFor(topology, pythonForce()), positions)
        assert abs(energy - expectedDefaults[0]) <= TOLERANCE * abs(expectedDefaults[0])


def test_pythonforce_float32_is_close():
    topology, positions = loadStructure("protein.pdb")
    expectedEnergy, expectedForces = evaluate(systemFor(topology, openmmflashipa.createForce(topology)), positions)
    energy, forces = evaluate(systemFor(topology, createPythonForce(topology, device="cpu")), positions)
    assert abs(energy - expectedEnergy) <= 1e-4 * abs(expectedEnergy)
    assert relativeError(forces, expectedForces) <= 1e-4


def test_computation_pickles():
    topology, positions = loadStructure("protein.pdb")
    frames, _ = openmmflashipa.selectFrameResidues(topology)
    computation = TwinComputation(None, [f.residueType for f in frames], [f.chain for f in frames], device="cpu",
                                  dtype=torch.float64)
    copy = pickle.loads(pickle.dumps(computation))
    indices = np.array([f.atoms for f in frames]).reshape(-1)
    e0, f0 = computation.evaluate(positions[indices])
    e1, f1 = copy.evaluate(positions[indices])
    assert float(e0) == float(e1) and torch.equal(f0, f1)


def test_pythonforce_rejects_fused_and_shared_atoms():
    topology, _ = loadStructure("protein.pdb")
    with pytest.raises(ValueError):
        createPythonForce(topology, device="cpu", backend="fused")
    with pytest.raises(ValueError, match="more than one frame"):
        createPythonForce([(0, 1, 2, 0, 0), (2, 3, 4, 0, 0)], device="cpu")


# ---------------------------------------------------------------------------------------------------
# A model with the geometry prior (docs/MODEL.md): trained for two steps by the C++ trainer, which measures
# the prior's statistics; the twin reads the pair table from the checkpoint and must compute the same function.
# ---------------------------------------------------------------------------------------------------

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
SHARED = os.path.join(ROOT, "..", "shared", "data")
TRAINER = os.path.join(ROOT, "build", "bin", "flashipa-train")


@pytest.fixture(scope="module", params=[1, 2, 3, 4, 5, 6], ids=["prior1", "prior2", "prior3", "prior4", "prior5", "prior6"])
def priorModelPath(request, tmp_path_factory):
    import subprocess
    import sys
    if not os.path.exists(os.path.join(SHARED, "manifest.tsv")) or not os.path.exists(TRAINER):
        pytest.skip("needs ../shared/data and the built flashipa-train")
    folder = tmp_path_factory.mktemp("prior")
    files = ["protein/kortemme_loop_modeling_1RDQ_I.cif.gz", "protein/PDownB_1EJG_A.cif.gz",
             "rna/rsRNASP_280D_A.cif.gz", "rna/rsRNASP_1YFG_A.cif.gz"]
    data = str(folder / "data.safetensors")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "build_dataset.py"), "--quiet", "--out", data,
                    "--manifest-out", str(folder / "manifest.tsv"), "--files", *files], check=True)
    subprocess.run([TRAINER, "--data", data, "--out-dir", str(folder / "run"), "--steps", "2", "--batch-size", "2",
                    "--crop", "32", "--val-every", "0", "--val-batches", "1", "--checkpoint-every", "0", "--threads", "1",
                    "--geometry-prior", str(request.param), "--quiet"], check=True, capture_output=True)
    return str(folder / "run" / "model.safetensors"), request.param


def test_twin_matches_plugin_with_geometry_prior(priorModelPath):
    priorModelPath, version = priorModelPath
    model = torch_twin.load_energy_model(priorModelPath, dtype=torch.float64)
    assert model.config.geometryPrior == version
    stats = model.geometryPriorStats.numpy()
    assert np.all(stats > 0) and 0.14 < stats[0, 0] < 0.15  # N-CA median of real proteins, nm
    if version >= 4:  # backbone bonds' covariances (nm^2 per component): c0 ~ (0.144 nm)^2 / 3, correlated
        c0, c1, c2 = model.geometryPriorBondCovariance.tolist()
        assert 0.006 < c0 < 0.008 and 0 < c1 < c0 and 0 < c2 < c0
    # At the force's default sigma and at a generation-level one, where versions 2 and 3 differ most from 1.
    for name, sigma in [(name, 0.05) for name in STRUCTURES + ["complex"]] + [("protein.pdb", 0.8), ("complex", 0.8)]:
        topology, positions = loadStructure(name) if name != "complex" else complexStructure()
        force = openmmflashipa.createForce(topology, modelPath=priorModelPath, sigma=sigma)
        residues = residuesOf(force)
        expectedEnergy, expectedForces = evaluate(systemFor(topology, force), positions)
        energy, forces = twinEnergyAndForces(model, residues, positions, sigma=sigma)
        assert abs(energy - expectedEnergy) <= TOLERANCE * abs(expectedEnergy), name
        assert relativeError(forces, expectedForces) <= TOLERANCE, name


def test_correlated_chain_energy_equals_dense_gaussian_energy():
    # Version 4's chain term (block cyclic reduction) against its definition with a dense matrix: two rows,
    # a chain break, an RNA residue and a padding residue, sigma per row; c0, c1, c2 as measured on the
    # training split (docs/MODEL.md).
    torch.manual_seed(3)
    B, L = 2, 11
    atoms = torch.cumsum(torch.randn(B, L * 3, 3, dtype=torch.float64) * 0.09, 1).reshape(B, L, 3, 3)
    types = torch.zeros(B, L, dtype=torch.int64)
    types[1, 4] = torch_twin.FIRST_NUCLEOTIDE
    chains = torch.zeros(B, L, dtype=torch.int64)
    chains[:, 7:] = 1
    real = torch.ones(B, L, dtype=torch.bool)
    real[0, 9] = False
    c0 = 0.00692
    covariance = torch.tensor([c0, 0.437 * c0, 0.443 * c0], dtype=torch.float64)
    sigma = torch.tensor([0.03, 1.1], dtype=torch.float64)
    got = torch_twin.correlated_chain_energy(atoms, types, chains, real, sigma, covariance)
    for b in range(B):
        present = []
        for i in range(L):
            protein = bool(real[b, i]) and int(types[b, i]) < torch_twin.FIRST_NUCLEOTIDE
            following = i + 1 < L and bool(real[b, i + 1]) and int(types[b, i + 1]) < torch_twin.FIRST_NUCLEOTIDE \
                and int(chains[b, i]) == int(chains[b, i + 1])
            present += [protein, protein, protein and following]
        path = atoms[b].reshape(-1, 3)
        slots = [j for j in range(3 * L - 1) if present[j]]
        s2 = float(sigma[b]) ** 2
        g = s2 / (s2 + 0.05 ** 2)  # the correlations' fade-in, GeometryPrior::CorrelationFadeSigma = 0.05 nm
        K = np.zeros((len(slots), len(slots)))
        for u, j in enumerate(slots):
            for v, k in enumerate(slots):
                if all(present[m] for m in range(min(j, k), max(j, k) + 1)):
                    K[u, v] = {0: c0 + 2 * s2, 1: g * float(covariance[1]) - s2, 2: g * float(covariance[2])}.get(abs(j - k), 0.0)
        bonds = np.array([(path[j + 1] - path[j]).numpy() for j in slots])
        want = 0.5 * (np.sum(np.linalg.solve(K, bonds) * bonds) - np.sum(bonds ** 2) / (c0 + 2 * s2))
        assert abs(float(got[b]) - want) <= 1e-9 * max(1.0, abs(want)), b
