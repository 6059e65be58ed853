"""A dead rank ends the job within the configured time, naming the rank, instead of a hang in a collective.

The two ranks are started directly (RANK/WORLD_SIZE/MASTER_* set here), not through a launcher: on one host the
deepspeed launcher and torchrun kill the survivors themselves, but across nodes (one launcher per node) nothing
does, and that is the case the watchdog exists for. The collective's own timeout is 600 s, so only the watchdog
can end these runs in time.
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from arc_dist.engine.watchdog import EXIT_RANK_LOST
from helpers import PYTHON, REPO, child_env, free_port

TIMEOUT_S = 4.0
WORKER = REPO / "tests" / "engine" / "watchdog_worker.py"


def start_ranks(*extra: str) -> list[subprocess.Popen]:
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = child_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port)
        procs.append(subprocess.Popen([PYTHON, str(WORKER), str(TIMEOUT_S), *extra], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def wait_until_training(procs: list[subprocess.Popen]) -> None:
    """Both ranks are inside the all-reduce loop (each has printed an iteration line)."""
    for proc in procs:
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stdout.readline()
            if "iteration" in line:
                break
            assert line or proc.poll() is None, f"rank exited early:\n{proc.stderr.read()[-3000:]}"
        else:
            pytest.fail("ranks did not start")


def finish(survivor: subprocess.Popen, procs: list[subprocess.Popen], since: float) -> tuple[int, float, str]:
    try:
        _, err = survivor.communicate(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            p.communicate()
    return survivor.returncode, time.time() - since, err


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_survivor_exits_in_bounded_time_naming_the_lost_rank(how):
    """SIGKILL: the process is gone (gloo may also raise 'Connection closed by peer'). SIGSTOP: the process is
    alive but silent, like a node cut off the network; the survivor would wait in all_reduce for 600 s."""
    procs = start_ranks()
    wait_until_training(procs)
    t0 = time.time()
    procs[1].send_signal(how)
    code, elapsed, err = finish(procs[0], procs, t0)
    assert code == EXIT_RANK_LOST, err[-3000:]
    assert elapsed < TIMEOUT_S + 10, elapsed
    last = err.strip().splitlines()[-1]
    assert last.startswith("[rank 0] error: lost a peer: rank 1 (") and "no heartbeat" in last, last
    assert "resumes from the newest complete" in last


@pytest.mark.slow
def test_losing_rank_0_which_hosts_the_store_is_reported_by_rank_1():
    procs = start_ranks()
    wait_until_training(procs)
    t0 = time.time()
    procs[0].send_signal(signal.SIGKILL)
    code, elapsed, err = finish(procs[1], procs, t0)
    assert code == EXIT_RANK_LOST and elapsed < TIMEOUT_S + 10, (code, elapsed, err[-3000:])
    last = err.strip().splitlines()[-1]
    assert last.startswith("[rank 1] error: lost a peer:") and "rank 0" in last, last


@pytest.mark.slow
def test_a_rank_that_fails_stops_the_others_at_once_with_its_error():
    procs = start_ranks("raise_at=5")
    wait_until_training(procs)
    t0 = time.time()
    code, elapsed, err = finish(procs[0], procs, t0)
    assert code == EXIT_RANK_LOST and elapsed < TIMEOUT_S, (code, elapsed, err[-3000:])
    last = err.strip().splitlines()[-1]
    assert "rank 1 (" in last and "failed with ValueError: injected failure in the training step" in last, last


def test_watchdog_is_off_for_one_rank_or_zero_timeout():
    from arc_dist.engine.watchdog import RankWatchdog

    assert not RankWatchdog(0, 1, 60.0).enabled
    assert not RankWatchdog(0, 4, 0.0).enabled
