"""The ``flashipa`` command on bad input: one-line errors (argparse's usage error, exit code 2, for bad
arguments; exit code 1 for inputs that fail), batches that go on past a failed input, no empty output folder,
and no silent fall-back to another platform.

Oracles: the exit codes and messages the command documents, the files on disk, and the residue this test itself
damaged."""

import os

import gemmi
import numpy as np
import openmm.app as app
import openmm.unit as unit
import pytest

from openmmflashipa import cli, hasPlatformKernels
from openmmflashipa.generate import generate

from flashipa_testutils import PROTEIN_PDB


def _one_line_error(text, *needles):
    lines = [line for line in text.strip().splitlines() if "error:" in line]
    assert lines and "Traceback" not in text, text
    for needle in needles:
        assert any(needle in line for line in lines), (needle, text)


@pytest.mark.parametrize("argv, needle", [
    (["refine", "x.pdb", "--sigma", "0"], "--sigma"),
    (["refine", "x.pdb", "--sigma", "nan"], "--sigma"),
    (["refine", "x.pdb", "--iterations", "-1"], "--iterations"),
    (["bench", "--lengths", "0"], "--lengths"),
    (["bench", "--lengths", "10,abc"], "--lengths"),
    (["generate", "--length", "1"], "--length"),
    (["check", "--ps", "0"], "--ps"),
    (["generate", "--score-scale", "0"], "--score-scale"),
    (["evaluate", "--score-scale", "-1"], "--score-scale"),
])
def test_bad_arguments_are_usage_errors(argv, needle, capsys, tmp_path):
    # Before: --sigma 0 and bench --lengths 0 ended in OpenMMException tracebacks (exit code 1).
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv + ["--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    _one_line_error(capsys.readouterr().err, needle)
    assert not (tmp_path / "out").exists()


def _coincident_residue(path, residue_id="10"):
    """The SH3 domain with every atom of one residue at one far point (90 nm from the rest)."""
    pdb = app.PDBFile(PROTEIN_PDB)
    positions = np.array(pdb.positions.value_in_unit(unit.nanometer))
    for atom in pdb.topology.atoms():
        if atom.residue.id == residue_id:
            positions[atom.index] = 90.0
    positions = unit.Quantity(positions, unit.nanometer)
    with open(path, "w") as handle:
        app.PDBFile.writeFile(pdb.topology, positions, handle, keepIds=True)


def test_a_failed_input_does_not_stop_the_batch(tmp_path, capsys):
    # Before: coincident atoms gave a ZeroDivisionError traceback from PDBFixer's hydrogen placement, and the
    # first failed input ended the batch.
    bad = str(tmp_path / "coincident.pdb")
    _coincident_residue(bad)
    good = str(tmp_path / "gen" / "protein_0.pdb")
    generate("protein", 6, 1, seed=0, numSteps=5, progress=False)[0].write(good)
    out = tmp_path / "refined"
    code = cli.main(["refine", bad, str(tmp_path / "missing.pdb"), good, "--iterations", "5", "--platform", "CPU",
                     "--quiet", "--out", str(out)])
    assert code == 1
    captured = capsys.readouterr()
    _one_line_error(captured.err, "coincident.pdb", "LEU 10 (chain A)", "missing.pdb", "2 of 3 input(s) failed")
    assert os.listdir(out) == ["protein_0_refined.pdb"]
    assert "protein_0_refined.pdb" in captured.out


def test_no_empty_output_folder_after_a_failure(tmp_path, capsys):
    bad = str(tmp_path / "coincident.pdb")
    _coincident_residue(bad)
    assert cli.main(["refine", bad, "--quiet", "--platform", "CPU", "--out", str(tmp_path / "refined")]) == 1
    _one_line_error(capsys.readouterr().err, "LEU 10 (chain A)")
    assert not (tmp_path / "refined").exists()
    # A folder that existed before is left alone.
    (tmp_path / "mine").mkdir()
    assert cli.main(["refine", bad, "--quiet", "--platform", "CPU", "--out", str(tmp_path / "mine")]) == 1
    assert (tmp_path / "mine").is_dir()


@pytest.mark.skipif(hasPlatformKernels("CUDA"), reason="CUDA is usable here")
def test_generate_on_an_unusable_platform_is_an_error(tmp_path, capsys):
    # Before: the sampler ignored --platform and ran on the CPU.
    code = cli.main(["generate", "--platform", "CUDA", "--length", "5", "--steps", "2", "--quiet",
                     "--out", str(tmp_path / "gen")])
    assert code == 1
    _one_line_error(capsys.readouterr().err, "CUDA")
    assert not (tmp_path / "gen").exists()


def test_refine_reports_level_rmsd_energy_terms_and_what_it_left_out(tmp_path, capsys, monkeypatch):
    # Before: one line ("x -> y (all-atom level; energy a -> b kJ/mol)"), silent about what was dropped.
    # Oracles: the RMSD recomputed here from the input and output files (gemmi, heavy atoms matched by chain,
    # residue number and name), the per-term energies summing to the printed total, the ion this test added.
    import gemmi
    from openmmflashipa import refine as refine_module
    from flashipa_testutils import RNA_PDB
    monkeypatch.setattr(refine_module, "PRERELAX_ITERATIONS", 20)
    lines = [line for line in open(RNA_PDB) if line.startswith("ATOM") and 2 <= int(line[22:26]) <= 7]
    lines.append("HETATM 9999 NA    NA A 101      20.000  40.000  30.000  1.00  0.00          NA\n")
    path = tmp_path / "rna_ion.pdb"
    path.write_text("".join(lines) + "END\n")
    assert cli.main(["refine", str(path), "--iterations", "10", "--platform", "CPU", "--quiet",
                     "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "level: all-atom" in out
    rmsd = float(out.split("RMSD from the input: ")[1].split()[0])

    def heavy(p):
        return {(ch.name, r.seqid.num, a.name): np.array(a.pos.tolist()) / 10.0 for ch in gemmi.read_structure(p)[0]
                for r in ch for a in r if a.element.name != "H" and r.name != "NA"}
    before, after = heavy(str(path)), heavy(str(tmp_path / "out" / "rna_ion_refined.pdb"))
    keys = [k for k in before if k in after]
    expected = np.sqrt(np.mean([np.sum((before[k] - after[k]) ** 2) for k in keys]))
    assert rmsd == pytest.approx(expected, abs=2e-3)
    table = out.split("term")[1].split("left out")[0].strip().splitlines()[1:]
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in table}
    assert {"NonbondedForce", "GBSAOBCForce", "FlashIPAForce", "total"} <= set(rows)
    for column in (0, 1):
        assert sum(v[column] for k, v in rows.items() if k != "total") == pytest.approx(rows["total"][column],
                                                                                          abs=0.1 * len(rows))
    assert "NA 101 (chain A): ion, kept fixed" in out


def test_generate_passes_the_score_scale_to_the_sampler(tmp_path, capsys):
    # The command's backbone equals generate()'s at the same lambda, and lambda is not ignored on the way.
    argv = ["generate", "--length", "6", "--steps", "3", "--platform", "CPU", "--quiet", "--format", "pdb"]
    assert cli.main(argv + ["--score-scale", "3", "--out", str(tmp_path / "a")]) == 0
    written = gemmi.read_structure(str(tmp_path / "a" / "protein_0.pdb"))
    ca = np.array([[a.pos.x, a.pos.y, a.pos.z] for r in written[0][0] for a in r if a.name == "CA"]) / 10.0
    scaled = generate("protein", 6, 1, numSteps=3, platform="CPU", progress=False, scoreScale=3.0)[0].frames[:, 1]
    plain = generate("protein", 6, 1, numSteps=3, platform="CPU", progress=False)[0].frames[:, 1]
    assert np.max(np.abs(ca - scaled)) < 2e-3  # PDB coordinates: 0.001 nm
    assert np.max(np.abs(plain - scaled)) > 0.02


def test_evaluate_options_given_explicitly_win_over_quick(monkeypatch, tmp_path, capsys):
    from openmmflashipa import evaluation
    seen = {}

    def fake_evaluate(out, dataset, manifest, data, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")  # reported as a failed command (exit code 1)
    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    argv = ["evaluate", "--sections", "generation", "--quick", "--out", str(tmp_path / "e"), "--quiet"]
    assert cli.main(argv + ["--per-length", "3", "--protein-lengths", "60,80", "--steps", "7",
                            "--score-scale", "2.5"]) == 1
    assert (seen["perLength"], seen["proteinLengths"], seen["numSteps"], seen["scoreScale"]) == (3, (60, 80), 7, 2.5)
    assert seen["rnaLengths"] == (40,) and seen["designable"] == 2  # the rest of --quick stays
    seen.clear()
    assert cli.main(argv) == 1
    assert (seen["perLength"], seen["proteinLengths"], seen["numSteps"], seen["scoreScale"]) == (2, (50, 100), 10, 1.0)
