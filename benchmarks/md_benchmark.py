#!/usr/bin/env python
"""OpenMM MD-step benchmark of FlashIPAForce (a benchmark that prints a table; never a timed test).

For protein systems of about L residues (copies of examples/data/protein.pdb, 57 residues, placed on a
cubic grid --spacing nm apart, one chain per copy), two kinds of System:

  force  -- "force alone": only the frame atoms N, CA, C of every residue as particles (masses from the
            elements) and only the learned force;
  amber  -- "amber14 + OBC2": all atoms with hydrogens (Modeller.addHydrogens on one copy, then replicated),
            ForceField('amber14-all.xml', 'implicit/obc2.xml'), NoCutoff, HBonds constraints, plus the
            learned force (capped at --amber-max-residues);

and for each, OpenMM steps/s and ns/day with LangevinMiddleIntegrator(300 K, 1/ps, 2 fs) for the variants

  a  FlashIPAForce, CUDA graphs on (property useCUDAGraphs=true, the default)
  b  FlashIPAForce, CUDA graphs off (useCUDAGraphs=false)
  c  the PyTorch twin of the model in an openmm.PythonForce (openmmflashipa.pythonforce.createPythonForce,
     float32, on the GPU when the platform is CUDA, else on the CPU): how openmm-ml 1.8 runs models
  d  openmmtorch.TorchForce driving a traced twin (when openmmtorch can be imported)
  e  the same System without any learned force (baseline)

In "force alone" mode the model alone is timed too (for (a): the plugin's C++ model replayed from a CUDA
graph by the build's flashipa-bench-model; for (b): the PyTorch twin, eager), and the plugin's per-step
overhead beyond the model's own time is estimated as  overhead = 1/steps_per_s(a) - t_model - 1/steps_per_s(e).

Prints one Markdown table (progress goes to stderr); --out also writes it to a file, with the raw numbers
as JSON next to it. See benchmarks/README.md.

Usage:  python benchmarks/md_benchmark.py [--lengths 128,512,2048,8192] [--steps 200] [--max-seconds 20]
            [--platform CUDA] [--precision mixed] [--kinds force,amber] [--variants a,b,c,d,e]
            [--amber-max-residues 2048] [--out results.md]
Smoke run on a CPU machine:
        OMP_NUM_THREADS=2 python benchmarks/md_benchmark.py --platform Reference --lengths 57 --steps 3
"""

import argparse
import copy
import datetime
import gc
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
import warnings

# torch before the plugin's extension (openmmflashipa does this too; see its __init__).
import torch

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit

import openmmflashipa
from openmmflashipa import pythonforce, torch_twin

HERE = os.path.dirname(os.path.abspath(__file__))
PROTEIN_PDB = os.path.join(HERE, "..", "examples", "data", "protein.pdb")

TEMPERATURE = 300.0  # K
FRICTION = 1.0  # 1/ps
TIMESTEP_FS = 2.0
NS_PER_DAY_PER_STEP_PER_S = TIMESTEP_FS * 1e-6 * 86400.0  # ns/day = steps/s * this
LARGE_L = 2048  # above this many residues the timed steps are scaled down (see stepsFor)

KINDS = {"force": "force alone (N, CA, C)", "amber": "amber14 + OBC2"}
VARIANTS = {
    "a": "(a) FlashIPAForce, CUDA graphs",
    "b": "(b) FlashIPAForce, no graphs",
    "c": "(c) PyTorch twin in PythonForce",
    "d": "(d) openmmtorch TorchForce",
    "e": "(e) no learned force",
}
MEASURE_ORDER = "eabcd"  # the baseline first; rows are printed a..e



# Attention backend given to FlashIPAForce and flashipa-bench-model (--backend); None = the default.
ATTENTION_BACKEND = None

def log(message):
    print("[md_benchmark %s] %s" % (time.strftime("%H:%M:%S"), message), file=sys.stderr, flush=True)


def shortError(error, limit=160):
    text = "%s: %s" % (type(error).__name__, str(error).strip().splitlines()[0] if str(error).strip() else "")
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------------

def gpuName():
    """(name, how it was found)."""
    try:
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.cuda.current_device()), "torch.cuda.get_device_name"
    except Exception:
        pass
    try:
        output = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=30)
        names = [line.strip() for line in output.stdout.splitlines() if line.strip()]
        if output.returncode == 0 and names:
            return ", ".join(names), "nvidia-smi"
    except Exception:
        pass
    return "none found", "torch.cuda and nvidia-smi"


def openmmTorchStatus():
    """(module or None, description)."""
    try:
        import openmmtorch
    except Exception as error:
        return None, "not installed (%s)" % shortError(error, 80)
    return openmmtorch, getattr(openmmtorch, "__version__", "installed")


# ---------------------------------------------------------------------------------------------------------
# Systems
# ---------------------------------------------------------------------------------------------------------

def frameAtomTopology(topology, positions):
    """A topology and positions (nm, numpy) holding only N, CA, C of every residue that has all three."""
    frames, _ = openmmflashipa.selectFrameResidues(topology)
    result = app.Topology()
    chain = result.addChain(id="A")
    kept = []
    for frame in frames:
        residue = result.addResidue(frame.residue.name, chain, id=frame.residue.id)
        atoms = {atom.index: atom for atom in frame.residue.atoms()}
        for index in frame.atoms:
            result.addAtom(atoms[index].name, atoms[index].element, residue)
            kept.append(index)
    return result, positions[kept]


def replicate(topology, positions, copies, spacing):
    """`copies` copies of a one-chain topology (own chain each, bonds kept), their centroids on a cubic grid
    `spacing` nm apart. Returns (topology, positions in nm as numpy [N, 3])."""
    side = max(1, int(math.ceil(copies ** (1.0 / 3.0) - 1e-9)))
    centred = positions - positions.mean(axis=0)
    result = app.Topology()
    blocks = []
    for k in range(copies):
        offset = spacing * np.array([k % side, (k // side) % side, k // (side * side)], dtype=float)
        chain = result.addChain(id=str(k))
        mapping = {}
        for residue in topology.residues():
            newResidue = result.addResidue(residue.name, chain, id=residue.id, insertionCode=residue.insertionCode)
            for atom in residue.atoms():
                mapping[atom] = result.addAtom(atom.name, atom.element, newResidue, id=atom.id)
        for bond in topology.bonds():
            result.addBond(mapping[bond[0]], mapping[bond[1]], type=bond.type, order=bond.order)
        blocks.append(centred + offset)
    return result, np.concatenate(blocks)


class Template:
    """One copy of the protein for a kind: topology and positions (nm, numpy)."""

    def __init__(self, kind, forcefield):
        pdb = app.PDBFile(PROTEIN_PDB)
        positions = np.array(pdb.positions.value_in_unit(unit.nanometer))
        if kind == "force":
            self.topology, self.positions = frameAtomTopology(pdb.topology, positions)
        else:
            modeller = app.Modeller(pdb.topology, pdb.positions)
            modeller.addHydrogens(forcefield)
            self.topology = modeller.topology
            self.positions = np.array(modeller.positions.value_in_unit(unit.nanometer))
        self.residues = self.topology.getNumResidues()


def buildBase(kind, template, copies, spacing, forcefield):
    """(topology, positions Quantity, base System without a learned force, build seconds)."""
    start = time.perf_counter()
    topology, positions = replicate(template.topology, template.positions, copies, spacing)
    if kind == "force":
        system = openmm.System()
        for atom in topology.atoms():
            system.addParticle(atom.element.mass)
    else:
        system = forcefield.createSystem(topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds)
    return topology, unit.Quantity(positions, unit.nanometer), system, time.perf_counter() - start


class TracedTwin(torch.nn.Module):
    """For TorchForce: U(positions of all particles) in kJ/mol from the frame atoms (constant parameters)."""

    def __init__(self, model, frameIndices, types, chains, sigma, factor):
        super().__init__()
        self.model = model
        self.register_buffer("index", frameIndices)
        self.register_buffer("types", types)
        self.register_buffer("chains", chains)
        self.register_buffer("sigma", sigma)
        self.factor = factor

    def forward(self, positions):
        parameter = self.sigma
        atoms = positions.to(parameter.dtype)[self.index].view(1, -1, 3, 3)
        return self.model(atoms, self.types, self.chains, self.sigma, checked=False).sum() * self.factor


def createTorchForce(openmmtorch, topology, positions, device, dtype):
    frames, _ = openmmflashipa.selectFrameResidues(topology)
    model = torch_twin.load_energy_model(None, device=device, dtype=dtype)
    index = torch.tensor([i for frame in frames for i in frame.atoms], dtype=torch.int64, device=device)
    types = torch.tensor([[frame.residueType for frame in frames]], dtype=torch.int64, device=device)
    chains = torch.tensor([[frame.chain for frame in frames]], dtype=torch.int64, device=device)
    sigma = torch.tensor(pythonforce.DEFAULT_SIGMA, dtype=dtype, device=device)
    factor = pythonforce.DEFAULT_SCALE * torch_twin.BOLTZMANN_KJ_PER_MOL_K * pythonforce.DEFAULT_TEMPERATURE
    module = TracedTwin(model, index, types, chains, sigma, factor)
    example = torch.tensor(positions.value_in_unit(unit.nanometer), dtype=torch.float32, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, (example,), check_trace=False)
    try:
        return openmmtorch.TorchForce(traced)
    except Exception:  # older openmmtorch: from a file
        handle, path = tempfile.mkstemp(suffix=".pt")
        os.close(handle)
        traced.save(path)
        try:
            return openmmtorch.TorchForce(path)
        finally:
            os.remove(path)


def addLearnedForce(variant, system, topology, positions, args, openmmtorch):
    """Add the variant's learned force to `system` (none for 'e'); returns a note or ''."""
    if variant in "ab":
        force = openmmflashipa.createForce(topology, strict=True, backend=ATTENTION_BACKEND)
        force.setProperty("useCUDAGraphs", "true" if variant == "a" else "false")
        if system.getNumForces() == 0:
            # Force alone (no bonds): a frame can pass through a degenerate shape, which the default policy
            # refuses; "skip" leaves such residues out and counts them (docs/DESIGN-DECISIONS.md).
            force.setDegenerateFramePolicy("skip")
        force.setForceGroup(1)
        system.addForce(force)
        return "" if args.platform == "CUDA" else "useCUDAGraphs has no effect on %s" % args.platform
    if variant == "c":
        force = pythonforce.createPythonForce(topology, device=args.twinDevice, dtype=args.twinDtypeName, strict=True)
        force.setForceGroup(1)
        system.addForce(force)
        return "twin on %s, %s" % (args.twinDevice, args.twinDtypeName)
    if variant == "d":
        force = createTorchForce(openmmtorch, topology, positions, args.twinDevice, args.twinDtype)
        force.setForceGroup(1)
        system.addForce(force)
        return "traced twin on %s, %s" % (args.twinDevice, args.twinDtypeName)
    return ""


# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------

def stepsFor(residues, args):
    """Timed steps for a system of `residues` residues: --steps, scaled by LARGE_L/L above LARGE_L residues
    (at least --min-steps); --max-seconds may stop the loop earlier."""
    if residues <= LARGE_L:
        return args.steps
    return max(args.min_steps, int(round(args.steps * LARGE_L / residues)))


def runSteps(integrator, target, budget, start):
    """Step in growing chunks until `target` steps or `budget` seconds since `start` (at least one step)."""
    done = 0
    while done < target:
        elapsed = time.perf_counter() - start
        if done and elapsed >= budget:
            break
        if done:
            perStep = elapsed / done
            n = int(max(1, min(target - done, 2 * done, (budget - elapsed) / max(perStep, 1e-9))))
        else:
            n = 1
        integrator.step(n)
        done += n
    return done


def measure(system, positions, platform, properties, residues, args):
    """Time the MD loop of one System; returns a dict of raw numbers."""
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE * unit.kelvin, FRICTION / unit.picosecond,
                                                 TIMESTEP_FS * unit.femtoseconds)
    integrator.setRandomNumberSeed(2024)
    start = time.perf_counter()
    context = None
    try:
        context = openmm.Context(system, integrator, platform, properties)
        context.setPositions(positions)
        context.setVelocitiesToTemperature(TEMPERATURE * unit.kelvin, 2024)
        context.getState(getEnergy=True)
        setup = time.perf_counter() - start
        result = {"setup_s": setup}
        if platform.getName() == "CUDA":
            try:
                result["openmm_device"] = platform.getPropertyValue(context, "DeviceName")
            except Exception:
                pass
        # Warm-up (includes CUDA graph capture and the first, slower evaluations).
        start = time.perf_counter()
        warm = runSteps(integrator, args.warmup, args.max_seconds, start) if args.warmup > 0 else 0
        context.getState(getEnergy=True)
        result.update(warmup_steps=warm, warmup_s=time.perf_counter() - start)
        # Timed loop, synchronised by getState(getEnergy=True) before and after.
        target = stepsFor(residues, args)
        context.getState(getEnergy=True)
        start = time.perf_counter()
        steps = runSteps(integrator, target, args.max_seconds, start)
        state = context.getState(getEnergy=True)
        elapsed = time.perf_counter() - start
        energy = state.getPotentialEnergy().value_in_unit(unit.kilojoules_per_mole)
        result.update(steps=steps, target_steps=target, seconds=elapsed, steps_per_s=steps / elapsed,
                      ns_per_day=steps / elapsed * NS_PER_DAY_PER_STEP_PER_S, ms_per_step=1e3 * elapsed / steps,
                      final_potential_kj_mol=energy, budget_hit=steps < target)
        return result
    finally:
        del context, integrator


def timeModel(topology, positions, args):
    """Time the twin model alone on the frame atoms: energy + forces (autograd), eager and (on CUDA) as a
    captured CUDA graph. Returns a dict (ms per evaluation; None where not measured, with the reason)."""
    frames, _ = openmmflashipa.selectFrameResidues(topology)
    device, dtype = torch.device(args.twinDevice), args.twinDtype
    xyz = positions.value_in_unit(unit.nanometer)
    atoms = torch.tensor(np.array([[xyz[i] for i in frame.atoms] for frame in frames]), dtype=dtype, device=device)
    types = torch.tensor([frame.residueType for frame in frames], dtype=torch.int64, device=device)
    chains = torch.tensor([frame.chain for frame in frames], dtype=torch.int64, device=device)
    sigma = torch.tensor(pythonforce.DEFAULT_SIGMA, dtype=dtype, device=device)
    model = torch_twin.load_energy_model(None, device=device, dtype=dtype)
    cuda = device.type == "cuda"

    def evaluate():
        return torch_twin.energy_and_forces(model, atoms, types, chains, sigma, scale=pythonforce.DEFAULT_SCALE,
                                            temperature=pythonforce.DEFAULT_TEMPERATURE, checked=False)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def timeLoop(call):
        for _ in range(3):
            call()
        sync()
        start = time.perf_counter()
        n = 0
        while n < args.model_reps and (n < 3 or time.perf_counter() - start < args.max_seconds):
            call()
            n += 1
            if n % 10 == 0:
                sync()
        sync()
        return 1e3 * (time.perf_counter() - start) / n, n

    result = {"model_device": str(device), "model_dtype": str(dtype).replace("torch.", "")}
    result["model_eager_ms"], result["model_eager_reps"] = timeLoop(evaluate)
    # The graph-replayed model time is the plugin's own model (same C++ code as the CUDA platform),
    # measured by flashipa-bench-model: the right base for the plugin's overhead.
    result["model_graph_ms"] = None
    if not cuda:
        result["model_graph_note"] = "no CUDA graph on %s" % device
    else:
        try:
            result["model_graph_ms"] = pluginModelGraphMs(len(frames))
            result["model_graph_source"] = "flashipa-bench-model (the plugin's C++ model, graph replay)"
        except Exception as error:
            result["model_graph_note"] = "flashipa-bench-model failed: " + shortError(error, 100)
    del model
    return result


def pluginModelGraphMs(residues):
    """GPU time (ms) of one graph-replayed evaluation of the plugin's C++ model at this length, from the
    build's flashipa-bench-model (next to the plugin libraries: <build>/bin)."""
    import subprocess
    from openmmflashipa import _plugins
    binary = os.path.join(os.path.dirname(_plugins.pluginDirectory()), "bin", "flashipa-bench-model")
    output = subprocess.run([binary, "--lengths", str(residues), "--backend", ATTENTION_BACKEND or openmmflashipa.FlashIPAForce().getAttentionBackend()], check=True,
                            capture_output=True, text=True).stdout
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] == str(residues):
            return float(cells[1])
    raise RuntimeError("no timing for L=%d in flashipa-bench-model output" % residues)


def releaseMemory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------

def fmt(value, digits=3):
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if value == 0 or not math.isfinite(value):
        return "%g" % value
    magnitude = int(math.floor(math.log10(abs(value))))
    decimals = max(0, digits - 1 - magnitude)
    return "%.*f" % (decimals, value)


def markdown(meta, rows):
    lines = [
        "## FlashIPAForce OpenMM MD benchmark",
        "",
        "- GPU: %s (from %s)%s" % (meta["gpu"], meta["gpu_source"],
                                   "; OpenMM CUDA device: %s" % meta["openmm_device"] if meta.get("openmm_device") else ""),
        "- OpenMM %s, platform %s%s; torch %s; openmmtorch %s; openmmflashipa from this checkout"
        % (meta["openmm_version"], meta["platform"],
           " (Precision=%s)" % meta["precision"] if meta["platform_properties"].get("Precision") else "",
           meta["torch_version"], meta["openmmtorch"]),
        "- LangevinMiddleIntegrator(300 K, 1/ps, 2 fs); %d warm-up steps, then up to --steps %d timed steps "
        "(scaled by %d/L above L = %d, at least %d) or --max-seconds %g s, whichever ends first"
        % (meta["warmup"], meta["steps"], LARGE_L, LARGE_L, meta["min_steps"], meta["max_seconds"]),
        "- date: %s" % meta["date"],
        "- command: `%s`" % meta["command"],
        "",
        "| system | L (residues) | particles | variant | steps | time (s) | steps/s | ns/day | ms/step "
        "| learned force ms/step (vs e) | model ms | plugin overhead ms/step | note |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            KINDS[row["kind"]], row["residues"], row.get("particles", "—"), VARIANTS[row["variant"]],
            row.get("steps", "—"), fmt(row.get("seconds")), fmt(row.get("steps_per_s")), fmt(row.get("ns_per_day")),
            fmt(row.get("ms_per_step")), fmt(row.get("force_ms_per_step")), row.get("model_ms_text", "—"),
            fmt(row.get("overhead_ms")), row.get("note", "").replace("|", "/") or ""))
    lines += [
        "",
        "Learned force ms/step = ms/step(variant) − ms/step(e) of the same system. Model ms: one evaluation of "
        "the model alone (energy + forces + parameter derivatives): for row (a) the plugin's own C++ model "
        "replayed from a CUDA graph (flashipa-bench-model, the exact work the CUDA platform does), for row (b) "
        "the PyTorch twin run eagerly (%s). Plugin overhead ms/step = 1/steps_per_s(a or b) − model time − "
        "1/steps_per_s(e): the per-step cost beyond the model's own GPU time (gather, scatter, stream/context "
        "switches, host work); \"force alone\" systems only. Timings from separate runs; differences below "
        "~0.1 ms are within run-to-run noise." % meta.get("twin", "?"),
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------

def parseArguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default=None, choices=["auto", "fused", "fused-fp32", "sdpa", "math"],
                        help="attention backend of FlashIPAForce (default: the force's default)")
    parser.add_argument("--lengths", default="128,512,2048,8192",
                        help="approximate residue counts, comma separated (rounded to copies of the 57-residue "
                             "protein; default %(default)s)")
    parser.add_argument("--kinds", default="force,amber", help="system kinds: force, amber (default %(default)s)")
    parser.add_argument("--variants", default="a,b,c,d,e", help="variants a-e (default %(default)s)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps (default %%(default)s; scaled down "
                                                               "above %d residues)" % LARGE_L)
    parser.add_argument("--min-steps", type=int, default=20, help="least timed steps after scaling (default "
                                                                  "%(default)s)")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up steps (default %(default)s)")
    parser.add_argument("--max-seconds", type=float, default=20.0,
                        help="time budget of each warm-up and each timed loop (default %(default)s)")
    parser.add_argument("--model-reps", type=int, default=200,
                        help="evaluations of the twin model when timing it alone (default %(default)s)")
    parser.add_argument("--amber-max-residues", type=int, default=2048,
                        help="skip amber14 systems larger than this (default %(default)s)")
    parser.add_argument("--spacing", type=float, default=4.0, help="grid spacing of the copies, nm (default "
                                                                   "%(default)s)")
    parser.add_argument("--platform", default="CUDA", help="OpenMM platform (default %(default)s)")
    parser.add_argument("--precision", default="mixed", choices=["single", "mixed", "double"],
                        help="CUDA/OpenCL Precision property (default %(default)s)")
    parser.add_argument("--out", help="also write the Markdown table here, and the raw numbers to the same "
                                      "name with .json (or --json)")
    parser.add_argument("--json", help="where to write the raw numbers (default: --out with .json)")
    args = parser.parse_args(argv)
    args.lengthList = [int(x) for x in args.lengths.split(",") if x.strip()]
    args.kindList = [x.strip() for x in args.kinds.split(",") if x.strip()]
    args.variantList = [x.strip() for x in args.variants.split(",") if x.strip()]
    for kind in args.kindList:
        if kind not in KINDS:
            parser.error("unknown kind %r (force, amber)" % kind)
    for variant in args.variantList:
        if variant not in VARIANTS:
            parser.error("unknown variant %r (a-e)" % variant)
    if args.steps < 1 or args.min_steps < 1 or args.warmup < 0 or args.model_reps < 1:
        parser.error("--steps, --min-steps and --model-reps must be positive, --warmup not negative")
    if args.json is None and args.out:
        args.json = os.path.splitext(args.out)[0] + ".json"
    return args


def main(argv=None):
    global ATTENTION_BACKEND
    args = parseArguments(sys.argv[1:] if argv is None else argv)
    ATTENTION_BACKEND = args.backend
    platform = openmm.Platform.getPlatformByName(args.platform)
    properties = {"Precision": args.precision} if "Precision" in platform.getPropertyNames() else {}
    useCuda = args.platform in ("CUDA", "OpenCL", "HIP") and torch.cuda.is_available()
    args.twinDevice = "cuda" if useCuda else "cpu"
    args.twinDtype = torch.float64 if args.precision == "double" else torch.float32
    args.twinDtypeName = "float64" if args.precision == "double" else "float32"
    openmmtorch, openmmtorchText = openmmTorchStatus()
    gpu, gpuSource = gpuName()
    meta = {
        "gpu": gpu, "gpu_source": gpuSource, "openmm_version": openmm.__version__, "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda, "openmmtorch": openmmtorchText, "platform": args.platform,
        "platform_properties": properties, "precision": args.precision,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + shlex.join(sys.argv if argv is None else ["md_benchmark.py"] + list(argv)),
        "steps": args.steps, "min_steps": args.min_steps, "warmup": args.warmup, "max_seconds": args.max_seconds,
        "spacing_nm": args.spacing, "twin": "%s, %s" % (args.twinDevice, args.twinDtypeName),
        "flashipa_kernels_on_platform": openmmflashipa.hasPlatformKernels(args.platform),
        "plugin_load_failures": dict(openmmflashipa.pluginLoadFailures),
        "integrator": "LangevinMiddleIntegrator(300 K, 1/ps, 2 fs)",
        "attention_backend": args.backend or "the force's default",
    }
    log("GPU: %s; platform %s %s; openmmtorch: %s" % (gpu, args.platform, properties, openmmtorchText))
    if not meta["flashipa_kernels_on_platform"]:
        log("warning: FlashIPAForce has no kernels on %s (%s)" % (args.platform, meta["plugin_load_failures"]))

    forcefield = app.ForceField("amber14-all.xml", "implicit/obc2.xml") if "amber" in args.kindList else None
    rows = []
    for kind in args.kindList:
        template = Template(kind, forcefield)
        for requested in args.lengthList:
            copies = max(1, int(round(requested / template.residues)))
            residues = copies * template.residues
            kindRows = {v: {"kind": kind, "variant": v, "requested_length": requested, "residues": residues,
                            "copies": copies} for v in args.variantList}
            rows.extend(kindRows[v] for v in args.variantList)
            if kind == "amber" and residues > args.amber_max_residues:
                for row in kindRows.values():
                    row["note"] = "skipped: L > --amber-max-residues %d" % args.amber_max_residues
                log("%s L=%d: skipped (> --amber-max-residues)" % (kind, residues))
                continue
            log("%s L=%d (%d copies): building" % (kind, residues, copies))
            try:
                topology, positions, base, buildSeconds = buildBase(kind, template, copies, args.spacing, forcefield)
            except Exception as error:
                for row in kindRows.values():
                    row["note"] = "system build failed: " + shortError(error)
                log("  build failed: %s" % shortError(error))
                releaseMemory()
                continue
            log("  %d particles, built in %.1f s" % (base.getNumParticles(), buildSeconds))
            for row in kindRows.values():
                row["particles"] = base.getNumParticles()
                row["build_s"] = buildSeconds
            model = None
            if kind == "force" and ("a" in kindRows or "b" in kindRows):
                log("  timing the twin model alone (%s, %s)" % (args.twinDevice, args.twinDtypeName))
                try:
                    model = timeModel(topology, positions, args)
                    log("  model: eager %.3f ms, graph %s ms" % (model["model_eager_ms"], fmt(model["model_graph_ms"])))
                except Exception as error:
                    model = {"model_error": shortError(error)}
                    log("  model timing failed: %s" % model["model_error"])
                releaseMemory()
            for variant in MEASURE_ORDER:
                if variant not in kindRows:
                    continue
                row = kindRows[variant]
                if variant == "d" and openmmtorch is None:
                    row["note"] = "openmmtorch " + openmmtorchText
                    continue
                log("  %s" % VARIANTS[variant])
                system = None
                try:
                    system = copy.deepcopy(base)
                    note = addLearnedForce(variant, system, topology, positions, args, openmmtorch)
                    row.update(measure(system, positions, platform, properties, residues, args))
                    notes = [note] if note else []
                    if row["budget_hit"]:
                        notes.append("stopped at --max-seconds")
                    if not math.isfinite(row["final_potential_kj_mol"]):
                        notes.append("energy not finite at the end")
                    row["note"] = "; ".join(notes)
                    log("    %.3f steps/s (%d steps in %.2f s)" % (row["steps_per_s"], row["steps"], row["seconds"]))
                except Exception as error:
                    row["note"] = "failed: " + shortError(error)
                    log("    failed: %s" % shortError(error))
                finally:
                    del system
                    releaseMemory()
                if "openmm_device" in row and "openmm_device" not in meta:
                    meta["openmm_device"] = row["openmm_device"]
            baseline = kindRows.get("e", {}).get("ms_per_step")
            for variant, row in kindRows.items():
                if variant != "e" and baseline is not None and row.get("ms_per_step") is not None:
                    row["force_ms_per_step"] = row["ms_per_step"] - baseline
            if model is not None:
                for variant, key, label in (("a", "model_graph_ms", "graph"), ("b", "model_eager_ms", "eager")):
                    row = kindRows.get(variant)
                    if row is None:
                        continue
                    row.update(model)
                    modelMs = model.get(key)
                    if modelMs is None and variant == "a" and model.get("model_eager_ms") is not None:
                        modelMs, label = model["model_eager_ms"], "eager"
                    if modelMs is None:
                        row["model_ms_text"] = model.get("model_error", "—")
                        continue
                    row["model_ms"] = modelMs
                    row["model_ms_kind"] = label
                    row["model_ms_text"] = "%s (%s)" % (fmt(modelMs), label)
                    if row.get("ms_per_step") is not None and baseline is not None:
                        row["overhead_ms"] = row["ms_per_step"] - modelMs - baseline
                        row["overhead_formula"] = "1/steps_per_s(%s) - model_%s_time - 1/steps_per_s(e)" % (
                            variant, label)
            del base
            releaseMemory()

    order = {v: i for i, v in enumerate("abcde")}
    kindOrder = {k: i for i, k in enumerate(args.kindList)}
    rows.sort(key=lambda r: (kindOrder[r["kind"]], r["residues"], order[r["variant"]]))
    table = markdown(meta, rows)
    print(table, end="")
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(table)
        log("wrote %s" % args.out)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "rows": rows}, handle, indent=1, default=str)
        log("wrote %s" % args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
