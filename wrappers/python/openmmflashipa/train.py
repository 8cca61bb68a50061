"""flashipa-train over several processes of one node (data parallel).

    python -m openmmflashipa.train --nproc N [--dist-timeout S] <flashipa-train options>

starts N processes through PyTorch's launcher (``torch.distributed.run``, the module behind ``torchrun``),
each of which trains with the repository's C++ trainer on its share of every step's batch; the
gradients are summed with ``torch.distributed`` (NCCL on GPUs, one per process; Gloo on the CPU).
N processes with ``--batch-size B`` train as one process with ``--batch-size N*B`` would. Rank 0 writes
the checkpoint, ``training.csv`` and the model; ``--resume`` restores every process from the checkpoint.
The same module runs under ``torchrun --nproc-per-node N -m openmmflashipa.train ...``, and with
``--nproc 1`` (the default) it is ``flashipa-train`` in this process. docs/DESIGN-DECISIONS.md,
"Data-parallel training", says why it is built this way.
"""

import datetime
import os
import shlex
import signal
import sys

#: Seconds a process waits in a collective before it gives up on the others (``--dist-timeout``).
DEFAULT_TIMEOUT_SECONDS = 600

LAUNCHER_USAGE = """usage: python -m openmmflashipa.train [--nproc N] [--dist-timeout S] <flashipa-train options>

launcher options:
  --nproc N           processes on this node (default 1: flashipa-train in this process). With
                      --device cuda, process i uses cuda:i (NCCL); with --device cpu, Gloo.
                      Under torchrun leave it out: torchrun's --nproc-per-node sets the processes.
  --dist-timeout S    seconds a process waits for the others in a collective before it stops with an
                      error (default %d)

flashipa-train options (--batch-size is per process):
""" % DEFAULT_TIMEOUT_SECONDS


class UsageError(Exception):
    """A bad launcher option."""


def splitLauncherOptions(argv):
    """(nproc, timeout seconds, the remaining flashipa-train options) from the command line."""
    nproc, timeout, rest = 1, DEFAULT_TIMEOUT_SECONDS, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--nproc", "--dist-timeout"):
            if i + 1 >= len(argv):
                raise UsageError("%s needs a value" % arg)
            value = argv[i + 1]
            try:
                number = int(value) if arg == "--nproc" else float(value)
            except ValueError:
                number = None
            if number is None or not number >= 1:
                raise UsageError("bad value %r for %s (a number >= 1)" % (value, arg))
            if arg == "--nproc":
                nproc = number
            else:
                timeout = number
            i += 2
            continue
        rest.append(arg)
        i += 1
    return nproc, timeout, rest


#: The environment variable in which the launcher hands its command line to the processes (provenance).
COMMAND_LINE_VARIABLE = "FLASHIPA_TRAIN_COMMAND_LINE"


def _commandLine(argv):
    """The command line that checkpoints and models record: the launcher's, else this process's."""
    return os.environ.get(COMMAND_LINE_VARIABLE) or shlex.join(["python", "-m", "openmmflashipa.train"] + list(argv))


def _launch(nproc, timeout, argv, trainerArgs):
    """Starts nproc copies of this module with torch.distributed.run (torchrun) and waits for them."""
    import torch.distributed.run

    os.environ[COMMAND_LINE_VARIABLE] = _commandLine(argv)
    # torchrun's own defaults, but named: this node alone, no restarts (a failed process stops the run;
    # resume it from its last checkpoint), and each process's output straight to this terminal.
    args = ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "--max-restarts", "0",
            "-m", "openmmflashipa.train", "--dist-timeout", repr(timeout)] + trainerArgs
    try:
        torch.distributed.run.main(args)
    except Exception as error:  # ChildFailedError: torchrun has stopped the other processes and printed why
        print("openmmflashipa.train: the run failed (%s: %s); every process was stopped. Continue it from its "
              "last checkpoint with --resume." % (type(error).__name__, str(error).strip().splitlines()[0] if str(error).strip() else ""),
              file=sys.stderr)
        return 1
    return 0


def _checkDevice(device, nproc, localRank=None):
    """Refuses a device that the processes of a run cannot share out (one GPU per process)."""
    import torch

    if device.startswith("cuda"):
        if device != "cuda":
            raise UsageError("with several processes give --device cuda: process i uses cuda:LOCAL_RANK (not %r)" % device)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        needed = nproc if localRank is None else localRank + 1
        if count < needed:
            raise UsageError("%d processes with --device cuda need %d GPUs (one each); this machine has %d usable"
                             % (nproc, needed, count))
    elif device != "cpu":
        raise UsageError("--device must be cpu or cuda, not %r" % device)


def _worker(argv, trainerArgs, timeout):
    """One process of a run started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set)."""
    import torch
    import torch.distributed as dist
    from . import _training

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    localRank = int(os.environ.get("LOCAL_RANK", rank))
    if world == 1:
        return _training.run(trainerArgs, None, _commandLine(argv))
    device = _training.parse(trainerArgs)["device"]
    _checkDevice(device, world, localRank)
    args = list(trainerArgs)
    if device == "cuda":
        torch.cuda.set_device(localRank)
        args += ["--device", "cuda:%d" % localRank]  # the last --device wins
        backend, deviceId = "nccl", torch.device("cuda", localRank)
    else:
        backend, deviceId = "gloo", None
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout), device_id=deviceId)
    except Exception as error:  # the rendezvous failed (MASTER_ADDR/PORT unreachable, a process missing)
        print("flashipa-train: process %d of %d could not join the run's process group (%s): %s: %s"
              % (rank, world, backend, type(error).__name__, error), file=sys.stderr)
        return 1
    code = _training.run(args, dist.group.WORLD, _commandLine(argv))
    if code == 0:
        dist.destroy_process_group()
    return code


def main(argv=None):
    """The command line above; returns the exit code (0 done or stopped for --resume, 1 failed, 2 usage)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # Ctrl-C and torchrun's SIGTERM stop the process at once, as they stop flashipa-train: the training
    # loop runs in C++, where Python's deferred KeyboardInterrupt would never be seen.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        nproc, timeout, trainerArgs = splitLauncherOptions(argv)
        if "--help" in trainerArgs or "-h" in trainerArgs:
            from . import _training
            print(LAUNCHER_USAGE + _training.usage(), end="")
            return 0
        from . import _training
        device = _training.parse(trainerArgs)["device"]  # bad options stop here, before any process starts
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            if nproc != 1:
                raise UsageError("--nproc is for a launch from the shell; under torchrun use its --nproc-per-node")
            return _worker(argv, trainerArgs, timeout)
        if nproc == 1:
            return _training.run(trainerArgs, None, _commandLine(argv))
        _checkDevice(device, nproc)
        return _launch(nproc, timeout, argv, trainerArgs)
    except (UsageError, ValueError) as error:
        print("openmmflashipa.train: %s\n(python -m openmmflashipa.train --help lists the options)" % error, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
