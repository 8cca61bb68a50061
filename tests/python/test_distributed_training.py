"""Data-parallel training (openmmflashipa.train) with Gloo processes on the CPU.

- Two processes of batch 2 end with the weights of one process of batch 4 (the oracle: the single-process
  trainer, which has no collective at all).
- A run whose writer (rank 0) is killed resumes to the bits of an uninterrupted run.
- A process that dies or hangs makes the other exit with an error naming the failed all-reduce, within
  the run's timeout, and leaves no half-written checkpoint.

The model is tiny (one block, 16 features) and the runs are float64, a few steps each.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import safetensors
import safetensors.numpy
import pytest

torch = pytest.importorskip("torch")
import torch.distributed  # noqa: E402

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with Gloo is not available", allow_module_level=True)

TRAIN = [sys.executable, "-m", "openmmflashipa.train"]
TINY = ["--node-dim", "16", "--head-dim", "8", "--heads", "2", "--query-points", "2", "--value-points", "2",
        "--pair-rank", "1", "--pair-dim", "8", "--rel-pos-frequencies", "2", "--blocks", "1", "--sigma-features", "4",
        "--crop", "24", "--seed", "7", "--lr", "3e-3", "--warmup", "5", "--dtype", "float64", "--val-batches", "2",
        "--val-every", "5", "--threads", "1", "--quiet"]
STEPS = 12
# Tolerance of the 2-process weights against the 1-process oracle. In float64 the two differ only in the
# order in which the per-structure gradient terms are added (within a process, then across the two),
# about 1e-16 relative per step; 1e-10 leaves room for that to grow through 12 AdamW steps and is 1e5
# times smaller than what one step changes (lr 3e-3 warm-up), so a wrong shard, a missing sum or a
# process that drew other noise fails.
WEIGHT_TOLERANCE = 1e-10

def write_safetensors(path, tensors, metadata):
    safetensors.numpy.save_file({name: np.ascontiguousarray(array) for name, array in tensors.items()}, path,
                                metadata=metadata)


def read_safetensors(path):
    with safetensors.safe_open(path, framework="np") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, f.metadata()


def helix(length, rng):
    """Backbone frame atoms (N, CA, C) of a noisy helix, nm, [length, 3, 3]."""
    atoms = []
    for i in range(length):
        a = np.radians(100.0 * i)
        ca = np.array([0.23 * np.cos(a), 0.23 * np.sin(a), 0.15 * i])
        n = ca - np.array([0.10 * np.cos(a + 0.9), 0.10 * np.sin(a + 0.9), 0.10])
        c = ca + np.array([0.08 * np.sin(a), -0.08 * np.cos(a), 0.12])
        atoms.append([n, ca, c])
    return np.array(atoms) + rng.normal(0, 0.01, (length, 3, 3))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A dataset file in scripts/build_dataset.py's format: protein and RNA chains, train and validation."""
    import openmmflashipa

    first = int(openmmflashipa.ResidueType.FirstNucleotide)
    chains = [(40, False, 0), (28, False, 0), (22, False, 0), (18, True, 0), (24, True, 0), (26, False, 1), (16, True, 1)]
    rng = np.random.default_rng(11)
    atoms, types, offsets = [], [], [0]
    for length, rna, _ in chains:
        atoms.append(helix(length, rng))
        types += [(first + i % 4) if rna else i % 20 for i in range(length)]
        offsets.append(offsets[-1] + length)
    n = offsets[-1]
    path = str(tmp_path_factory.mktemp("data") / "data.safetensors")
    write_safetensors(path, {
        "atoms": np.concatenate(atoms).astype(np.float32),
        "types": np.array(types, np.int64),
        "segment": np.zeros(n, np.int64),
        "chain_offsets": np.array(offsets, np.int64),
        "is_rna": np.array([c[1] for c in chains], np.uint8),
        "split": np.array([c[2] for c in chains], np.uint8),
        "protein_O": np.zeros((n, 3), np.float32),
    }, {"format": "openmm-flashipa-dataset", "version": "1"})
    return path


def environment():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def train(args, timeout=300):
    result = subprocess.run(TRAIN + args, env=environment(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def weights(run):
    tensors, metadata = read_safetensors(os.path.join(run, "checkpoint.safetensors"))
    return {k: v for k, v in tensors.items() if "/" in k}, metadata


def losses(run):
    with open(os.path.join(run, "training.csv")) as f:
        rows = [line.strip().split(",") for line in f][1:]
    return {int(r[0]): float(r[2]) for r in rows if r[2]}


@pytest.fixture(scope="module")
def straight(dataset, tmp_path_factory):
    """An uninterrupted 2-process run (batch 2 each) of STEPS steps."""
    run = str(tmp_path_factory.mktemp("straight") / "run")
    train(["--nproc", "2", "--data", dataset, "--out-dir", run, "--steps", str(STEPS), "--batch-size", "2"] + TINY)
    return run


def test_two_processes_equal_one_process_with_the_doubled_batch(dataset, straight, tmp_path):
    single = str(tmp_path / "single")
    train(["--data", dataset, "--out-dir", single, "--steps", str(STEPS), "--batch-size", "4"] + TINY)
    a, metadataA = weights(single)
    b, metadataB = weights(straight)
    assert metadataA["trainer.batch_size"] == metadataB["trainer.batch_size"] == "4"
    assert metadataB["trainer.processes"] == "2"
    assert a.keys() == b.keys()
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst < WEIGHT_TOLERANCE, worst
    la, lb = losses(single), losses(straight)
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-12), step
    # The model the 2-process run exported is rank 0's, with the run's provenance.
    _, exported = read_safetensors(os.path.join(straight, "model.safetensors"))
    assert exported["training.batch_size"] == "4" and exported["training.processes"] == "2"
    assert "--nproc 2" in exported["training.command_lines"]


def children(pid):
    """The processes whose parent is pid (torchrun's workers are the launcher's children)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def rank_of(pid):
    with open("/proc/%d/environ" % pid, "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return int(env[b"RANK"])


def wait_for_checkpoint(run, process, limit=240):
    path = os.path.join(run, "checkpoint.safetensors")
    start = time.time()
    while not os.path.exists(path):
        assert process.poll() is None, "the run ended before its first checkpoint: " + "".join(process.communicate())
        assert time.time() - start < limit, "no checkpoint after %d s" % limit
        time.sleep(0.02)


def test_resume_after_killing_the_writer_is_bit_identical(dataset, straight, tmp_path):
    run = str(tmp_path / "run")
    launcher = subprocess.Popen(TRAIN + ["--nproc", "2", "--data", dataset, "--out-dir", run, "--steps", str(STEPS),
                                         "--batch-size", "2", "--checkpoint-every", "1"] + TINY,
                                env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_checkpoint(run, launcher)
        workers = {rank_of(pid): pid for pid in children(launcher.pid)}
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[0], signal.SIGKILL)  # the writer, at any point of a step or a checkpoint
        out, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0, "the run did not notice a killed process:\n" + err
    assert "the run failed" in err, err
    for pid in workers.values():
        assert not os.path.exists("/proc/%d" % pid) or open("/proc/%d/stat" % pid).read().split(")")[1].split()[0] == "Z"
    stopped, metadata = weights(run)  # a complete checkpoint: it parses, and every tensor is there
    step = int(metadata["counters.step"])
    assert 1 <= step < STEPS, step
    train(["--nproc", "2", "--out-dir", run, "--resume", "--threads", "1", "--quiet"])
    assert not os.path.exists(os.path.join(run, "checkpoint.safetensors.tmp"))
    a, _ = weights(straight)
    b, _ = weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert losses(run) == losses(straight)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("failure", ["exits", "hangs"])
def test_a_failed_process_stops_the_other_with_an_error(dataset, tmp_path, failure):
    # The two processes are started directly (as torchrun would, without its agent, which would stop the
    # survivor itself): what ends the survivor is its own collective failing, at once for a process that
    # exited (its connections close) and after --dist-timeout for one that stopped answering.
    run = str(tmp_path / "run")
    port = str(free_port())
    timeout = 8
    workers = []
    for rank in range(2):
        env = dict(environment(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        workers.append(subprocess.Popen(TRAIN + ["--dist-timeout", str(timeout), "--data", dataset, "--out-dir", run,
                                                 "--steps", "100000", "--batch-size", "2", "--checkpoint-every", "1"] + TINY,
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    survivor, failed = workers
    try:
        wait_for_checkpoint(run, survivor)
        time.sleep(0.5)
        start = time.time()
        failed.send_signal(signal.SIGKILL if failure == "exits" else signal.SIGSTOP)
        out, err = survivor.communicate(timeout=timeout + 90)
        elapsed = time.time() - start
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
            w.communicate()
    assert survivor.returncode == 1, err
    assert "flashipa-train: process 0 of 2: the all-reduce" in err, err
    assert "did not answer within the run's timeout (--dist-timeout)" in err, err
    if failure == "exits":
        assert elapsed < timeout + 30, elapsed
    else:
        assert timeout - 1 < elapsed < timeout + 60, elapsed
    # No half-written checkpoint: no temporary file is left, and the checkpoint is complete.
    assert not os.path.exists(os.path.join(run, "checkpoint.safetensors.tmp"))
    _, metadata = weights(run)
    assert int(metadata["counters.step"]) >= 1


def test_bad_launcher_options_are_refused(dataset, tmp_path):
    common = ["--data", dataset, "--out-dir", str(tmp_path / "r")]
    for args, message in [(["--nproc", "0"] + common, "bad value '0' for --nproc"),
                          (common + ["--nproc"], "--nproc needs a value"),
                          (["--nproc", "2", "--bogus"] + common, "unknown option '--bogus'"),
                          (["--dist-timeout", "x"] + common, "bad value 'x' for --dist-timeout"),
                          (["--nproc", "2", "--device", "cuda:1"] + common, "give --device cuda")]:
        result = subprocess.run(TRAIN + args, env=environment(), capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
    assert not os.path.exists(str(tmp_path / "r"))
