"""Faults in real 2-rank training jobs: a NaN step, divergence, a kill in the middle of a checkpoint, a dead rank.

Faults are placed at exact steps with ARC_FAULTS (arc_dist/engine/faults.py); everything else is the real job.
GLUE fine-tuning exercises the stage-2 loop (`train_glue`, shared with compression); stage 1 has its own loop.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import threading
import time

import pytest
import torch
import yaml

from arc_dist.engine.watchdog import EXIT_RANK_LOST
from helpers import PYTHON, REPO, VENV_BIN, child_env, free_port, launch, scalars, tiny_stage1, tiny_stage2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def glue(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_glue")
    finetune, _ = tiny_stage2(root, finetune_steps=8, compress_steps=8, replacing_steps=4, eval_every=0)
    (root / "finetune.yaml").write_text(yaml.safe_dump(finetune))
    return root


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_stage1")
    config = tiny_stage1(root, steps=20)
    config["checkpoint"] = {"every_steps": 5, "keep_last": 3}
    (root / "distill.yaml").write_text(yaml.safe_dump(config))
    return root


def module_state(run_dir, step: int) -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def test_a_nan_step_on_one_rank_is_skipped_on_every_rank(glue):
    """Rank 1 alone sees a NaN loss at step 5: both ranks skip the update (the weights after step 5 are those
    after step 4, bit for bit), the skip is counted in train/skipped_steps, and training goes on."""
    run_dir = glue / "nan_step"
    launch("launchers/finetune_teacher.py",
           ["--config", str(glue / "finetune.yaml"), f"run_dir={run_dir}", "checkpoint.every_steps=1",
            "checkpoint.keep_last=10"], env=child_env(ARC_FAULTS="nan_loss@5:1"))
    tb = scalars(run_dir)
    assert [tb[s]["train/skipped_steps"] for s in range(1, 9)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert math.isnan(tb[5]["train/loss"]) and all(math.isfinite(tb[s]["train/loss"]) for s in (4, 6, 7, 8))
    s4, s5, s6 = (module_state(run_dir, s) for s in (4, 5, 6))
    assert all(torch.equal(s4[k], s5[k]) for k in s4), "the skipped step changed the weights"
    assert not all(torch.equal(s5[k], s6[k]) for k in s5), "the step after the skip was not applied"
    assert json.loads((run_dir / "summary.json").read_text())["completed"]


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(glue):
    run_dir = glue / "diverged"
    args = ["--config", str(glue / "finetune.yaml"), f"run_dir={run_dir}", "checkpoint.every_steps=2",
            "train.max_consecutive_skips=3", "train.steps=10"]
    proc = launch("launchers/finetune_teacher.py", args, check=False,
                  env=child_env(ARC_FAULTS="nan_loss@5,nan_loss@6,nan_loss@7"))
    assert proc.returncode != 0
    newest = run_dir / "checkpoints" / "step_00000006"
    assert ("error: training diverged: steps 5-7 (3 in a row, train.max_consecutive_skips=3) all had a "
            "non-finite loss or gradient") in proc.stderr, proc.stderr[-3000:]
    assert f"the newest complete checkpoint, {newest}, is untouched" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000006"
    assert not (run_dir / "checkpoints" / "step_00000007").exists()
    # The fault is gone (lower LR, fixed data...): the run resumes from the last good checkpoint and finishes.
    launch("launchers/finetune_teacher.py", args)
    assert json.loads((run_dir / "summary.json").read_text())["completed"]
    assert scalars(run_dir)[10]["train/skipped_steps"] == 2  # DeepSpeed's count came back with the checkpoint


def test_stage1_skips_a_nan_step(stage1):
    run_dir = stage1 / "nan_step"
    launch("launchers/distill.py", ["--config", str(stage1 / "distill.yaml"), f"run_dir={run_dir}",
                                    "train.steps=6", "checkpoint.every_steps=0"],
           env=child_env(ARC_FAULTS="nan_loss@3:0"))
    tb = scalars(run_dir)
    assert [tb[s]["train/skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert all(math.isfinite(tb[s]["train/loss"]) for s in (4, 5, 6))
    assert json.loads((run_dir / "summary.json").read_text())["completed"]


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_previous_one(stage1):
    """Every process of the job is SIGKILLed after DeepSpeed wrote step 10's files and before the checkpoint was
    complete. The half-written step 10 is never resumed: the run resumes from step 5 and reproduces the
    uninterrupted run's losses."""
    config = stage1 / "distill.yaml"
    reference = stage1 / "reference"
    launch("launchers/distill.py", ["--config", str(config), f"run_dir={reference}"])

    run_dir = stage1 / "killed"
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "launchers/distill.py", "--config", str(config), f"run_dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(ARC_FAULTS="stall_save@10"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    # readline() blocks, so a deadline checked between lines cannot bound the wait: a timer kills the job
    # instead, which ends the output and fails the assert below.
    timer = threading.Timer(300, os.killpg, (proc.pid, signal.SIGKILL))
    timer.start()
    try:
        stalled = 0
        while stalled < 2:  # both ranks are inside the save
            line = proc.stdout.readline()
            assert line, "the job ended (or timed out after 300 s) before both ranks reached the fault"
            stalled += line.count("stalled in stall_save at step 10")
    finally:
        timer.cancel()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "step_00000010").is_dir() and not (ckpt / "step_00000010" / "COMPLETE").exists()
    assert any((ckpt / "step_00000010").iterdir()), "the kill should land after DeepSpeed wrote files"
    assert (ckpt / "latest").read_text() == "step_00000005"

    resumed = launch("launchers/distill.py", ["--config", str(config), f"run_dir={run_dir}"])
    log_text = resumed.stdout + resumed.stderr
    assert "step_00000010 is incomplete" in log_text and "step_00000005 at step 5" in log_text
    full, again = scalars(reference), scalars(run_dir)
    for step in range(6, 21):
        assert again[step]["train/loss"] == pytest.approx(full[step]["train/loss"], rel=1e-6, abs=1e-9), step
    assert (ckpt / "step_00000010" / "COMPLETE").is_file()


def test_a_dead_rank_ends_a_real_job_in_bounded_time(glue):
    """The two ranks of a fine-tuning job started without a launcher (as on two nodes): SIGKILL rank 1 and
    rank 0 exits within train.rank_timeout_s plus a heartbeat, naming rank 1."""
    run_dir = glue / "dead_rank"
    run_dir.mkdir()
    port = str(free_port())
    logs = [open(run_dir / f"rank{r}.log", "w") for r in range(2)]
    procs = [subprocess.Popen(
        [PYTHON, "launchers/finetune_teacher.py", "--config", str(glue / "finetune.yaml"), f"run_dir={run_dir}",
         "train.steps=100000", "train.rank_timeout_s=5"],
        cwd=REPO, env=child_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                MASTER_PORT=port),
        stdout=subprocess.DEVNULL, stderr=logs[r]) for r in range(2)]
    try:
        events = run_dir / "tensorboard" / "scalars.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and (not events.exists() or len(events.read_text().splitlines()) < 3):
            assert all(p.poll() is None for p in procs), (run_dir / "rank0.log").read_text()[-3000:]
            time.sleep(0.3)
        t0 = time.time()
        procs[1].kill()
        procs[0].wait(timeout=120)
        elapsed = time.time() - t0
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for f in logs:
            f.close()
    err = (run_dir / "rank0.log").read_text()
    assert procs[0].returncode == EXIT_RANK_LOST, err[-3000:]
    assert elapsed < 5 + 10, elapsed
    last = err.strip().splitlines()[-1]
    assert last.startswith("[rank 0] error: lost a peer: rank 1 (") and "no heartbeat for" in last, last
