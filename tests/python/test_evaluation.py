"""The evaluation module (openmmflashipa.evaluation, `flashipa evaluate`): decoys and targets on hand-made cases with
known answers, and one small end-to-end run of every section on the CPU (a tiny data set built from four files of
../shared/data; skipped without it)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from openmmflashipa import evaluation

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
SHARED = os.path.join(ROOT, "..", "shared", "data")
# Train: crambin (46 residues) and a two-segment BM5 chain, a tRNA; validation: two short proteins, two RNAs.
FILES = ["protein/PDownB_1EJG_A.cif.gz", "protein/BM5-clean_1BGX_A.cif.gz", "rna/rsRNASP_1YFG_A.cif.gz",
         "protein/kortemme_loop_modeling_1RDQ_I.cif.gz", "protein/python-biopython-doc_3JQH_A.cif.gz",
         "rna/rsRNASP_280D_A.cif.gz", "rna/rsRNASP_5CNR_B.cif.gz"]


def helixFrames(length):
    """An ideal-ish helix of frame atoms [L, 3, 3] (nm)."""
    t = np.arange(length)[:, None] * np.radians(100.0)
    offsets = np.array([-0.3, 0.0, 0.3])[None, :]
    angle = t + offsets * np.radians(30.0)
    return np.stack([0.23 * np.cos(angle), 0.23 * np.sin(angle), 0.15 * (np.arange(length)[:, None] + offsets)], -1)


def test_decoys_are_what_they_say():
    rng = np.random.default_rng(0)
    atoms, types = helixFrames(30), np.arange(30) % 20
    donor = helixFrames(50) + 1.0
    out = evaluation.decoys(atoms, types, rng, [donor], noise=0.1)
    assert set(out) == {"perturbed", "threaded", "shuffled", "mirrored"}
    x, t = out["mirrored"]
    np.testing.assert_array_equal(x[..., 0], -atoms[..., 0])
    np.testing.assert_array_equal(x[..., 1:], atoms[..., 1:])
    x, t = out["shuffled"]
    np.testing.assert_array_equal(x, atoms)
    assert sorted(t) == sorted(types) and not np.array_equal(t, types)
    x, t = out["perturbed"]
    assert abs(np.std(x - atoms) - 0.1) < 0.02
    x, t = out["threaded"]
    np.testing.assert_array_equal(t, types)
    assert x.shape == atoms.shape and any(np.array_equal(x, donor[s:s + 30]) for s in range(21))
    # A donor shorter than the native is never used.
    assert "threaded" not in evaluation.decoys(atoms, types, rng, [helixFrames(10)])


def test_targets_say_met_only_when_every_length_meets_them():
    def report(helix, valid):
        lengths = {str(L): {"refined": 2, "ss_helix": h, "ss_strand": 0.2, "valid": v, "rg_ratio": 1.0, "knotted": 0.0}
                   for L, h, v in zip((50, 100), helix, valid)}
        return {"generation": {"protein": {"lengths": lengths}}}
    met = {name: ok for name, _, ok in evaluation.targets(report((0.4, 0.5), (1.0, 1.0)))}
    assert all(met.values()) and len(met) == 5
    met = {name: ok for name, _, ok in evaluation.targets(report((0.4, 0.2), (1.0, 0.9)))}
    assert not met["protein helix fraction in [0.35, 0.60] at every length"]
    assert not met["protein valid after refinement >= 0.95 at every length"]
    assert met["protein strand fraction >= 0.15 at every length"]


def test_reference_rg_follows_the_fit():
    reference = {"rg_fit": {"a": 0.3, "nu": 0.4}}
    assert evaluation.referenceRg(reference, 100) == pytest.approx(0.3 * 100 ** 0.4)


@pytest.fixture(scope="module")
def tinyData(tmp_path_factory):
    if not os.path.exists(os.path.join(SHARED, "manifest.tsv")):
        pytest.skip("shared data folder (../shared/data) not present")
    folder = tmp_path_factory.mktemp("evaluation")
    path = str(folder / "data.safetensors")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "build_dataset.py"), "--quiet", "--out", path,
                    "--manifest-out", str(folder / "manifest.tsv"), "--files", *FILES], check=True)
    return path


def test_every_section_end_to_end(tinyData, tmp_path):
    out = str(tmp_path / "report")
    report = evaluation.evaluate(out, tinyData, os.path.join(ROOT, "data", "manifest.tsv"), SHARED,
                                 proteinLengths=(24,), rnaLengths=(), perLength=2, designable=1, designLength=24,
                                 natives=1, designPicoseconds=1.0, refineIterations=300, discriminationChains=4,
                                 denoisingChains=2, numSteps=5, refineSteps=20, platform="CPU", progress=False)
    for name in ("report.json", "report.md", "rg_protein.png", "ss_protein.png", "designability.png",
                 "refinement.png"):
        assert os.path.exists(os.path.join(out, name)), name
    with open(os.path.join(out, "report.json")) as handle:
        written = json.load(handle)
    assert written["targets"] and all(set(t) == {"target", "measured", "met"} for t in written["targets"])
    generated = written["generation"]["protein"]
    assert len(generated["rows"]) == 2 and generated["backbones_per_second"] > 0
    entry = generated["lengths"]["24"]
    assert entry["refined"] == 2 and entry["diversity"] is not None and 0 <= entry["diversity"] <= 1
    for row in generated["rows"]:
        assert 0 <= row["ss_helix"] + row["ss_strand"] <= 1 and row["knotted"] in (True, False)
    kinds = {row["kind"] for row in written["designability"]["rows"]}
    assert kinds == {"generated", "native, own sequence", "native, ProteinMPNN sequence"}
    for row in written["designability"]["rows"]:
        assert "error" not in row, row
        assert len(row["sequence"]) == row["length"] and len(row["rmsd"]) == 11
    native = [r for r in written["designability"]["rows"] if r["kind"] == "native, own sequence"][0]
    assert native["start_rmsd"] < 0.1  # minimised native: still the native
    # The physics baseline does what it should on a perturbed native: closer to the truth than the start.
    refinement = written["refinement"]["rows"][0]
    assert refinement["amber"] < refinement["start"]
    assert written["discrimination"]["rows"] and 0 <= written["discrimination"]["native_lowest"] <= 1
    # Denoising: from sigma = 0.3 nm the flow must end closer to the native than the noisy start, whose Calpha
    # atoms sit about 0.3 sqrt(3) = 0.52 nm (RMS) from it.
    denoised = written["denoising"]["sigmas"]["0.3"]
    assert denoised["completed"] == denoised["runs"] == 2
    assert 0 <= denoised["connected"] <= 1 and denoised["rmsd_nm"] < 0.3 * np.sqrt(3)
    for row in generated["rows"]:
        assert 0 <= row["raw_connected"] <= 1 and row["raw_link_median"] > 0
    text = open(os.path.join(out, "report.md")).read()
    assert "## Targets" in text and "## Denoising" in text


def test_paired_fraction_counts_hairpin_partners_and_nothing_in_a_straight_strand():
    # Every residue is one template frame translated, so each C1' (placed from its frame) is the translation plus one
    # fixed offset: C1'-C1' distances are the translations' distances, known by construction.
    template = np.array([[0.1, 0.12, 0.0], [0.0, 0.0, 0.0], [0.15, 0.0, 0.0]])
    straight = np.array([template + [0.0, 0.0, 0.6 * i] for i in range(12)])
    assert evaluation.pairedFraction(straight) == 0.0  # nearest partners at |i - j| >= 4 are 2.4 nm apart
    # A hairpin: residue i (0-5) up one arm, residue 11 - i 1.05 nm across from it. Partners 0-11, 1-10, 2-9, 3-8
    # are >= 4 apart along the chain; 4-7 and 5-6 are too close along it; diagonal neighbours are 1.21 nm apart.
    arm = [template + [0.0, 0.0, 0.6 * i] for i in range(6)]
    other = [template + [1.05, 0.0, 0.6 * (5 - k)] for k in range(6)]
    assert evaluation.pairedFraction(np.array(arm + other)) == pytest.approx(8 / 12)


def test_ramachandran_of_ideal_helix_strand_and_their_mirror_images():
    # Chains built from given torsions (NeRF, tests/python/test_metrics_topology.py): the measured regions are the
    # ones they were built in, and a mirror image (x -> -x) flips every phi to > 0.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_metrics_topology import idealBackbone
    helix = idealBackbone(20, phi=-57.0, psi=-47.0)[:, :3]
    strand = idealBackbone(20, phi=-120.0, psi=130.0)[:, :3]
    assert evaluation.ramachandran(helix) == {"phi_positive": 0.0, "rama_alpha": 1.0, "rama_beta": 0.0}
    assert evaluation.ramachandran(strand) == {"phi_positive": 0.0, "rama_alpha": 0.0, "rama_beta": 1.0}
    mirror = helix * np.array([-1.0, 1.0, 1.0])
    assert evaluation.ramachandran(mirror)["phi_positive"] == 1.0
