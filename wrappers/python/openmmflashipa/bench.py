"""Quick timings behind ``flashipa bench``: the force per evaluation, and generation throughput.

For the committed benchmark tables see benchmarks/ (those run side by side with their baselines).
"""

import time

import numpy as np
import openmm
import openmm.unit as unit

from .generate import choosePlatform, frameSystem, generate


def _chain(length, seed):
    """A random-walk chain of frame atoms with roughly real bond lengths (nm), [3 L, 3]."""
    rng = np.random.default_rng(seed)
    steps = rng.standard_normal((length, 3))
    steps *= 0.38 / np.linalg.norm(steps, axis=1, keepdims=True)
    ca = np.cumsum(steps, 0)
    offsets = rng.standard_normal((length, 2, 3)) * 0.08
    return np.concatenate([ca[:, None] + offsets[:, :1], ca[:, None], ca[:, None] + offsets[:, 1:]], 1).reshape(-1, 3)


def timeForce(length, repeats, platform, seed=0, modelPath=None):
    """Median seconds per energy+forces evaluation of a FlashIPAForce on `length` residues."""
    system, _ = frameSystem("protein", length, modelPath)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), choosePlatform(platform))
    positions = _chain(length, seed)
    context.setPositions(positions)
    context.getState(getForces=True, getEnergy=True)  # warm-up (CUDA graphs capture after two)
    context.getState(getForces=True, getEnergy=True)
    times = []
    for k in range(repeats):
        context.setPositions(positions + 1e-4 * k)
        started = time.perf_counter()
        context.getState(getForces=True, getEnergy=True)
        times.append(time.perf_counter() - started)
    return float(np.median(times)), context.getPlatform().getName()


def run(lengths, repeats, platform, generateLength, generateNum, generateSteps, seed, modelPath, progress):
    """Every timing as a dict (see markdown())."""
    lengths = [int(v) for v in lengths]
    if not lengths or min(lengths) < 1:
        raise ValueError("chain lengths must be at least 1 residue, got %s" % (lengths,))
    if int(repeats) < 1:
        raise ValueError("repeats must be at least 1, got %r" % (repeats,))
    table = {"force": [], "generation": []}
    for length in lengths:
        seconds, name = timeForce(length, repeats, platform, seed, modelPath)
        table["force"].append({"length": length, "ms_per_evaluation": 1000 * seconds, "platform": name})
    for method in ("sampler", "openmm"):
        started = time.perf_counter()
        generate("protein", generateLength, generateNum, seed=seed, numSteps=generateSteps, method=method,
                 platform=platform, modelPath=modelPath, progress=progress)
        seconds = time.perf_counter() - started
        table["generation"].append({"method": method, "length": generateLength, "samples": generateNum,
                                    "steps": generateSteps, "seconds": seconds,
                                    "backbones_per_second": generateNum / seconds})
    return table


def markdown(table):
    """The timings as Markdown tables."""
    lines = ["| residues | ms per energy + forces | platform |", "|---|---|---|"]
    for row in table["force"]:
        lines.append("| %d | %.2f | %s |" % (row["length"], row["ms_per_evaluation"], row["platform"]))
    lines += ["", "| generation route | length | samples | steps | seconds | backbones/s |", "|---|---|---|---|---|---|"]
    for row in table["generation"]:
        lines.append("| %s | %d | %d | %d | %.2f | %.2f |" % (row["method"], row["length"], row["samples"],
                                                             row["steps"], row["seconds"],
                                                             row["backbones_per_second"]))
    return "\n".join(lines)
