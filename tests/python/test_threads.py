"""LibTorch's intra-op thread count after ``import openmmflashipa`` (a fresh interpreter per case).

LibTorch defaults to one thread per core; on a busy machine that made force evaluations 50-340x slower. The
package sets FLASHIPA_NUM_THREADS, else OMP_NUM_THREADS, else min(cores, 4). Oracle: the environment given
and the CPU affinity of the child process, read here with os.sched_getaffinity."""

import os
import subprocess
import sys

import pytest

PROBE = "import openmmflashipa, torch; print(torch.get_num_threads())"


def _threads(env, cpus=None):
    environment = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "FLASHIPA_NUM_THREADS")}
    environment.update(env)
    preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus is not None else None
    result = subprocess.run([sys.executable, "-c", PROBE], env=environment, capture_output=True, text=True,
                            preexec_fn=preexec, timeout=120)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


def test_thread_count_follows_the_environment_then_the_cores():
    assert _threads({"FLASHIPA_NUM_THREADS": "3", "OMP_NUM_THREADS": "1"}) == 3
    assert _threads({"OMP_NUM_THREADS": "1"}) == 1
    cores = len(os.sched_getaffinity(0))
    assert _threads({}) == min(cores, 4)
    if cores >= 2:
        assert _threads({}, cpus={sorted(os.sched_getaffinity(0))[0]}) == 1


def test_a_bad_thread_count_is_an_import_error():
    environment = dict(os.environ, FLASHIPA_NUM_THREADS="0")
    result = subprocess.run([sys.executable, "-c", PROBE], env=environment, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and "FLASHIPA_NUM_THREADS" in result.stderr
