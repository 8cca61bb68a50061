"""The ``flashipa`` command line: generate, refine, check (self-consistency) and bench.

Run ``flashipa --help`` or ``flashipa <command> --help``; ``python -m openmmflashipa`` is the same program.
"""

import argparse
import json
import math
import os
import sys
import time

from .topology import DEFAULT_SIGMA

DESCRIPTION = """\
Protein and RNA backbones from the learned FlashIPA frame model, inside OpenMM.

  flashipa generate --type protein --length 80 --num 4 --out gen/      new backbones (PDB + mmCIF)
  flashipa refine gen/protein_0.pdb --out refined/                     amber14 + implicit solvent + the model
  flashipa check --type rna --length 40 --ps 20 --out check/           generate -> refine -> simulate, report
  flashipa bench --lengths 100,500,1000                                speed of the force and of generation

Every command takes --platform (CUDA, CPU or Reference; default: the fastest with the plugin's kernels),
--seed (same seed, same result on the same platform) and --out. Lengths are in residues, times in ps,
noise levels (sigma) in nm. The model is the one shipped with the package unless --model names a checkpoint.
"""


def _number(kind, minimum=None, strictly=False):
    """An argparse type: `kind` (int or float), finite, at least (or, strictly, above) `minimum`; a bad value
    becomes argparse's one-line usage error (exit code 2) instead of a traceback from deep inside."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not %s" % (text, "an integer" if kind is int else "a number"))
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError("%r is not a finite number" % text)
        if minimum is not None and (value <= minimum if strictly else value < minimum):
            raise argparse.ArgumentTypeError("%s must be %s %g" % (text, "above" if strictly else "at least", minimum))
        return value
    convert.__name__ = kind.__name__
    return convert


def _lengths(text):
    """argparse type of --lengths: comma-separated chain lengths, each at least 1 residue."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("no length given")
    return [_number(int, 1)(v) for v in values]


def _common(parser, out_default):
    parser.add_argument("--platform", default=None, help="OpenMM platform: CUDA, CPU or Reference (default: fastest)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", default=out_default, help="output folder (default %(default)s)")
    parser.add_argument("--model", default=None, help="model checkpoint (.safetensors; default: the shipped model)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _parser():
    parser = argparse.ArgumentParser(prog="flashipa", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="command")

    g = commands.add_parser("generate", help="generate protein or RNA backbones",
                            description="Generate backbones with the learned model (probability-flow ODE from "
                                        "noise). Proteins come out as poly-glycine, RNA as poly-U backbones.")
    g.add_argument("--type", choices=("protein", "rna"), default="protein", help="molecule type")
    g.add_argument("--length", type=_number(int, 2), default=60, help="residues per chain (default 60)")
    g.add_argument("--num", type=_number(int, 1), default=1, help="number of backbones (default 1)")
    g.add_argument("--steps", type=_number(int, 1), default=100, help="ODE steps (default 100)")
    g.add_argument("--score-scale", type=_number(float, 0, strictly=True), default=1.0, metavar="LAMBDA",
                   help="factor on the model's score (default 1; > 1: low-temperature sampling, more secondary "
                        "structure and more compact chains; docs/MODEL.md)")
    g.add_argument("--method", choices=("sampler", "openmm"), default="sampler",
                   help="sampler: batched C++ (default); openmm: AnnealingIntegrator in an OpenMM Context")
    g.add_argument("--format", choices=("pdb", "cif", "both"), default="both", help="output format")
    _common(g, "flashipa-generated")

    r = commands.add_parser("refine", help="refine PDB/mmCIF structures",
                            description="Refine structures: amber14 + implicit solvent + the learned force (all-atom; "
                                        "chains split at gaps, PDBFixer adds missing atoms and hydrogens, never "
                                        "missing residues), or backbone level for RNA without complete nucleotides. "
                                        "Minimise without, then with the learned force; the default protocol "
                                        "(minimize) stops there. 'restrained', 'anneal' and 'md' add a Langevin run "
                                        "and a final minimisation (the quench; --no-quench keeps the last frame).")
    r.add_argument("inputs", nargs="+", help="PDB or mmCIF files")
    r.add_argument("--protocol", choices=("minimize", "restrained", "anneal", "md"), default=None,
                   help="refinement protocol (default minimize)")
    r.add_argument("--steps", type=_number(int, 0), default=None,
                   help="Langevin steps of the protocols with MD (default 1000; minimize runs none)")
    r.add_argument("--iterations", type=_number(int, 0), default=500, help="minimiser iterations (default 500)")
    r.add_argument("--sigma", type=_number(float, 0.0, strictly=True), default=DEFAULT_SIGMA,
                   help="flashipaSigma, nm, above 0 (default %g, the force's; the model was trained on 0.01-2)"
                   % DEFAULT_SIGMA)
    r.add_argument("--scale", type=_number(float, 0.0), default=1.0, help="flashipaScale; 0 = physics only (default 1)")
    r.add_argument("--level", choices=("auto", "all-atom", "backbone"), default="auto", help="refinement level")
    r.add_argument("--implicit", choices=("obc2", "gbn2"), default="obc2", help="implicit solvent model")
    r.add_argument("--no-quench", action="store_true", help="write the last Langevin frame, not its minimum")
    r.add_argument("--hetero", choices=("fixed", "remove"), default="fixed",
                   help="ligands, ions, waters and other residues amber14 cannot template: kept fixed and written "
                        "back unchanged (default; the polymer is held off them) or removed; the polymer is "
                        "refined all-atom either way")
    _common(r, "flashipa-refined")

    c = commands.add_parser("check", help="self-consistency: generate, refine, simulate, report",
                            description="Generate one chain, refine it, simulate it with and without the learned "
                                        "force, and report the drift (RMSD, TM-score, secondary structure, bond "
                                        "violations, clashes, energies) as JSON, PNG and Markdown.")
    c.add_argument("--type", choices=("protein", "rna"), default="protein", help="molecule type")
    c.add_argument("--length", type=_number(int, 2), default=50, help="residues (default 50)")
    c.add_argument("--ps", type=_number(float, 0.0, strictly=True), default=10.0, help="simulation length per run, ps (default 10)")
    c.add_argument("--snapshots", type=_number(int, 1), default=10, help="measurements per run (default 10)")
    c.add_argument("--refine-steps", type=_number(int, 0), default=500, help="Langevin steps in refinement (default 500)")
    c.add_argument("--no-design", action="store_true",
                   help="proteins: simulate the generated poly-glycine instead of a ProteinMPNN sequence")
    _common(c, "flashipa-check")

    b = commands.add_parser("bench", help="time the force and generation on this machine",
                            description="Time the FlashIPAForce (energy + forces per call) for chains of the given "
                                        "lengths, and generation throughput of the C++ sampler and the OpenMM route.")
    b.add_argument("--lengths", type=_lengths, default=[50, 100, 200], help="comma-separated chain lengths (default 50,100,200)")
    b.add_argument("--repeats", type=_number(int, 1), default=10, help="timed evaluations per length (default 10)")
    b.add_argument("--generate-length", type=_number(int, 2), default=60, help="chain length for generation timing")
    b.add_argument("--generate-num", type=_number(int, 1), default=4, help="backbones for generation timing")
    b.add_argument("--generate-steps", type=_number(int, 1), default=20, help="ODE steps for generation timing")
    _common(b, None)

    e = commands.add_parser("evaluate", help="evaluate the model on the validation split (report with plots)",
                            description="Generation (DSSP, Rg against the training set, validity, clashes, knots, "
                                        "diversity, novelty, speed; links of the raw samples), denoising of noised "
                                        "validation natives (links connected, RMSD), self-consistency against "
                                        "simulation (ProteinMPNN "
                                        "sequences, amber14 + OBC2 MD without the learned force), refinement of "
                                        "perturbed validation natives, and discrimination of natives from decoys. "
                                        "The defaults are the full evaluation, a GPU job; --quick is a small look.")
    e.add_argument("--sections", default="generation,denoising,designability,refinement,discrimination",
                   help="comma-separated sections (default: all five)")
    e.add_argument("--quick", action="store_true",
                   help="2 chains at lengths 50 and 100, 2 denoised natives, 2 designs, 1 native, 2 ps MD, 10 ODE steps")
    e.add_argument("--dataset", default=os.path.join("build", "dataset", "flashipa-dataset.safetensors"),
                   help="the built data set (default %(default)s)")
    e.add_argument("--manifest", default=os.path.join("data", "manifest.tsv"), help="its manifest (default %(default)s)")
    e.add_argument("--data", default=os.path.join("..", "shared", "data"),
                   help="folder of the source structures (default %(default)s)")
    e.add_argument("--score-scale", type=_number(float, 0, strictly=True), default=1.0, metavar="LAMBDA",
                   help="the generator's factor on the score (default 1; see generate --score-scale)")
    e.add_argument("--per-length", type=_number(int, 1), default=None,
                   help="generated chains per length (default 4; 2 with --quick)")
    e.add_argument("--protein-lengths", type=_lengths, default=None,
                   help="comma-separated protein lengths to generate (default 50,100,150,200,250,300; 50,100 with --quick)")
    e.add_argument("--rna-lengths", type=_lengths, default=None,
                   help="comma-separated RNA lengths to generate (default 40,70,100,150; 40 with --quick)")
    e.add_argument("--steps", type=_number(int, 1), default=None,
                   help="ODE steps of the generator (default the generator's 100; 10 with --quick)")
    e.add_argument("--designs", type=_number(int, 0), default=20, help="generated 100-residue proteins to design (default 20)")
    e.add_argument("--natives", type=_number(int, 0), default=4, help="validation natives (default 4)")
    e.add_argument("--design-ps", type=_number(float, 0.0, strictly=True), default=1000.0,
                   help="MD per designed chain, ps (default 1000)")
    _common(e, "flashipa-evaluation")
    return parser


def _generate(args):
    from .generate import generate
    backbones = generate(args.type, args.length, args.num, seed=args.seed, numSteps=args.steps, method=args.method,
                         platform=args.platform, modelPath=args.model, progress=not args.quiet,
                         scoreScale=args.score_scale)
    written = []
    for k, backbone in enumerate(backbones):
        for ext in (("pdb", "cif") if args.format == "both" else (args.format,)):
            path = os.path.join(args.out, "%s_%d.%s" % (args.type, k, ext))
            backbone.write(path)
            written.append(path)
    print("wrote %d file(s) in %s" % (len(written), args.out))


def _refine(args):
    """Refine each input; a failed input is reported and the others go on (the exit code is 1 at the end)."""
    from .refine import refine
    failed = []
    for path in args.inputs:
        name = os.path.splitext(os.path.basename(path))[0]
        if name.endswith((".cif", ".pdb")):
            name = os.path.splitext(name)[0]
        target = os.path.join(args.out, name + "_refined.pdb")
        try:
            result = refine(path, out=target, platform=args.platform, sigma=args.sigma, scale=args.scale,
                            minimizeIterations=args.iterations, steps=args.steps, implicitSolvent=args.implicit,
                            level=None if args.level == "auto" else args.level, seed=args.seed,
                            modelPath=args.model, progress=not args.quiet, quench=not args.no_quench,
                            protocol=args.protocol, hetero=args.hetero)
        except Exception as error:  # one bad input must not end the batch
            text = _message(error)
            print("flashipa refine: error: %s" % (text if path in text else "%s: %s" % (path, text)), file=sys.stderr)
            failed.append(path)
            continue
        print(report(path, target, result))
    if failed:
        raise _BatchFailed("%d of %d input(s) failed: %s" % (len(failed), len(args.inputs), ", ".join(failed)))


def _check(args):
    from .selfconsistency import selfConsistency, markdown
    summary = selfConsistency(args.type, args.length, seed=args.seed, picoseconds=args.ps, snapshots=args.snapshots,
                              out=args.out, platform=args.platform, refineSteps=args.refine_steps,
                              modelPath=args.model, progress=not args.quiet, design=not args.no_design)
    print(markdown(summary))
    print("plots: %s" % os.path.join(args.out, "selfconsistency.png"))


def _bench(args):
    from . import bench
    table = bench.run(args.lengths, args.repeats, args.platform, args.generate_length, args.generate_num,
                      args.generate_steps, args.seed, args.model, not args.quiet)
    print(bench.markdown(table))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench.json"), "w") as handle:
            json.dump(table, handle, indent=1)


def _evaluate(args):
    from .evaluation import evaluate, markdown
    sections = [v.strip() for v in args.sections.split(",") if v.strip()]
    settings = dict(designable=args.designs, natives=args.natives, designPicoseconds=args.design_ps)
    if args.quick:
        settings.update(proteinLengths=(50, 100), rnaLengths=(40,), perLength=2, designable=2, designLength=50,
                        natives=1, designPicoseconds=2.0, refineIterations=100, discriminationChains=5,
                        denoisingChains=2, numSteps=10, refineSteps=50)
    # Chosen explicitly, these win over --quick's values.
    for key, value in (("perLength", args.per_length), ("proteinLengths", args.protein_lengths),
                       ("rnaLengths", args.rna_lengths), ("numSteps", args.steps)):
        if value is not None:
            settings[key] = tuple(value) if isinstance(value, list) else value
    report = evaluate(args.out, args.dataset, args.manifest, args.data, sections=sections, platform=args.platform,
                      modelPath=args.model, seed=args.seed, progress=not args.quiet, scoreScale=args.score_scale,
                      **settings)
    print(markdown(report))
    print("report: %s" % os.path.join(args.out, "report.md"))


LEVELS = {"all-atom": "all-atom (amber14-all + implicit solvent + the learned force)",
          "backbone": "backbone (frame atoms: the learned force + ideal frame geometry)"}


def report(path, target, result):
    """What `flashipa refine` prints for one refined file: the level it ran at, the RMSD from the input, the
    energy of each term before and after, what it left out and what it changed (RefinedStructure's fields)."""
    lines = ["%s -> %s" % (path, target),
             "  level: %s; protocol %s" % (LEVELS.get(result.level, result.level), result.protocol)]
    if result.rmsdFromInput is not None:
        lines.append("  RMSD from the input: %.3f nm over %d heavy atoms (no superposition)"
                     % (result.rmsdFromInput, result.rmsdAtoms))
    terms = result.energyTerms or {}
    start, final = terms.get("start", {}), terms.get("final", {})
    lines.append("  energy, kJ/mol (start: after the pre-relaxation without the learned force):")
    width = max([len(n) for n in list(start) + list(final)] + [5])
    lines.append("    %-*s %14s %14s" % (width, "term", "start", "final"))
    for name in list(start) + [n for n in final if n not in start]:
        lines.append("    %-*s %14.1f %14.1f" % (width, name, start.get(name, float("nan")),
                                                final.get(name, float("nan"))))
    lines.append("    %-*s %14.1f %14.1f" % (width, "total", result.energies["start"], result.energies["final"]))
    for title, items in (("left out", result.leftOut), ("changed", result.notes)):
        if items:
            lines.append("  %s:" % title)
            lines.extend("    - %s" % item for item in items)
        elif title == "left out":
            lines.append("  left out: nothing")
    if result.skippedFrameEvaluations:
        lines.append("  learned force: %d residue evaluation(s) left out on the way, where frame atoms passed through a "
                     "collinear or coincident shape (the refined structure has none)" % result.skippedFrameEvaluations)
    for before, after in result.gaps:
        lines.append("  chain split at a gap: %s | %s" % (before, after))
    return "\n".join(lines)


class _BatchFailed(Exception):
    """Some inputs of a batch failed (each was reported when it did)."""


def _message(error):
    """One line for an exception: its message, preceded by its type when that is not a plain input error."""
    text = " ".join(str(error).split()) or repr(error)
    if isinstance(error, (ValueError, TypeError, OSError, _BatchFailed)):
        return text
    return "%s: %s" % (type(error).__name__, text)


def main(argv=None):
    """Entry point of the ``flashipa`` command. Exit codes: 0 done, 1 a command (or some of its inputs) failed,
    2 bad arguments (argparse's usage error)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    started = time.time()
    existed = args.out is not None and os.path.exists(args.out)
    try:
        {"generate": _generate, "refine": _refine, "check": _check, "bench": _bench,
         "evaluate": _evaluate}[args.command](args)
    except Exception as error:  # one line, never a traceback (KeyboardInterrupt still stops the program)
        print("flashipa %s: error: %s" % (args.command, _message(error)), file=sys.stderr)
        if args.out is not None and not existed and os.path.isdir(args.out) and not os.listdir(args.out):
            os.rmdir(args.out)  # leave no empty output folder behind
        return 1
    print("(%.1f s)" % (time.time() - started), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
