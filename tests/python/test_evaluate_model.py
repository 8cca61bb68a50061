"""Tests of benchmarks/evaluate_model.py (the validation-split evaluation of an energy model).

Oracles: Spearman's rank correlation against hand-computed values (monotone transforms, the d^2 formula,
a small case with ties worked out by hand); Kabsch RMSD against rigid motions (RMSD 0) and a uniform
scaling about the centroid (RMSD known in closed form, the best rotation being the identity); the native
GBSAOBCForce against amber14's CustomGBForce OBC2; and an end-to-end run on two short protein and two short
RNA validation chains whose report must hold finite numbers everywhere. The chains come from
build/dataset/flashipa-dataset.safetensors with data/manifest.tsv when both are present and agree, else
from a data set built here from the four source files (scripts/build_dataset.py --files); the run needs
../shared/data for the source files, and is skipped without it.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
SCRIPT = os.path.join(ROOT, "benchmarks", "evaluate_model.py")
DATASET = os.path.join(ROOT, "build", "dataset", "flashipa-dataset.safetensors")
MANIFEST = os.path.join(ROOT, "data", "manifest.tsv")
SHARED = os.path.join(ROOT, "..", "shared", "data")
# Two short protein and two short RNA chains of the validation split; amber14 templates both proteins.
FILES = ["protein/kortemme_loop_modeling_1RDQ_I.cif.gz", "protein/python-biopython-doc_3JQH_A.cif.gz",
         "rna/rsRNASP_280D_A.cif.gz", "rna/rsRNASP_5CNR_B.cif.gz"]


def load_script():
    spec = importlib.util.spec_from_file_location("evaluate_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def em():
    return load_script()


# ---------------------------------------------------------------------------------------------------
# Spearman
# ---------------------------------------------------------------------------------------------------

def test_spearman_monotone_and_reversed(em):
    x = np.array([0.3, -1.2, 5.0, 2.2, 0.9, 7.5])
    assert em.spearman(x, np.exp(3 * x) + 4) == pytest.approx(1.0, abs=1e-12)
    assert em.spearman(x, -x ** 3) == pytest.approx(-1.0, abs=1e-12)


def test_spearman_matches_d_squared_formula_without_ties(em):
    x = [10.0, 20.0, 30.0, 40.0, 50.0]
    y = [1.0, 3.0, 2.0, 5.0, 4.0]
    # ranks of y: 1 3 2 5 4; d = 0, -1, 1, -1, 1; rho = 1 - 6 * 4 / (5 * 24) = 0.8
    assert em.spearman(x, y) == pytest.approx(0.8, abs=1e-12)


def test_spearman_with_ties_by_hand(em):
    # ranks x = 1, 2.5, 2.5, 4; ranks y = 1, 3, 2, 4; Pearson of the ranks = 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert em.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10), abs=1e-12)
    assert list(em.rankdata([5.0, 1.0, 5.0, 3.0])) == [3.5, 1.0, 3.5, 2.0]
    assert math.isnan(em.spearman([1, 1, 1], [1, 2, 3]))


# ---------------------------------------------------------------------------------------------------
# Kabsch RMSD
# ---------------------------------------------------------------------------------------------------

def rotation(axis, angle):
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def test_kabsch_rigid_motion_gives_zero(em):
    points = np.random.default_rng(3).normal(size=(30, 3))
    moved = points @ rotation([1.0, -2.0, 0.5], 2.1).T + np.array([4.0, -1.0, 7.0])
    assert em.kabsch_rmsd(moved, points) < 1e-6
    assert em.kabsch_rmsd(points.reshape(10, 3, 3), points.reshape(10, 3, 3)) < 1e-12


def test_kabsch_known_displacement(em):
    points = np.random.default_rng(4).normal(size=(25, 3))
    centred = points - points.mean(0)
    scale = 1.3
    # A uniform scaling about the centroid: the best rotation is the identity, RMSD = |s - 1| * rms radius.
    expected = (scale - 1) * math.sqrt((centred ** 2).sum(1).mean())
    moved = (centred * scale) @ rotation([0.2, 1.0, -0.7], 0.8).T + 2.0
    assert em.kabsch_rmsd(moved, points) == pytest.approx(expected, rel=1e-9)
    # A mirror image cannot be superposed by a proper rotation.
    assert em.kabsch_rmsd(points * np.array([-1.0, 1.0, 1.0]), points) > 0.1


# ---------------------------------------------------------------------------------------------------
# End to end on four short validation chains
# ---------------------------------------------------------------------------------------------------

def dataset_with_manifest(em, tmp_path_factory):
    """(dataset, manifest): the built data set if it and data/manifest.tsv agree, else a four-file one."""
    if os.path.exists(DATASET) and os.path.exists(MANIFEST):
        try:
            em.read_manifest(MANIFEST, em.load_dataset(DATASET))
            return DATASET, MANIFEST
        except SystemExit:
            pass
    folder = tmp_path_factory.mktemp("dataset")
    out, manifest = str(folder / "tiny.safetensors"), str(folder / "manifest.tsv")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "build_dataset.py"), "--quiet",
                             "--out", out, "--manifest-out", manifest, "--files", *FILES],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return out, manifest


@pytest.fixture(scope="module")
def tiny_run(em, tmp_path_factory):
    if not os.path.exists(os.path.join(SHARED, "manifest.tsv")):
        pytest.skip("shared data folder (../shared/data) not present: no source files for the chains")
    dataset, manifest = dataset_with_manifest(em, tmp_path_factory)
    out = str(tmp_path_factory.mktemp("model_eval"))
    args = em.parse_args(["--dataset", dataset, "--manifest", manifest, "--data", SHARED, "--out", out,
                          "--platform", "Reference", "--sigmas", "0.1", "--max-iterations", "20",
                          "--score-samples", "6", "--copies", "4", "--shuffles", "2", "--seed", "7"])
    data = em.load_dataset(dataset)
    rows = em.read_manifest(manifest, data)
    index = {row["file"]: c for c, row in enumerate(rows)}
    missing = [f for f in FILES if f not in index]
    if missing:
        pytest.skip("data set lacks %s" % missing)
    chains = {}
    for chain in em.make_chains(data, rows, [index[f] for f in FILES], args.max_length, args.seed):
        assert chain.row["split"] == "val"
        chains.setdefault(chain.moltype, []).append(chain)
    report = em.evaluate(args, chains)
    return args, report


def numeric_leaves(value, path=""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from numeric_leaves(item, path + "/" + str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from numeric_leaves(item, "%s[%d]" % (path, i))
    else:
        yield path, value


def test_report_json_is_complete_and_finite(tiny_run):
    args, _ = tiny_run
    with open(os.path.join(args.out, "report.json")) as handle:
        report = json.load(handle)
    for section in ("denoising", "targets", "score", "energy", "timing"):
        assert section in report, section
        leaves = list(numeric_leaves(report[section], section))
        assert leaves
        for path, value in leaves:
            if path.endswith("/donor") or "_error" in path:
                continue
            assert value is not None, path
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert math.isfinite(value), path
    for moltype in ("protein", "rna"):
        row = report["denoising"][moltype]["summary"]["0.1"]
        # Every chain is accounted for; a failed minimisation (e.g. frames collapsing under the learned
        # energy alone) must carry its cause, not vanish from the table.
        assert row["learned_ok"] + row["learned_failed"] == 2
        for chain in report["denoising"][moltype]["chains"]:
            entry = chain["sigmas"]["0.1"]
            assert ("learned" in entry) != ("learned_error" in entry)
        assert set(report["score"][moltype]["bands"]) == {"<0.05", "0.05-0.2", "0.2-0.5", ">=0.5"}
        assert {"shuffled", "threaded", "mirror"} <= set(report["energy"][moltype]["summary"]["decoys"])
    protein = report["denoising"]["protein"]
    assert protein["amber_skipped"] == {}
    assert protein["summary"]["0.1"]["paired_chains"] == 2
    assert "reversed" in report["energy"]["protein"]["summary"]["decoys"]
    for name in ("report.md", "rmsd_before_after.png", "score_bands.png", "energy_vs_rmsd.png"):
        assert os.path.getsize(os.path.join(args.out, name)) > 0, name


def test_paired_rmsds_start_from_the_same_backbone(tiny_run):
    """The frame-only and the all-atom systems get the same noise on the common N, CA, C atoms."""
    _, report = tiny_run
    for record in report["denoising"]["protein"]["chains"]:
        entry = record["sigmas"]["0.1"]
        assert entry["amber_before"] == pytest.approx(entry["before_common"], abs=1e-5)
        assert record["common_residues"] == record["length"]


def test_perturbed_copies_rmsd_grows_from_zero(tiny_run):
    _, report = tiny_run
    for moltype in ("protein", "rna"):
        for record in report["energy"][moltype]["chains"]:
            assert record["rmsd"][0] == pytest.approx(0.0, abs=1e-6)
            assert record["copy_sigma"][0] == 0.0 and record["rmsd"][-1] > record["rmsd"][1]


def test_native_obc2_matches_amber14_custom_gb(em, tiny_run):
    import openmm
    import openmm.app as app
    args, _ = tiny_run
    data = em.load_dataset(args.dataset)
    rows = em.read_manifest(args.manifest, data)
    index = [c for c, row in enumerate(rows) if row["file"] == FILES[0]]
    chain = em.make_chains(data, rows, index, args.max_length, args.seed)[0]
    forcefield = app.ForceField("amber14-all.xml", "implicit/obc2.xml")
    allatom, reason = em.build_allatom(chain, args.data, forcefield, args)
    assert reason is None
    args.gb_kernel = "custom"
    custom = em.amber_system(allatom.topology, forcefield, args)
    args.gb_kernel = "native"
    native = em.amber_system(allatom.topology, forcefield, args)
    assert any(isinstance(f, openmm.GBSAOBCForce) for f in native.getForces())
    assert not any(isinstance(f, openmm.CustomGBForce) for f in native.getForces())
    positions = allatom.positions + np.random.default_rng(1).normal(0, 0.01, allatom.positions.shape)
    energies = []
    for system in (custom, native):
        context = em.make_context(system, "Reference", None)
        context.setPositions(positions)
        energies.append(context.getState(getEnergy=True).getPotentialEnergy()._value)
    assert energies[1] == pytest.approx(energies[0], rel=1e-4, abs=0.5)
