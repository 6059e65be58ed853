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

from helpers import REPO, make_teacher_dir, read_jsonl, synthetic_text

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
    if not (REPO / "launchers" / "distill.py").is_file():
        pytest.skip("launchers/distill.py does not exist")
    root = tmp_path_factory.mktemp("slurm_stage1")
    teacher = make_teacher_dir(root / "teacher", layers=4, hidden=64, heads=4, intermediate=128, max_positions=64)
    text = synthetic_text(root / "corpus.txt", n_lines=1500)
    from transformers import AutoTokenizer

    from arc_dist.data.corpus import prepare_corpus

    prepare_corpus([str(text)], AutoTokenizer.from_pretrained(teacher), root / "corpus", seq_len=32,
                   samples_per_shard=200, min_shards=4)
    config = {
        "teacher": {"path": str(teacher), "layer": -1},
        "student": {"layers": 2, "hidden": 32, "heads": 4, "intermediate": 64},
        "loss": {"relation_heads": 4, "chunk_size": 16},
        "data": {"path": str(root / "corpus"), "seq_len": 32, "num_workers": 2},
        "optim": {"lr": 2e-3, "warmup_steps": 3},
        "train": {"steps": STEPS, "micro_batch_size": 8, "seed": 7, "precision": "fp32"},
        "checkpoint": {"every_steps": 20, "keep_last": 2},
        "metrics": {"log_every": 1, "progress_bar": False, "peak_tflops": 1.0},
    }
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

def write_sst2(folder: Path, n_train: int = 400, n_dev: int = 60, seed: int = 0) -> None:
    """A learnable SST-2-format task (label 1 iff the sentence mentions 'river'), as in test_compress_2proc."""
    import random

    from helpers import WORDS

    rng = random.Random(seed)
    (folder / "SST-2").mkdir(parents=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            words = [w for w in rng.sample(WORDS, rng.randint(4, 12)) if w != "river"] + (["river"] if i % 2 else [])
            rng.shuffle(words)
            rows.append(f"{' '.join(words)}\t{i % 2}")
        (folder / "SST-2" / f"{split}.tsv").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    for launcher in ("finetune_teacher.py", "compress.py"):
        if not (REPO / "launchers" / launcher).is_file():
            pytest.skip(f"launchers/{launcher} does not exist yet")
    from helpers import make_bert, make_tokenizer

    root = tmp_path_factory.mktemp("slurm_stage2")
    write_sst2(root / "glue")
    tok = make_tokenizer(root / "pretrained")
    make_bert(root / "pretrained", vocab_size=len(tok), layers=4, hidden=128, heads=4, intermediate=256,
              max_positions=64, seed=1)
    tok.save_pretrained(root / "student_init")
    make_bert(root / "student_init", vocab_size=len(tok), layers=2, hidden=64, heads=4, intermediate=128,
              max_positions=64, seed=2)
    common = {
        "data": {"task": "sst2", "glue_dir": str(root / "glue"), "max_seq_len": 32, "eval_every_steps": 0,
                 "eval_batch_size": 16},
        "metrics": {"log_every": 1, "progress_bar": False, "peak_tflops": 1.0},
    }
    finetune = {**common, "model": str(root / "pretrained"), "optim": {"lr": 1e-3},
                "train": {"steps": 20, "micro_batch_size": 16, "precision": "fp32"},
                "checkpoint": {"every_steps": 0}}
    compress = {**common, "student": {"path": str(root / "student_init")},
                "schedule": {"kind": "linear", "base": 0.3, "replacing_steps": 12},
                "optim": {"lr": 1e-3},
                "train": {"steps": 20, "micro_batch_size": 8, "seed": 3, "precision": "fp32"},
                "checkpoint": {"every_steps": 10, "keep_last": 2}}
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
