"""Self-consistency: generate -> (proteins: design a sequence) -> refine -> simulate with and without the learned
force -> how far it drifts.

``selfConsistency(...)`` runs the whole loop for one generated chain and writes, in ``out``:
``generated.pdb``, ``refined.pdb``, ``trajectory_with.pdb`` / ``trajectory_without.pdb`` (snapshots),
``summary.json`` (every number), ``report.md`` (a short table) and ``selfconsistency.png`` (curves over time).

Measured at every snapshot, against the generated structure (its CA for protein, C4' for RNA):
RMSD after superposition, TM-score; the RMSD to the refined structure (where the simulations start); for proteins the DSSP secondary structure (pydssp; O placed from the
frames so that all-atom and backbone runs are measured alike) and the fraction of the generated helix/strand
residues that keep it; frame-bond violations (|d - ideal| > 0.01 nm: N-CA, CA-C, C-N(i+1); RNA C3'-C4',
C4'-O4'); steric clashes (heavy atoms of residues two or more apart closer than 0.25 nm); the potential
energy and the learned force's share of it; the residue evaluations the learned force left out because a frame
passed through a degenerate shape (backbone level, where restraints rather than a force field hold the frames).
"""

import json
import math
import os

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit

from . import backbone as _backbone
from . import ideal_geometry
from . import metrics
from . import progress as _progress
from .generate import generate, choosePlatform
from .refine import refine, backboneTopology, withoutFlashIPA, repairGeometry, skippedEvaluations
from .structure import Backbone

BOND_TOLERANCE = 0.01  # nm
CLASH_DISTANCE = 0.25  # nm


def _frameIndices(refined):
    """[L, 3] particle indices of the frame atoms in the refined System."""
    if refined.level == "backbone":
        return np.arange(3 * len(refined.frameResidues)).reshape(-1, 3)
    return np.array([f.atoms for f in refined.frameResidues])


def _frameBonds(moltype, length):
    bonds = []
    for i in range(length):
        for a, b, d in ideal_geometry.FRAME_BONDS[moltype]:
            if (a, b) != (0, 2):
                bonds.append((3 * i + a, 3 * i + b, d))
        if moltype == "protein" and i + 1 < length:
            bonds.append((3 * i + 2, 3 * (i + 1), ideal_geometry.LINK["protein"][2]))
    return bonds


def measure(frames, reference, moltype, heavy, heavyResidues, referenceSS=None):
    """Metrics of one snapshot. frames [L, 3, 3] nm; reference [L, 3] (CA / C4' of the generated chain);
    heavy [M, 3] heavy-atom positions with their residue indices; referenceSS from a previous call or None."""
    centre = frames[:, 1]
    result = {"rmsd": metrics.kabschRMSD(centre, reference), "tm_score": metrics.tmScore(centre, reference),
              "radius_of_gyration": metrics.radiusOfGyration(centre)}
    violations = metrics.bondViolations(frames.reshape(-1, 3), _frameBonds(moltype, len(frames)), BOND_TOLERANCE)
    result["bond_violation_fraction"] = violations["fraction"]
    result["clashes"] = int(metrics.clashes(heavy, heavyResidues, CLASH_DISTANCE, 2))
    ss = None
    if moltype == "protein" and len(frames) >= 5:
        ss = metrics.secondaryStructure(_backbone.proteinBackboneWithOxygen(frames))
        result.update({"ss_" + k: v for k, v in metrics.secondaryStructureFractions(ss).items()})
        if referenceSS is not None:
            result["ss_retention"] = metrics.secondaryStructureRetention(ss, referenceSS)
    return result, ss


def designedBackbone(frames, oxygen=None, temperature=0.1, seed=0, weights=None, chainId="A"):
    """A protein Backbone carrying a sequence that ProteinMPNN (openmmflashipa.mpnn) designed for `frames`
    ([L, 3, 3] N, CA, C, nm), and the DesignedSequence. `oxygen` [L, 3]: the carbonyl O where known (NaN rows
    are placed), else every O is placed from ideal geometry. refine builds the side chains (PDBFixer)."""
    from . import mpnn
    frames = np.asarray(frames, dtype=np.float64)
    design = mpnn.designSequence(_backbone.proteinBackboneWithOxygen(frames, oxygen), temperature=temperature,
                                 seed=seed, weights=weights)[0]
    return Backbone(frames, "protein", residueNames=design.residueNames, chainId=chainId), design


def _heavy(topology, refined):
    """(indices of heavy atoms, their residue index among frame residues or by topology order)."""
    if refined.level == "backbone":
        n = 3 * len(refined.frameResidues)
        return np.arange(n), np.arange(n) // 3
    indices, residues = [], []
    for atom in topology.atoms():
        if atom.element is not None and atom.element.symbol != "H":
            indices.append(atom.index)
            residues.append(atom.residue.index)
    return np.array(indices), np.array(residues)


def simulate(refined, withForce, picoseconds, snapshots, platform, temperature, seed, progress, label):
    """Langevin from the refined structure; returns (list of particle positions [N, 3], energies list)."""
    system = refined.system if withForce else withoutFlashIPA(refined.system)
    step_ps = 0.002 if refined.level == "all-atom" else 0.001
    total = int(round(picoseconds / step_ps))
    per_snapshot = max(1, total // snapshots)
    integrator = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, 1.0 / unit.picosecond,
                                                 step_ps * unit.picosecond)
    integrator.setRandomNumberSeed(int(seed))
    context = openmm.Context(system, integrator, choosePlatform(platform))
    context.setPositions(refined.particlePositions)
    context.setVelocitiesToTemperature(temperature * unit.kelvin, int(seed))
    frames, energies, times = [], [], []
    bar = _progress.bar(per_snapshot * snapshots, label, enabled=progress)
    for k in range(snapshots + 1):
        if k:
            integrator.step(per_snapshot)
            bar.update(per_snapshot)
        state = context.getState(getPositions=True, getEnergy=True)
        learned = 0.0
        if withForce:
            learned = context.getState(getEnergy=True, groups={1}).getPotentialEnergy().value_in_unit(
                unit.kilojoule_per_mole)
        frames.append(np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64))
        energies.append({"potential": state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
                         "learned": learned, "skipped_frame_evaluations": skippedEvaluations(context, system)})
        times.append(k * per_snapshot * step_ps)
    bar.close()
    return frames, energies, times


def selfConsistency(moltype="protein", length=50, seed=0, picoseconds=10.0, snapshots=10, out="flashipa-check",
                    platform=None, temperature=300.0, generationSteps=100, refineSteps=500, modelPath=None,
                    progress=True, design=True):
    """Generate one chain, refine it, simulate it with and without the learned force; write the report.

    Proteins (design=True): the generated backbone's frames are repaired and ProteinMPNN designs a sequence for
    it (openmmflashipa.mpnn), so that the all-atom model that is refined and simulated has real side chains
    rather than poly-glycine, which no sequence-aware force field can hold in a fold. The reference of the
    drift is then the repaired backbone (what the sequence was designed for). RNA has no generated base
    sequence: it is refined and simulated as generated.

    Parameters
    ----------
    moltype : 'protein' or 'rna'
    length : int (residues)
    seed : int (generation and Langevin seeds)
    picoseconds : float, length of each simulation
    snapshots : int, measurements per simulation (plus the start)
    out : folder for every output
    platform : OpenMM platform name (default: CUDA if usable, else CPU, else Reference)
    refineSteps : Langevin steps of the refinement, which uses refine's protocol 'md' (unrestrained Langevin,
        then the quench): the protocol the generated-backbone quality report was measured with

    Returns
    -------
    dict: the summary also written to ``out/summary.json``
    """
    if picoseconds <= 0 or snapshots < 1:
        raise ValueError("picoseconds must be positive and snapshots at least 1")
    os.makedirs(out, exist_ok=True)
    generated = generate(moltype, length, 1, seed=seed, numSteps=generationSteps, modelPath=modelPath,
                         progress=progress)[0]
    generated.write(os.path.join(out, "generated.pdb"))
    structure, designed = generated, None
    if moltype == "protein" and design:
        structure, designed = designedBackbone(repairGeometry(generated, platform=platform).frames, seed=seed,
                                               chainId=generated.chainId)
    refined = refine(structure, out=os.path.join(out, "refined.pdb"), platform=platform, temperature=temperature,
                     protocol="md", steps=refineSteps, seed=seed, modelPath=modelPath, progress=progress)
    reference = structure.frames[:, 1]
    indices = _frameIndices(refined)
    heavy, heavy_residues = _heavy(refined.topology, refined)
    refined_reference = refined.particlePositions[indices][:, 1]  # the drift proper: from where MD starts
    summary = {"moltype": moltype, "length": length, "seed": seed, "picoseconds": picoseconds,
               "temperature_K": temperature, "refinement": {"level": refined.level, "energies": refined.energies},
               "platform": choosePlatform(platform).getName(), "runs": {}}
    if designed is not None:
        summary["designed_sequence"] = designed.sequence
        summary["design_score"] = float(designed.score)
        summary["repair_rmsd"] = float(metrics.kabschRMSD(structure.frames[:, 1], generated.frames[:, 1]))
    _, generated_ss = measure(structure.frames, reference, moltype, structure.frames.reshape(-1, 3),
                              np.repeat(np.arange(length), 3))
    if generated_ss is not None:
        summary["generated_ss"] = "".join(generated_ss)
    for with_force in (True, False):
        name = "with" if with_force else "without"
        positions, energies, times = simulate(refined, with_force, picoseconds, snapshots, platform, temperature,
                                              seed, progress, "self-consistency %s the learned force" % name)
        series = []
        for xyz, energy, t in zip(positions, energies, times):
            values, _ = measure(xyz[indices], reference, moltype, xyz[heavy], heavy_residues, generated_ss)
            values["rmsd_to_refined"] = metrics.kabschRMSD(xyz[indices][:, 1], refined_reference)
            values.update(time_ps=t, **energy)
            series.append(values)
        _writeTrajectory(refined, positions, os.path.join(out, "trajectory_%s.pdb" % name))
        summary["runs"][name] = {"final": series[-1], "series": series}
    _check_finite(summary)
    with open(os.path.join(out, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    _plot(summary, os.path.join(out, "selfconsistency.png"))
    with open(os.path.join(out, "report.md"), "w") as handle:
        handle.write(markdown(summary))
    return summary


def _writeTrajectory(refined, positions, path):
    with open(path, "w") as handle:
        app.PDBFile.writeHeader(refined.topology, handle)
        for k, xyz in enumerate(positions):
            if refined.level == "backbone":
                topology, pos = backboneTopology(refined.frameResidues, xyz.reshape(-1, 3, 3), refined.segments)
            else:
                topology, pos = refined.topology, unit.Quantity(xyz, unit.nanometer)
            app.PDBFile.writeModel(topology, pos, handle, modelIndex=k + 1)
        app.PDBFile.writeFooter(refined.topology, handle)


def _check_finite(summary):
    for name, run in summary["runs"].items():
        for row in run["series"]:
            for key, value in row.items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise RuntimeError("self-consistency produced a non-finite %s in the run %s the force"
                                       % (key, name))


def markdown(summary):
    """A short Markdown report of a summary dict."""
    lines = ["# Self-consistency: %s, %d residues, seed %d" % (summary["moltype"], summary["length"], summary["seed"]),
             "", "Refinement: %s level; %g ps Langevin at %g K on %s, with and without the learned force." % (
                 summary["refinement"]["level"], summary["picoseconds"], summary["temperature_K"],
                 summary["platform"]), "",
             "| at the end | with force | without force |", "|---|---|---|"]
    keys = [("rmsd", "RMSD to generated (nm)", 3), ("rmsd_to_refined", "RMSD to refined (nm)", 3), ("tm_score", "TM-score to generated", 3),
            ("ss_retention", "secondary-structure retention", 2), ("bond_violation_fraction",
                                                                    "frame-bond violations (fraction)", 3),
            ("clashes", "clashes", 0), ("radius_of_gyration", "radius of gyration (nm)", 2),
            ("potential", "potential energy (kJ/mol)", 0), ("learned", "learned-force energy (kJ/mol)", 0),
            ("skipped_frame_evaluations", "residue evaluations left out (degenerate frames)", 0)]
    for key, label, digits in keys:
        cells = []
        for name in ("with", "without"):
            value = summary["runs"][name]["final"].get(key)
            cells.append("-" if value is None else ("%.*f" % (digits, value)))
        lines.append("| %s | %s |" % (label, " | ".join(cells)))
    if "designed_sequence" in summary:
        lines += ["", "Designed sequence (ProteinMPNN, score %.2f; the frame repair moved the generated backbone %.3f nm "
                  "Calpha RMSD, and the drift is measured from the repaired one): `%s`" % (
                      summary["design_score"], summary["repair_rmsd"], summary["designed_sequence"])]
    if "generated_ss" in summary:
        lines += ["", "Generated secondary structure (DSSP, H/E/-): `%s`" % summary["generated_ss"]]
    lines += ["", "Plots: `selfconsistency.png`; every number: `summary.json`.", ""]
    return "\n".join(lines)


def _plot(summary, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("rmsd", "RMSD to generated (nm)"), ("rmsd_to_refined", "RMSD to refined (nm)"),
              ("tm_score", "TM-score"), ("potential", "potential (kJ/mol)")]
    if summary["moltype"] == "protein":
        panels.insert(2, ("ss_retention", "SS retention"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, label) in zip(axes, panels):
        for name, style in (("with", "-"), ("without", "--")):
            series = summary["runs"][name]["series"]
            xs = [row["time_ps"] for row in series if row.get(key) is not None]
            ys = [row[key] for row in series if row.get(key) is not None]
            ax.plot(xs, ys, style, marker="o", ms=3, label="%s force" % name)
        ax.set_xlabel("time (ps)")
        ax.set_ylabel(label)
    axes[0].legend()
    fig.suptitle("%s, %d residues: drift from the generated structure" % (summary["moltype"], summary["length"]))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
