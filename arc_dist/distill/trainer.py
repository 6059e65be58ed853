"""Stage 1: fine-grained self-attention relation distillation (MiniLMv2-style), the whole job in one place.

    teacher (frozen, truncated at layer l's Q/K/V, ZeRO-3 engine)  ─┐
    batch ─┤                                                        ├─ RelationLoss(QQ, KK, VV) ─ backward ─ step
    student (its own engine; last layer computes Q/K/V only)      ─┘

`train` builds the components (data, models, engines, checkpointer, metrics), then runs the loop that reads top
to bottom: fetch a batch, teacher Q/K/V without grad, student Q/K/V, relation loss, backward, step, log,
checkpoint. Everything that can be checked (config, sizes, corpus vs tokenizer) is checked before a weight loads.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from arc_dist.config import DistillJobConfig, OptimConfig, save_config
from arc_dist.data.corpus import validate_corpus
from arc_dist.data.stream import build_stream_loader
from arc_dist.distill.relation_loss import RelationLoss, check_relation_heads
from arc_dist.engine.checkpoint import Checkpointer
from arc_dist.engine.distributed import init_distributed, load_ds_config, resolve_dtype, zero_stage
from arc_dist.engine.divergence import DivergenceGuard, check_skipping_supported
from arc_dist.engine.faults import poison_loss
from arc_dist.engine.preemption import STOP_FILE, PreemptionHandler
from arc_dist.engine.watchdog import RankWatchdog
from arc_dist.metrics import (
    MetricsLogger,
    Throughput,
    encoder_flops_per_token,
    measure_matmul_tflops,
    peak_memory_gib,
    setup_logging,
)
from arc_dist.models.builders import (
    build_student,
    default_relation_heads,
    freeze_unused_student_params,
    load_model_config,
    load_teacher_qkv,
    load_tokenizer,
    resolve_teacher_layer,
    student_layers_from_teacher,
)
from arc_dist.models.export import export_hf_model
from arc_dist.models.family import QKVExtractor

log = logging.getLogger("arc_dist")


@dataclass(frozen=True)
class Stage1Plan:
    """Everything derived from the config and the teacher's config before any weight is loaded."""

    teacher_layer: int  # 1-based
    relation_heads: int
    teacher_width: int
    teacher_intermediate: int
    dtype: torch.dtype
    student_layers_from_teacher: tuple[int, ...] = ()  # 1-based teacher layers the student's layers copy, or ()


def plan_stage1(cfg: DistillJobConfig, world_size: int):
    """Checks that need the teacher's config and the corpus; cheap, and run before any heavy work."""
    tcfg = load_model_config(cfg.teacher.path)
    tokenizer = load_tokenizer(cfg.teacher.path)
    layer = resolve_teacher_layer(cfg.teacher.layer, tcfg.num_hidden_layers)
    heads = cfg.loss.relation_heads or default_relation_heads(tcfg.hidden_size, cfg.student.hidden)
    check_relation_heads(heads, tcfg.hidden_size, cfg.student.hidden)
    init_layers = tuple(student_layers_from_teacher(tcfg, cfg.student))
    validate_corpus(cfg.data.path, tokenizer=tokenizer, seq_len=cfg.data.seq_len, world_size=world_size,
                    num_workers=cfg.data.num_workers)
    plan = Stage1Plan(layer, heads, tcfg.hidden_size, tcfg.intermediate_size, resolve_dtype(cfg.train.precision),
                      init_layers)
    return plan, tcfg, tokenizer


def train(cfg: DistillJobConfig) -> dict[str, Any]:
    # Every check that needs only configs and the corpus manifest runs before the process group forms.
    setup_logging(int(os.environ.get("RANK", "0")))
    plan, teacher_config, tokenizer = plan_stage1(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    bf16 = plan.dtype == torch.bfloat16
    mbs, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    teacher_ds = load_ds_config(cfg.train.teacher_ds_config,
                                {"train_micro_batch_size_per_gpu": mbs, "bf16.enabled": bf16})
    student_ds = load_ds_config(cfg.train.student_ds_config, {
        "train_micro_batch_size_per_gpu": mbs, "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip, "bf16.enabled": bf16,
    })
    check_skipping_supported(student_ds, cfg.train.student_ds_config)
    env = init_distributed()
    watchdog = RankWatchdog(env.rank, env.world_size, cfg.train.rank_timeout_s)  # a dead rank ends the job, bounded
    run_dir = Path(cfg.run_dir)
    if env.is_main:
        save_config(cfg, run_dir / "config.yaml")

    # ---- teacher: truncated, frozen, partitioned across ranks at load (ZeRO-3), its own inference engine ----
    teacher = load_teacher_qkv(cfg.teacher.path, plan.teacher_layer,
                               teacher_ds if zero_stage(teacher_ds) == 3 else None, plan.dtype)
    teacher_engine, *_ = deepspeed.initialize(model=teacher, config=teacher_ds)
    held = [0] * env.world_size
    dist.all_gather_object(held, local_parameter_count(teacher_engine.module))
    log.info("teacher %s: layers 1-%d of %d kept (Q/K/V of layer %d), ZeRO-%d, parameters held per rank: %s of %d",
             cfg.teacher.path, plan.teacher_layer, teacher_config.num_hidden_layers, plan.teacher_layer,
             zero_stage(teacher_ds), held, total_parameter_count(teacher_engine.module))

    # ---- student: same family and vocabulary, last layer feeds only Q/K/V to the loss ----
    student_model, family = build_student(teacher_config, cfg.student, cfg.train.seed, cfg.teacher.path)
    student = QKVExtractor(student_model, family, cfg.student.layers - 1)
    frozen = freeze_unused_student_params(student)
    optimizer = build_optimizer(student, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim.warmup_steps, cfg.train.steps)
    student_engine, _, _, scheduler = deepspeed.initialize(
        model=student, optimizer=optimizer, lr_scheduler=scheduler, config=student_ds)
    init = f"from {cfg.student.init}" if cfg.student.init else "random layers"
    if plan.student_layers_from_teacher:
        init = f"layers copied from teacher layers {list(plan.student_layers_from_teacher)}"
    log.info("student %dx%d (%.1fM parameters, %s, %d frozen tensors above the last Q/K/V), ZeRO-%d, %s",
             cfg.student.layers, cfg.student.hidden, sum(p.numel() for p in student_model.parameters()) / 1e6,
             init, len(frozen), zero_stage(student_ds), "bf16" if bf16 else "fp32")
    relation_loss = RelationLoss(
        plan.relation_heads,
        weights={"qq": cfg.loss.weight_qq, "kk": cfg.loss.weight_kk, "vv": cfg.loss.weight_vv},
        chunk_size=cfg.loss.chunk_size,
    )

    # ---- resume: model/optimizer/scheduler from DeepSpeed, step + data position + RNG from our state ----
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep_last, env.rank)
    tag = checkpointer.resolve(cfg.checkpoint.resume)
    state = {"step": 0, "consecutive_skips": 0}
    torch.manual_seed(cfg.train.seed + env.rank)  # dropout streams differ per rank; restored on resume
    if tag is not None:
        state = checkpointer.load(student_engine, tag)
        log.info("resumed from %s at step %d", checkpointer.dir / tag, state["step"])
    start_step = state["step"]
    divergence = DivergenceGuard(cfg.train.max_consecutive_skips, state.get("consecutive_skips", 0))
    loader = build_stream_loader(
        cfg.data.path, batch_size=mbs, rank=env.rank, world_size=env.world_size, seed=cfg.train.seed,
        num_workers=cfg.data.num_workers, start_batch=start_step * accum,
        shuffle_shards_per_group=cfg.data.shuffle_shards_per_group, tokenizer=tokenizer, seq_len=cfg.data.seq_len,
    )
    batches = iter(loader)

    metrics = MetricsLogger(run_dir / "tensorboard", env.rank, cfg.train.steps, start_step, cfg.metrics.progress_bar)
    peak_tflops = cfg.metrics.peak_tflops or measure_matmul_tflops(env.device, plan.dtype)
    flops_per_token = stage1_flops_per_token(cfg, plan)
    preemption = PreemptionHandler(run_dir / STOP_FILE)
    throughput = Throughput()
    step = start_step
    last_loss = float("nan")

    # ---- the loop ----
    student_engine.train()  # dropout on (a student loaded with student.init comes in eval mode)
    for step in range(start_step + 1, cfg.train.steps + 1):
        # loss, qq, kk, vv summed over micro-steps; stop flag. On the device: NCCL reduces only CUDA tensors.
        sums = torch.zeros(5, dtype=torch.float64, device=env.device)
        for _ in range(accum):
            batch = next(batches)
            tokens = int(batch["attention_mask"].sum())  # counted on the host copy: no device sync (also for the loss)
            batch = {k: v.to(env.device, non_blocking=True) for k, v in batch.items()}
            with torch.no_grad():
                teacher_qkv = teacher_engine(batch["input_ids"], batch["attention_mask"])
            student_qkv = student_engine(batch["input_ids"], batch["attention_mask"])
            out = relation_loss(teacher_qkv, student_qkv, batch["attention_mask"], valid_tokens=tokens)
            loss = poison_loss(out.total, step, env.rank)  # ARC_FAULTS (tests only): a NaN at a chosen step
            student_engine.backward(loss)
            student_engine.step()
            sums[:4] += torch.stack([loss.detach(), *out.per_relation.values()]).double()
            throughput.add(tokens)
        sums[4] = float(preemption.requested)
        dist.all_reduce(sums)  # mean losses over ranks for logging; any rank's stop request stops all ranks
        loss, loss_qq, loss_kk, loss_vv = (sums[:4] / (accum * env.world_size)).tolist()
        last_loss = loss
        stop = sums[4].item() > 0
        metrics.advance(loss=loss)
        # DeepSpeed skips an update with non-finite gradients on every rank alike; N skips in a row raise here.
        skipped = divergence.check(student_engine, step, loss, checkpointer, metrics)

        if step % cfg.metrics.log_every == 0 or step == cfg.train.steps or skipped:
            tokens_per_sec, _ = throughput.rate()
            metrics.log(step, {
                "train/loss": loss, "train/loss_qq": loss_qq, "train/loss_kk": loss_kk, "train/loss_vv": loss_vv,
                "train/lr": scheduler.get_last_lr()[0],
                "train/grad_norm": float(student_engine.get_global_grad_norm() or 0.0),
                "train/skipped_steps": student_engine.skipped_steps,
                "perf/tokens_per_sec": tokens_per_sec * env.world_size,
                "perf/mfu": flops_per_token * tokens_per_sec / (peak_tflops * 1e12),
                "memory/peak_gib": peak_memory_gib(env.device),
            })
        every = cfg.checkpoint.every_steps
        stop = stop or step == cfg.train.stop_at_step
        if stop or step == cfg.train.steps or (every and step % every == 0):
            checkpointer.save(student_engine, step, {"step": step, "data_batches": step * accum,
                                                     "consecutive_skips": divergence.consecutive})
        if stop:
            log.warning("stopping at step %d (%s); checkpoint written, resume continues from it", step,
                        preemption.signal_name or ("train.stop_at_step" if step == cfg.train.stop_at_step
                                                   else "stop requested on another rank"))
            if env.is_main:
                preemption.consume()
            break

    metrics.close()
    summary = {"step": step, "final_loss": last_loss, "completed": step == cfg.train.steps,
               "teacher_layer": plan.teacher_layer, "relation_heads": plan.relation_heads,
               "ranks": env.world_size, "precision": "bf16" if bf16 else "fp32",
               "teacher_params_held_per_rank": held,
               "teacher_params_total": total_parameter_count(teacher_engine.module)}
    if summary["completed"]:
        export_dir = run_dir / "student"
        export_hf_model(student_engine, student_model, tokenizer, export_dir, env.rank,
                        extra={"arc_stage1.json": {**summary, "teacher": cfg.teacher.path}})
        summary["export_dir"] = str(export_dir)
        log.info("exported student to %s; TensorBoard logs in %s", export_dir, run_dir / "tensorboard")
    if env.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    preemption.restore()
    watchdog.close()
    return summary


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases and LayerNorm weights (as BERT)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # A torch optimizer rather than one declared in the DeepSpeed JSON: DeepSpeed's would JIT-compile fused_adam.
    # fused=True: one kernel per parameter group on CPU and CUDA (torch >= 2.4); the same update as the default
    # foreach implementation to float rounding, 4x faster on the stage-1 student's parameters on CPU
    # (benchmarks/RESULTS.md).
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    """Linear warm-up to the peak LR, then linear decay to 0 at the last step."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def local_parameter_count(module: torch.nn.Module) -> int:
    """Parameters this rank actually holds (its ZeRO-3 partition, or the whole tensor when not partitioned)."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())


def total_parameter_count(module: torch.nn.Module) -> int:
    return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in module.parameters())


def stage1_flops_per_token_parts(cfg: DistillJobConfig, plan: Stage1Plan) -> dict[str, float]:
    """Model FLOPs per token of one stage-1 micro-step, by part: teacher forward, student forward, relation loss
    (value and gradient, both computed in its forward) and the student's backward."""
    s, d_s, d_t = cfg.data.seq_len, cfg.student.hidden, plan.teacher_width
    teacher = encoder_flops_per_token(plan.teacher_layer - 1, d_t, plan.teacher_intermediate, s) + 2 * 3 * d_t * d_t
    student_fwd = (encoder_flops_per_token(cfg.student.layers - 1, d_s, cfg.student.intermediate or 4 * d_s, s)
                   + 2 * 3 * d_s * d_s)
    # Per relation: teacher scores (2*S*d_t), student scores (2*S*d_s), and the two gradient matmuls (4*S*d_s).
    loss = 3 * (2 * s * d_t + 6 * s * d_s)
    return {"teacher_fwd": teacher, "student_fwd": student_fwd, "loss": loss, "backward": 2 * student_fwd}


def stage1_flops_per_token(cfg: DistillJobConfig, plan: Stage1Plan) -> float:
    """Model FLOPs per token of one stage-1 micro-step: teacher forward + student forward/backward + loss."""
    return sum(stage1_flops_per_token_parts(cfg, plan).values())
