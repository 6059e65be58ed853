"""Smoke tests for the benchmark scripts: each runs in --quick mode and ends its stdout with the documented JSON."""

from __future__ import annotations

import json
import os
import statistics
import subprocess

import pytest
import yaml
from helpers import PYTHON, REPO


def run_quick(script: str, out_path, *extra: str) -> dict:
    """Run benchmarks/<script> --quick --out <out_path> [extra]; return the JSON object on its last stdout line."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [PYTHON, str(REPO / "benchmarks" / script), "--quick", "--out", str(out_path), *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out_path.read_text()) == report
    return report


def test_relation_loss_benchmark(tmp_path):
    report = run_quick("relation_loss.py", tmp_path / "results" / "relation_loss.json")
    assert report["benchmark"] == "relation_loss"
    assert {"device", "memory_method", "results"} <= report.keys()
    assert report["results"], "no rows"
    for row in report["results"]:
        assert set(row) == {
            "seq_len", "time_ratio", "mem_ratio", "project_ms", "reference_ms", "project_peak_mib",
            "reference_peak_mib",
        }  # fmt: skip
        assert row["project_ms"] > 0 and row["reference_ms"] > 0
        assert row["reference_peak_mib"] > 0


def test_relation_loss_benchmark_fixed_blocks(tmp_path):
    """--chunk-size/--chunk-heads (the GPU block-size sweep, scripts/gpu_chunk_sweep.sh) reach the loss: one query
    row of one (batch, head) pair per block is far slower than the reference at these sizes, so a time ratio
    above 1 shows the blocks were applied (the automatic blocks are faster than the reference here)."""
    out = tmp_path / "relation_loss.json"
    report = run_quick("relation_loss.py", out, "--seq-lens", "64", "--chunk-size", "1", "--chunk-heads", "1")
    assert (report["config"]["chunk_size"], report["config"]["chunk_heads"]) == (1, 1)
    assert [row["seq_len"] for row in report["results"]] == [64]
    assert report["results"][0]["time_ratio"] > 1


def test_stage1_step_benchmark(tmp_path):
    report = run_quick("stage1_step.py", tmp_path / "results" / "stage1_step.json")
    assert report["benchmark"] == "stage1_step"
    assert {"speedup", "speedup_bf16", "mfu_fp32", "mfu_bf16", "tokens_per_s", "peak_tflops", "config"} <= report.keys()
    assert set(report["tokens_per_s"]) == {"project_fp32", "baseline_fp32", "project_bf16", "baseline_bf16"}
    assert all(v > 0 for v in report["tokens_per_s"].values())
    assert report["speedup"] > 0 and report["speedup_bf16"] > 0
    assert 0 < report["mfu_fp32"] < 1 and 0 < report["mfu_bf16"] < 1
    steady = report["mfu_back_to_back"]
    assert set(steady) == {"fp32", "bf16"} and all(0 < v < 1 for v in steady.values())
    assert report["peak_tflops"]["fp32"] > 0 and report["peak_tflops"]["bf16"] > 0
    # Same students at init, same batch: the project step and the baseline compute the same loss.
    assert report["equivalence_check"]["rel_diff"] < 1e-4
    assert report["config"]["threads"] >= 1 and report["config"]["quick"] is True
    assert report["config"]["peak_matmul_n"] == 512  # what was timed: --quick's size, not widened off a GPU


def test_inference_benchmark(tmp_path):
    report = run_quick("inference.py", tmp_path / "results" / "inference.json")
    assert report["benchmark"] == "inference"
    for key in ("throughput_ratio_b32", "latency_ratio_b1", "throughput_ratio_b32_bf16", "latency_ratio_b1_bf16"):
        assert report[key] > 0, key
    assert {f"{m}_{d}_b{b}" for m in ("teacher", "student") for d in ("fp32", "bf16") for b in (1, 32)} == set(
        report["latency_ms"])
    assert report["params"]["student"] < report["params"]["teacher"]
    assert report["config"]["student_layers"] < report["config"]["teacher_layers"]


@pytest.mark.slow
def test_glue_table_benchmark(tmp_path):
    """--quick on one synthetic task (the default two tasks make 17 deepspeed launches: minutes on 2 shared
    cores); one task runs stage 1 and all eight methods, so every code path is covered."""
    out, runs = tmp_path / "results" / "glue_table.json", tmp_path / "runs"
    proc = subprocess.run(
        [PYTHON, str(REPO / "benchmarks" / "glue_table.py"), "--quick", "--tasks", "rte", "--out", str(out),
         "--runs-dir", str(runs)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == report
    assert report["benchmark"] == "glue_table"
    methods = {"teacher", "truncation", "vanilla_kd", "theseus", "minilmv2", "arc", "arc_kd", "arc_block"}
    assert set(report["tasks"]) == {"rte"} and set(report["tasks"]["rte"]) == methods
    assert all(0 <= v <= 100 for v in report["tasks"]["rte"].values())
    assert set(report["averages"]) == methods
    for arc in ("arc", "arc_kd", "arc_block"):
        assert report[f"{arc}_retention"] == pytest.approx(report["averages"][arc] / report["averages"]["teacher"])
        best = max(report["averages"][m] for m in ("truncation", "vanilla_kd", "theseus", "minilmv2"))
        assert report[f"{arc}_minus_best_baseline"] == pytest.approx(report["averages"][arc] - best)
        assert report[f"{arc}_minus_best_baseline_paired"]["standard_error"] is None  # one task, one seed
    assert report["speedup"]["teacher"] == 1.0
    assert all(report["params_m"][m] < report["params_m"]["teacher"] for m in methods - {"teacher"})
    assert report["stage1"]["trained_here"] and report["stage1"]["corpus_sequences"] > 0
    assert report["stage1"]["ranks"] == report["config"]["nprocs"] and report["stage1"]["precision"] == "fp32"
    assert report["config"]["steps"] > 0 and report["config"]["nprocs"] >= 1
    # The replacement methods differ in init and mapping only as the table says: the jobs' resolved configs.
    resolved = {m: yaml.safe_load((runs / "rte" / "seed42" / m / "config.yaml").read_text())
                for m in ("theseus", "arc", "arc_kd", "arc_block")}
    stage1_student = str((runs / "stage1" / "student").resolve())
    assert {m: (c["student"]["path"], c["student"]["truncate_teacher_layers"], c["mapping"]["kind"], c["kd"]["weight"])
            for m, c in resolved.items()} == {"theseus": ("", 2, "block", 0.0),
                                               "arc": (stage1_student, None, "uniform", 0.0),
                                               "arc_kd": (stage1_student, None, "uniform", 1.0),
                                               "arc_block": (stage1_student, None, "block", 0.0)}
    assert len({c["schedule"]["replacing_steps"] for c in resolved.values()}) == 1  # the same curriculum
    assert report["config"]["replacement_methods"] == ["theseus", "arc", "arc_kd", "arc_block"]
    table = out.with_suffix(".md").read_text()
    assert "ARC + logit KD" in table and "Theseus" in table and "| avg |" in table
    chart = out.with_suffix(".png")  # matplotlib comes with the `bench` extra that `make venv` installs
    assert report["chart"] == str(chart) and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --merge joins reports of the same settings run with different seeds, or with different methods (--methods):
    # scores per seed, means recomputed. Here seed 43 comes as two reports, one with ARC + KD, one with the rest,
    # each with the teacher (a method needs it), given in reverse seed order.
    other = json.loads(json.dumps(report))
    other["config"]["seeds"] = [43]
    for method, values in other["per_seed"]["rte"].items():
        other["per_seed"]["rte"][method] = [min(100.0, values[0] + 10.0)]
    parts = []
    for name, keep in (("arc_kd", {"teacher", "arc_kd"}), ("rest", methods - {"arc_kd"})):
        part = json.loads(json.dumps(other))
        part["per_seed"]["rte"] = {m: v for m, v in part["per_seed"]["rte"].items() if m in keep}
        if name == "arc_kd":  # as from a stage-1 export older than its ranks and precision: not compared
            part["stage1"].update(ranks=None, precision=None)
        parts.append(tmp_path / f"seed43_{name}.json")
        parts[-1].write_text(json.dumps(part))
    merged_path = tmp_path / "merged" / "glue_table.json"
    merge = [PYTHON, str(REPO / "benchmarks" / "glue_table.py"), "--out", str(merged_path), "--merge"]
    proc = subprocess.run(merge + [*map(str, parts), str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    merged = json.loads(proc.stdout.strip().splitlines()[-1])
    assert merged["config"]["seeds"] == [42, 43]
    for method in methods:
        first, second = report["per_seed"]["rte"][method][0], other["per_seed"]["rte"][method][0]
        assert merged["per_seed"]["rte"][method] == [first, second]  # seed order, not argument order
        assert merged["tasks"]["rte"][method] == pytest.approx((first + second) / 2)
    assert "2 seed(s) 42, 43" in merged_path.with_suffix(".md").read_text()
    # ARC's gap to the best baseline with its standard error over the (task, seed) pairs.
    paired = merged["arc_minus_best_baseline_paired"]
    diffs = [a - b for a, b in zip(merged["per_seed"]["rte"]["arc"], merged["per_seed"]["rte"][paired["baseline"]])]
    assert paired["baseline"] == merged["best_baseline"] and paired["pairs"] == 2
    assert paired["differences"] == pytest.approx(diffs)
    assert paired["mean"] == pytest.approx(merged["arc_minus_best_baseline"])
    se = statistics.stdev(diffs) / 2**0.5
    assert paired["standard_error"] == pytest.approx(se)
    assert paired["ci95"] == pytest.approx([paired["mean"] - 12.71 * se, paired["mean"] + 12.71 * se])  # t, 1 df
    lo, hi = paired["ci95"]
    assert f"95% confidence interval {lo:+.2f} to {hi:+.2f} over 2 paired task x seed differences" in \
        merged_path.with_suffix(".md").read_text()
    # A merged report (devices and stage-1 descriptions as lists) merges again, here with a report it contains.
    again = tmp_path / "again" / "glue_table.json"
    proc = subprocess.run([*merge[:2], "--out", str(again), "--merge", str(merged_path), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert json.loads(again.read_text())["per_seed"] == merged["per_seed"]
    # Reports from before `replacement_methods` existed end the schedule with a method list, "(theseus, arc)": the
    # same schedule, so they join; the merged report states the schedule alone and the replacement methods it holds.
    old_parts = []
    for part in parts:
        old_style = json.loads(part.read_text())
        old_style["config"]["replacement_schedule"] += " (theseus, arc)"
        del old_style["config"]["replacement_methods"]
        old_parts.append(tmp_path / f"old_{part.name}")
        old_parts[-1].write_text(json.dumps(old_style))
    proc = subprocess.run(merge + [*map(str, old_parts), str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    old_merged = json.loads(merged_path.read_text())
    assert old_merged["per_seed"] == merged["per_seed"]
    assert old_merged["config"]["replacement_schedule"] == report["config"]["replacement_schedule"]
    assert old_merged["config"]["replacement_methods"] == ["theseus", "arc", "arc_kd", "arc_block"]

    # Reports of different tasks join into one table over all of them; --merge-seeds keeps the seeds they share
    # (here a two-seed CoLA report joins the one-seed RTE report).
    cola = json.loads(json.dumps(report))
    cola["config"].update(tasks=["cola"], seeds=[42, 43])
    cola["per_seed"] = {"cola": {m: [v[0] / 2, v[0] / 3] for m, v in report["per_seed"]["rte"].items()}}
    cola_path = tmp_path / "cola.json"
    cola_path.write_text(json.dumps(cola))
    proc = subprocess.run(merge + [str(out), str(cola_path), "--merge-seeds", "42"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    joined = json.loads(merged_path.read_text())
    assert joined["config"]["tasks"] == ["rte", "cola"] and joined["config"]["seeds"] == [42]
    for method in methods:
        rte_score = report["per_seed"]["rte"][method][0]
        assert joined["per_seed"]["rte"][method] == [rte_score]
        assert joined["per_seed"]["cola"][method] == [rte_score / 2]
        assert joined["averages"][method] == pytest.approx(rte_score * 3 / 4)
    header = merged_path.with_suffix(".md").read_text().split("| method |")[1].splitlines()[0]
    assert header.index("RTE (") < header.index("CoLA (") < header.index("avg")
    # Without the seed selection RTE has no seed 43; a seed no report has is named.
    proc = subprocess.run(merge + [str(out), str(cola_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "has no rte score for seed(s) [43]" in proc.stderr, proc.stderr
    proc = subprocess.run(merge + [str(out), str(cola_path), "--merge-seeds", "44"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "no report has seed(s) [44]" in proc.stderr, proc.stderr

    # Refused, with the reason: a method without a score for some seed, the same score differing between two
    # reports, and reports of other settings.
    proc = subprocess.run(merge + [str(out), str(parts[0])], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "truncation has no rte score for seed(s) [43]" in proc.stderr, proc.stderr
    # ... unless --merge-methods keeps only the methods that seed ran (and the teacher).
    proc = subprocess.run(merge + [str(out), str(parts[0]), "--merge-methods", "arc_kd"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    kept = json.loads(merged_path.read_text())
    assert kept["per_seed"] == {"rte": {m: merged["per_seed"]["rte"][m] for m in ("teacher", "arc_kd")}}
    assert kept["arc_kd_retention"] is not None and kept["arc_retention"] is None
    assert set(kept["speedup"]) == set(kept["params_m"]) == {"teacher", "arc_kd"}
    proc = subprocess.run(merge + [str(parts[0]), "--merge-methods", "arc"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "no report has method(s) ['arc']" in proc.stderr, proc.stderr
    other["per_seed"]["rte"]["teacher"] = [other["per_seed"]["rte"]["teacher"][0] - 1.0]
    other_path = tmp_path / "seed43.json"
    other_path.write_text(json.dumps(other))
    proc = subprocess.run(merge + [str(parts[1]), str(other_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "rte teacher seed 43" in proc.stderr and "agree" in proc.stderr, proc.stderr
    other["config"]["steps"] += 1
    other_path.write_text(json.dumps(other))
    proc = subprocess.run(merge + [str(out), str(other_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "steps=" in proc.stderr and "same settings" in proc.stderr, proc.stderr
    other["config"]["steps"] -= 1
    other["config"]["replacement_schedule"] = "linear from 0.3, p=1 at 50% of the steps (theseus, arc)"
    other_path.write_text(json.dumps(other))
    proc = subprocess.run(merge + [str(out), str(other_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "replacement_schedule=" in proc.stderr, proc.stderr  # 50%, not 60%: refused
    other["config"]["replacement_schedule"] = report["config"]["replacement_schedule"]
    other["stage1"]["relation_heads"] += 1
    other_path.write_text(json.dumps(other))
    proc = subprocess.run(merge + [str(out), str(other_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "relation_heads=" in proc.stderr and "same stage 1" in proc.stderr, proc.stderr


def test_glue_table_refuses_what_it_would_not_use(tmp_path):
    """Stage-1 flags next to --student (which replaces that stage) and a run directory that is a dangling symlink
    (e.g. to a teacher run since removed) are refused with the reason, before any job runs or anything is written."""
    from arc_dist.testing import make_teacher_dir

    script, out = str(REPO / "benchmarks" / "glue_table.py"), tmp_path / "out" / "glue_table.json"
    student = make_teacher_dir(tmp_path / "student", layers=2, hidden=32, heads=4, intermediate=64, max_positions=64)
    proc = subprocess.run([PYTHON, script, "--student", str(student), "--stage1-steps", "5",
                           "--stage1-layers-from-teacher", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert ("--stage1-steps, --stage1-layers-from-teacher set(s) the stage 1 run here, which --student replaces"
            in proc.stderr)

    runs = tmp_path / "runs"
    (runs / "rte" / "seed42").mkdir(parents=True)
    (runs / "rte" / "seed42" / "teacher").symlink_to(tmp_path / "gone")
    proc = subprocess.run([PYTHON, script, "--quick", "--tasks", "rte", "--student", str(student),
                           "--runs-dir", str(runs), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"run directory {runs / 'rte' / 'seed42' / 'teacher'} is a symlink to {tmp_path / 'gone'}, which does not " \
           "exist" in proc.stderr, proc.stderr
    assert not out.parent.exists() and not (tmp_path / "gone").exists()


def test_glue_table_paired_difference_interval(monkeypatch):
    """ARC's gap to a baseline over (task, seed) pairs: mean = gap of the averages, 95% interval from Student's t
    with pairs-1 degrees of freedom (2.571 at 5), the verdict on 0 in the summary text."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import glue_table

    scores = {"sst2": {"arc": [80.0, 81.0, 79.5], "minilmv2": [79.0, 80.0, 79.0]},
              "rte": {"arc": [55.0, 56.0, 54.0], "minilmv2": [54.0, 54.5, 53.5]}}
    diffs = [1.0, 1.0, 0.5, 1.0, 1.5, 0.5]
    paired = glue_table.paired_difference(scores, ["sst2", "rte"], "arc", "minilmv2")
    se = statistics.stdev(diffs) / 6**0.5
    assert paired["differences"] == pytest.approx(diffs) and paired["pairs"] == 6
    assert paired["mean"] == pytest.approx(statistics.mean(diffs)) and paired["standard_error"] == pytest.approx(se)
    assert paired["ci95"] == pytest.approx([statistics.mean(diffs) - 2.571 * se, statistics.mean(diffs) + 2.571 * se],
                                           abs=1e-3)
    assert "(excludes 0;" in glue_table._noise(paired)
    scores["rte"]["arc"] = [50.0, 50.0, 50.0]  # now far below on one task: the interval straddles 0
    assert "(contains 0: not told apart from a tie;" in glue_table._noise(
        glue_table.paired_difference(scores, ["sst2", "rte"], "arc", "minilmv2"))
    one = glue_table.paired_difference({"rte": {"arc": [55.0], "minilmv2": [54.0]}}, ["rte"], "arc", "minilmv2")
    assert one["ci95"] is None and "no error estimate" in glue_table._noise(one)
