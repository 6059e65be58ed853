"""`arc compress`: the whole ARC compression in one command.

    1. teacher fine-tuning on the task   (skipped with --teacher-finetuned DIR)
    2. stage 1: corpus shards + relation distillation into the student   (skipped with --student DIR)
    3. stage 2: one-to-one layer replacement on the task, student exported
    4. report: teacher vs student dev metric, parameters, and inference latency measured on the same batch

Each stage is a distributed job started through the `deepspeed` launcher on --nprocs local ranks (GPUs when
present, CPU processes otherwise) with its own run directory; a stage whose run finished is not run again, and an
interrupted one resumes from its newest checkpoint, so re-running the same command continues the pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from arc_dist.errors import ArcError, ConfigError

REPO = Path(__file__).resolve().parents[1]
STAGES = ("finetune", "distill", "compress")

# Sizes per profile. "demo" finishes on 2 CPU cores in 15-20 minutes; "full" is the real recipe (all training
# data, full step budgets) for a GPU node. Anything here can be overridden with --set STAGE.key=value.
PROFILES: dict[str, dict[str, list[str]]] = {
    "demo": {
        "finetune": ["train.steps=300", "data.train_subset=12000", "data.eval_every_steps=100"],
        "distill": ["train.steps=300"],
        "compress": ["train.steps=400", "schedule.replacing_steps=250", "data.train_subset=12000",
                     "data.eval_every_steps=100"],
    },
    "full": {
        "finetune": ["train.steps=6000", "train.micro_batch_size=32", "data.eval_every_steps=500",
                     "train.precision=auto"],
        "distill": ["train.steps=50000", "train.micro_batch_size=64", "train.precision=auto",
                    "checkpoint.every_steps=2000"],
        "compress": ["train.steps=8000", "schedule.replacing_steps=5000", "train.micro_batch_size=32",
                     "data.eval_every_steps=500", "train.precision=auto"],
    },
}


def run_stage(stage: str, config: Path, run_dir: Path, overrides: list[str], nprocs: int) -> dict:
    summary_path = run_dir / "summary.json"
    if summary_path.is_file() and json.loads(summary_path.read_text()).get("completed"):
        print(f"[{stage}] already complete in {run_dir}; skipping")
        return json.loads(summary_path.read_text())
    launcher = {"finetune": "finetune_teacher.py", "distill": "distill.py", "compress": "compress.py"}[stage]
    from arc_dist.engine.distributed import free_port

    # A free rendezvous port per job: the launcher's default (29500) collides with anything else running here.
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nprocs), "--master_port", str(free_port()),
           str(REPO / "launchers" / launcher), "--config", str(config), f"run_dir={run_dir}", "--resume", "auto",
           *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print(f"[{stage}] + {' '.join(cmd)}", flush=True)
    rc = subprocess.call(cmd, cwd=REPO, env=env)
    if rc != 0 or not summary_path.is_file():
        raise ArcError(f"stage {stage} failed (exit code {rc}); its log is above, its run directory is {run_dir}")
    summary = json.loads(summary_path.read_text())
    if not summary.get("completed"):
        raise ArcError(f"stage {stage} stopped before the end (step {summary.get('step')}); re-run to resume")
    return summary


def report(teacher_dir: Path, student_dir: Path, task: str, glue_dir: str | None, out: Path) -> dict:
    """Teacher vs student: dev metrics (from their metrics.json), parameters, latency on one dev batch."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from arc_dist.data.glue import get_task, load_glue
    from arc_dist.metrics import compare_latency

    spec = get_task(task)
    models = {name: AutoModelForSequenceClassification.from_pretrained(path).eval()
              for name, path in (("teacher", teacher_dir), ("student", student_dir))}
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    dev = load_glue(spec, spec.dev_splits[0], glue_dir)[:32]
    batch = tokenizer([ex.text_a for ex in dev], [ex.text_b for ex in dev] if spec.is_pair else None,
                      padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    latency = compare_latency(models, dict(batch), repeats=10)
    rows = {}
    for name, path in (("teacher", teacher_dir), ("student", student_dir)):
        metrics = json.loads((path / "metrics.json").read_text())
        rows[name] = {"metric": metrics[spec.main_metric], "params_m": sum(p.numel() for p in models[name].parameters()) / 1e6,
                      "latency_ms": latency[name] * 1e3, "layers": models[name].config.num_hidden_layers,
                      "hidden": models[name].config.hidden_size}
    result = {"task": spec.name, "metric": spec.main_metric, "batch": [32, 128], **rows,
              "retention": rows["student"]["metric"] / rows["teacher"]["metric"] if rows["teacher"]["metric"] else None,
              "speedup": rows["teacher"]["latency_ms"] / rows["student"]["latency_ms"]}
    (out / "report.json").write_text(json.dumps(result, indent=2))
    print(f"\n| model | layers x hidden | {spec.name} dev {spec.main_metric} | parameters | latency (32x128) |")
    print("|---|---|---|---|---|")
    for name in ("teacher", "student"):
        r = rows[name]
        print(f"| {name} | {r['layers']}x{r['hidden']} | {r['metric']:.4f} | {r['params_m']:.1f}M | "
              f"{r['latency_ms']:.0f} ms |")
    print(f"\nstudent keeps {100 * (result['retention'] or 0):.1f}% of the teacher's {spec.main_metric} and runs "
          f"{result['speedup']:.2f}x faster on this machine. Report: {out / 'report.json'}")
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="arc compress", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", help="pre-trained teacher directory (fine-tuned in step 1)")
    p.add_argument("--teacher-finetuned", help="a teacher already fine-tuned on the task: skip step 1")
    p.add_argument("--student", help="a stage-1 student (AutoModel directory): skip step 2")
    p.add_argument("--task", default="sst2")
    p.add_argument("--glue-dir", help="local glue_data folder; default: the Hugging Face glue dataset")
    p.add_argument("--text", nargs="*", default=[], help="stage-1 corpus text files/folders (or hf:name)")
    p.add_argument("--out", default="runs/pipeline")
    p.add_argument("--nprocs", type=int, default=2, help="local ranks (GPUs, or CPU processes)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="demo")
    p.add_argument("--full", action="store_const", const="full", dest="profile", help="same as --profile full")
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--student-hidden", type=int, default=384)
    p.add_argument("--student-heads", type=int, default=12)
    p.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help=f"override a stage's config, STAGE in {STAGES} (repeatable)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    try:
        if not (args.teacher or args.teacher_finetuned):
            raise ConfigError("give --teacher (pre-trained, to fine-tune) or --teacher-finetuned")
        if not args.student and not args.text:
            raise ConfigError("stage 1 needs --text (corpus files), or give a stage-1 --student")
        extra: dict[str, list[str]] = {s: list(PROFILES[args.profile][s]) for s in STAGES}
        for item in args.set:
            stage, _, rest = item.partition(".")
            if stage not in STAGES or "=" not in rest:
                raise ConfigError(f"--set {item!r}: use STAGE.key=value with STAGE in {STAGES}")
            extra[stage].append(rest)
        glue = [f"data.task={args.task}"] + ([f"data.glue_dir={Path(args.glue_dir).resolve()}"] if args.glue_dir else [])
        out.mkdir(parents=True, exist_ok=True)

        teacher = Path(args.teacher_finetuned).resolve() if args.teacher_finetuned else None
        if teacher is None:
            run_stage("finetune", REPO / "configs" / "finetune_minilm_sst2.yaml", out / "teacher",
                      [f"model={Path(args.teacher).resolve()}", *glue, *extra["finetune"]], args.nprocs)
            teacher = out / "teacher" / "model"

        student = Path(args.student).resolve() if args.student else None
        if student is None:
            from arc_dist.demo import ensure_corpus

            from arc_dist.models.builders import load_model_config

            pretrained = Path(args.teacher).resolve() if args.teacher else teacher
            same_width = load_model_config(str(pretrained)).hidden_size == args.student_hidden
            corpus = ensure_corpus(args.text, pretrained, out / "corpus", seq_len=128,
                                   min_shards=max(4, 2 * args.nprocs))
            run_stage("distill", REPO / "configs" / "distill_minilm.yaml", out / "stage1",
                      [f"teacher.path={pretrained}", f"student.embeddings_from_teacher={str(same_width).lower()}",
                       f"data.path={corpus}", f"student.layers={args.student_layers}",
                       f"student.hidden={args.student_hidden}", f"student.heads={args.student_heads}",
                       f"student.intermediate={4 * args.student_hidden}", *extra["distill"]], args.nprocs)
            student = out / "stage1" / "student"

        run_stage("compress", REPO / "configs" / "compress_minilm_sst2.yaml", out / "stage2",
                  [f"teacher={teacher}", f"student.path={student}", *glue, *extra["compress"]], args.nprocs)
        report(teacher, out / "stage2" / "best", args.task, args.glue_dir, out)
    except ArcError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
