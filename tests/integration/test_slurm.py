"""The sbatch scripts on a real two-node Slurm cluster (scripts/slurm_local.sh, network namespaces n1/n2).

1. smoke: slurm/common.sh runs one torchrun per node; a gloo all-reduce crosses the two nodes;
2. slurm/distill_large.sbatch: a tiny stage-1 run finishes and exports; the same run preempted with USR1 to
   the batch shell (what `--signal=B:USR1@N` does before the time limit) checkpoints, requeues itself, resumes
   and ends with exactly the losses of the uninterrupted run;
3. slurm/finetune_teacher.sbatch (1 node) then slurm/compress.sbatch (2 nodes, overrides given as sbatch
   arguments) finish and export, once launchers/finetune_teacher.py and launchers/compress.py exist.

Every wait is bounded; the cluster is always torn down (see slurm_harness.py).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from helpers import REPO, read_jsonl, tiny_stage1, tiny_stage2

try:
    from slurm_harness import slurm_cluster, timeline  # noqa: F401  (slurm_cluster: the session fixture)
except ImportError:  # collected with a different rootdir/import mode
    from integration.slurm_harness import slurm_cluster, timeline  # noqa: F401

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 60  # about 10 steps/s on 2 CPU ranks: long enough to be stopped half-way
JOB_TIMEOUT_S = 240  # one tiny 2-node job, start-up (imports, rendezvous) included
PREEMPT_TIMEOUT_S = 300  # two attempts + the requeue delay (cred_expire=10 s)


def write_probe_sbatch(path: Path, out_dir: Path) -> Path:
    path.write_text(f"""#!/bin/bash
#SBATCH --job-name=arc-probe
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --time=5
#SBATCH --signal=B:USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={out_dir}/%x-%j.out
export ARC_REPO={REPO}
ARC_LAUNCHER=tests/integration/slurm_probe.py
source "$ARC_REPO/slurm/common.sh"
arc_slurm_main
""")
    return path


def job_output(out_dir: Path, job: str) -> str:
    files = sorted(out_dir.glob(f"*-{job}.out")) + sorted(out_dir.glob(f"*-{job}/*.log"))
    return "\n".join(f"--- {f.name} ---\n{f.read_text(errors='replace')[-5000:]}" for f in files)


def test_two_nodes_gloo_allreduce(slurm_cluster, tmp_path):
    out = tmp_path / "logs"
    out.mkdir()
    script = write_probe_sbatch(tmp_path / "probe.sbatch", out)
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    job, rc = slurm_cluster.sbatch(script, env=slurm_cluster.env(ARC_RUN_DIR=str(run_dir)), wait=True, timeout=120)
    assert rc == 0, f"probe job {job} exited {rc}\n{job_output(out, job)}"
    records = [json.loads(p.read_text()) for p in sorted((run_dir / "probe").glob("rank*.json"))]
    assert len(records) == 2, job_output(out, job)
    assert {r["hostname"] for r in records} == {"n1", "n2"}
    assert all(r["sum"] == 3.0 and r["world_size"] == 2 for r in records)  # (0+1) + (1+1)
    assert len({r["master_addr"] for r in records}) == 1 and records[0]["master_addr"] in ("n1", "n2")
    log = job_output(out, job)
    assert "attempt 0" in log and "srun exited with status 0" in log
    assert (out / f"arc-probe-{job}" / "attempt0-n1.log").is_file()  # the per-job log directory
    print(f"probe job {job}: {time.monotonic() - t0:.1f}s")


def wait_for(predicate, timeout: float, what: str, cluster, job: str, out: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        state = cluster.job_info(job).get("JobState")
        if time.monotonic() > deadline or state in ("FAILED", "CANCELLED", "COMPLETED", "TIMEOUT"):
            cluster.run("scancel", job, check=False)
            pytest.fail(f"job {job}: {what} did not happen (state {state})\n{job_output(out, job)}")
        time.sleep(0.2)


def test_usr1_to_batch_shell_stops_requeues_and_resumes(slurm_cluster, tmp_path):
    """common.sh's trap + requeue, with the probe as a fake preemptible trainer (no model, seconds)."""
    out = tmp_path / "logs"
    out.mkdir()
    script = write_probe_sbatch(tmp_path / "probe.sbatch", out)
    run_dir = tmp_path / "run"
    steps_file = run_dir / "probe" / "steps.txt"
    run_dir.mkdir()
    (run_dir / "STOP").touch()  # stale: must be removed before the launch, or the job would stop at once
    env = slurm_cluster.env(ARC_RUN_DIR=str(run_dir), ARC_OVERRIDES="probe.steps=30 probe.step_time=0.2")
    t0 = time.monotonic()
    job, rc = slurm_cluster.sbatch(script, env=env)
    assert rc == 0
    wait_for(lambda: steps_file.is_file() and len(steps_file.read_text().split("\n")) > 3, 120, "3 steps",
             slurm_cluster, job, out)
    slurm_cluster.signal_batch(job, "USR1")
    info = slurm_cluster.wait_job_done(job, 180)
    log = job_output(out, job)
    assert info["JobState"] == "COMPLETED" and info.get("Restarts") == "1", f"{info}\n{log}"
    assert "received SIGUSR1" in log and "requeueing job" in log and "removing a stale" in log, log
    assert "attempt 1 (SLURM_RESTART_COUNT=1)" in log, log
    rows = [tuple(map(int, line.split())) for line in steps_file.read_text().split("\n") if line]
    assert [s for s, _ in rows] == list(range(1, 31)), rows  # every step exactly once, across the two attempts
    attempts = [a for _, a in rows]
    assert attempts == sorted(attempts) and set(attempts) == {0, 1}, rows
    assert json.loads((run_dir / "summary.json").read_text()) == {"step": 30, "completed": True}
    assert not (run_dir / "STOP").exists()
    print(f"preempted probe job {job}: {time.monotonic() - t0:.1f}s, stopped after step "
          f"{max(s for s, a in rows if a == 0)}")


# ----------------------------------------------------------------------------------------------- stage 1

@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm_stage1")
    config = tiny_stage1(root, STEPS)
    config["checkpoint"]["every_steps"] = 20
    config["metrics"]["peak_tflops"] = 1.0
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    (root / "logs").mkdir()
    return root, path


def logged_steps(run_dir: Path) -> int:
    """Complete lines in scalars.jsonl so far (the file is being written while this polls)."""
    f = run_dir / "tensorboard" / "scalars.jsonl"
    return f.read_text().count("\n") if f.is_file() else 0


def losses(run_dir: Path) -> dict[int, float]:
    f = run_dir / "tensorboard" / "scalars.jsonl"
    return {r["step"]: r["train/loss"] for r in read_jsonl(f)} if f.is_file() else {}


def distill_env(cluster, root: Path, config: Path, run_dir: Path) -> dict:
    return cluster.env(ARC_CONFIG=str(config), ARC_RUN_DIR=str(run_dir))


def distill_options(root: Path) -> tuple[str, ...]:
    # the file's defaults (2 nodes, 24 h) stay; only the output goes to the test's directory
    return (f"--output={root}/logs/%x-%j.out", "--time=10")


@pytest.fixture(scope="module")
def full_run(slurm_cluster, stage1):
    root, config = stage1
    run_dir = root / "full"
    t0 = time.monotonic()
    job, rc, info = slurm_cluster.submit_and_wait(REPO / "slurm" / "distill_large.sbatch",
                                                  options=distill_options(root),
                                                  env=distill_env(slurm_cluster, root, config, run_dir),
                                                  timeout=JOB_TIMEOUT_S)
    print(f"uninterrupted distill job {job}: {time.monotonic() - t0:.1f}s; {timeline(info)}")
    return run_dir, job, rc


def test_distill_sbatch_completes_and_exports(full_run, stage1):
    root, _ = stage1
    run_dir, job, rc = full_run
    log = job_output(root / "logs", job)
    assert rc == 0, f"distill job {job} exited {rc}\n{log}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] is True and summary["step"] == STEPS, summary
    assert (run_dir / "student" / "config.json").is_file()
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    assert not (run_dir / "STOP").exists()
    assert "2 node(s) x 1 rank(s)" in log


def test_distill_preempted_requeues_and_resumes_exactly(slurm_cluster, stage1, full_run):
    root, config = stage1
    run_dir = root / "preempted"
    job, rc = slurm_cluster.sbatch(REPO / "slurm" / "distill_large.sbatch", options=distill_options(root),
                                   env=distill_env(slurm_cluster, root, config, run_dir))
    assert rc == 0
    # wait until training is under way (a few logged steps), then the time-limit warning: USR1 to the batch shell
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while logged_steps(run_dir) < 3:
        info = slurm_cluster.job_info(job)
        if time.monotonic() > deadline or info.get("JobState") in ("FAILED", "CANCELLED", "COMPLETED"):
            slurm_cluster.run("scancel", job, check=False)
            pytest.fail(f"job {job} logged no steps ({info.get('JobState')})\n{job_output(root / 'logs', job)}")
        time.sleep(0.2)
    signalled_at = logged_steps(run_dir)
    slurm_cluster.signal_batch(job, "USR1")
    info = slurm_cluster.wait_job_done(job, PREEMPT_TIMEOUT_S)
    print(f"preempted distill job {job}: signalled after step {signalled_at}; {timeline(info)}")
    log = job_output(root / "logs", job)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log}"
    assert int(info.get("Restarts", "0")) == 1, f"job was not requeued exactly once: {info}\n{log}"
    assert "received SIGUSR1" in log and "requeueing job" in log, log
    assert "attempt 1 (SLURM_RESTART_COUNT=1)" in log, log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] is True and summary["step"] == STEPS, summary
    assert (run_dir / "student" / "config.json").is_file()
    assert not (run_dir / "STOP").exists()

    # the stop checkpoint was written after the signal, before the end, and the second attempt resumed from it
    tags = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    resumed = losses(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1)), sorted(resumed)
    attempt1 = "".join(f.read_text(errors="replace") for f in (root / "logs" / f"arc-distill-{job}").glob("attempt1-*"))
    found = re.search(r"resumed from \S+ at step (\d+)", attempt1)
    assert found, attempt1[-3000:]
    stop_step = int(found.group(1))
    assert signalled_at <= stop_step < STEPS, (signalled_at, stop_step, tags)

    full_dir, _, full_rc = full_run
    assert full_rc == 0, "the uninterrupted run failed (see the test above)"
    full = losses(full_dir)
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-9), (step, resumed[step], full[step])
    final = json.loads((full_dir / "summary.json").read_text())["final_loss"]
    assert summary["final_loss"] == pytest.approx(final, rel=1e-6)


# ----------------------------------------------------------------------------------------------- stage 2

@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm_stage2")
    finetune, compress = tiny_stage2(root, finetune_steps=20, compress_steps=20, replacing_steps=12, eval_every=0)
    for config in (finetune, compress):
        config["metrics"]["peak_tflops"] = 1.0
    (root / "finetune.yaml").write_text(yaml.safe_dump(finetune))
    (root / "compress.yaml").write_text(yaml.safe_dump(compress))
    (root / "logs").mkdir()
    return root


def test_finetune_teacher_and_compress_sbatch(slurm_cluster, stage2):
    """finetune_teacher.sbatch (its default: 1 node) then compress.sbatch on 2 nodes, overrides as arguments."""
    root = stage2
    options = (f"--output={root}/logs/%x-%j.out", "--time=10")
    t0 = time.monotonic()
    job, rc, info = slurm_cluster.submit_and_wait(
        REPO / "slurm" / "finetune_teacher.sbatch", options=options, timeout=JOB_TIMEOUT_S,
        env=slurm_cluster.env(ARC_CONFIG=str(root / "finetune.yaml"), ARC_RUN_DIR=str(root / "teacher")))
    print(f"finetune job {job}: {time.monotonic() - t0:.1f}s; {timeline(info)}")
    log = job_output(root / "logs", job)
    assert rc == 0, f"finetune job {job} exited {rc}\n{log}"
    assert "1 node(s) x 1 rank(s)" in log
    assert json.loads((root / "teacher" / "summary.json").read_text())["completed"] is True
    assert (root / "teacher" / "model" / "config.json").is_file()
    t1 = time.monotonic()

    run_dir = root / "compress"
    job, rc, info = slurm_cluster.submit_and_wait(
        REPO / "slurm" / "compress.sbatch", f"teacher={root / 'teacher' / 'model'}", options=options,
        timeout=JOB_TIMEOUT_S, env=slurm_cluster.env(ARC_CONFIG=str(root / "compress.yaml"), ARC_RUN_DIR=str(run_dir)))
    print(f"compress job {job}: {time.monotonic() - t1:.1f}s; {timeline(info)}")
    log = job_output(root / "logs", job)
    assert rc == 0, f"compress job {job} exited {rc}\n{log}"
    assert "2 node(s) x 1 rank(s)" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] is True and summary["step"] == 20, summary
    assert (run_dir / "student" / "config.json").is_file()
    masks = read_jsonl(run_dir / "masks.jsonl")  # the replacement masks agree across the two nodes
    assert len(masks) == 20 and all(r["masks"][0] == r["masks"][1] for r in masks)
