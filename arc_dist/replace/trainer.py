"""Stage 2 (one-to-one layer replacement) and plain GLUE fine-tuning, the whole job in one place.

    step t:  p = schedule.rate(t);  mask = sampler.mask(t, p)        # the same on every rank, no communication
             logits = hybrid(batch, student_mask=mask)               # slot i: student layer i, or teacher phi(i)
             loss = task_loss(logits, labels) [+ kd * KL(teacher || student)];  backward;  step

Fine-tuning (the teacher, or a baseline student) is the same loop without a hybrid: the model is trained alone.
Evaluation always runs the student alone, over the whole dev set split across ranks; the best evaluation is
exported to `best/`, the final model to `student/` (or `model/` for fine-tuning), each with a `metrics.json`.
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
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification

from arc_dist.config import CompressJobConfig, FinetuneJobConfig, KDConfig, save_config
from arc_dist.data.corpus import tokenizer_fingerprint
from arc_dist.data.glue import GlueDataset, TaskSpec, collate_glue, get_task, load_glue
from arc_dist.data.metrics import compute_glue_metrics
from arc_dist.data.sampling import ResumableBatchSampler, shard_for_eval, subset_indices
from arc_dist.distill.trainer import build_optimizer, build_scheduler
from arc_dist.engine.checkpoint import Checkpointer
from arc_dist.engine.distributed import DistEnv, init_distributed, load_ds_config, resolve_dtype, zero_stage
from arc_dist.engine.divergence import DivergenceGuard, check_skipping_supported
from arc_dist.engine.faults import poison_loss
from arc_dist.engine.preemption import STOP_FILE, PreemptionHandler
from arc_dist.engine.watchdog import RankWatchdog
from arc_dist.errors import ConfigError
from arc_dist.metrics import MetricsLogger, Throughput, peak_memory_gib, setup_logging
from arc_dist.models.builders import load_model_config, load_tokenizer
from arc_dist.models.export import export_hf_model
from arc_dist.models.family import family_for
from arc_dist.replace.hybrid import HybridModel
from arc_dist.replace.mapping import layer_mapping
from arc_dist.replace.sampler import ReplacementSampler
from arc_dist.replace.schedule import ReplacementSchedule

log = logging.getLogger("arc_dist")


@dataclass
class GlueModels:
    """What a job trains, and how: the engine's module, the student inside it, the replacement machinery."""

    module: nn.Module  # HybridModel for compression, the seq-cls model itself for fine-tuning
    student: nn.Module  # the AutoModelForSequenceClassification that is evaluated and exported
    tokenizer: Any
    schedule: ReplacementSchedule | None = None
    sampler: ReplacementSampler | None = None
    kd_teacher: str | None = None
    export_name: str = "student"


def train_glue(cfg: FinetuneJobConfig | CompressJobConfig) -> dict[str, Any]:
    setup_logging(int(os.environ.get("RANK", "0")))
    spec = get_task(cfg.data.task)
    run_dir = Path(cfg.run_dir)
    dtype = resolve_dtype(cfg.train.precision)
    bf16 = dtype == torch.bfloat16
    mbs, accum = cfg.train.micro_batch_size, cfg.train.grad_accum

    # ---- data first: a bad GLUE file fails before any model is loaded ----
    models = build_compress(cfg, spec) if isinstance(cfg, CompressJobConfig) else build_finetune(cfg, spec)
    train_set = GlueDataset(_subset(load_glue(spec, "train", cfg.data.glue_dir), cfg.data.train_subset,
                                    cfg.train.seed), models.tokenizer, cfg.data.max_seq_len)
    dev_sets = {split: GlueDataset(load_glue(spec, split, cfg.data.glue_dir), models.tokenizer,
                                   cfg.data.max_seq_len) for split in spec.dev_splits}
    student_ds = load_ds_config(cfg.train.student_ds_config, {
        "train_micro_batch_size_per_gpu": mbs, "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip, "bf16.enabled": bf16,
    })
    check_skipping_supported(student_ds, cfg.train.student_ds_config)
    teacher_ds = load_ds_config(cfg.train.teacher_ds_config,
                                {"train_micro_batch_size_per_gpu": mbs, "bf16.enabled": bf16})
    env = init_distributed()  # after every check that needs only configs, model configs and data files
    watchdog = RankWatchdog(env.rank, env.world_size, cfg.train.rank_timeout_s)  # a dead rank ends the job, bounded
    if env.is_main:
        save_config(cfg, run_dir / "config.yaml")
        log.info("%s: %d training examples, dev %s", spec.name, len(train_set),
                 {k: len(v) for k, v in dev_sets.items()})

    # ---- engines: the trained module (ZeRO-2 default), and a ZeRO-3 inference teacher for logit KD ----
    optimizer = build_optimizer(models.module, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim.warmup_steps, cfg.train.steps)
    engine, _, _, scheduler = deepspeed.initialize(model=models.module, optimizer=optimizer,
                                                   lr_scheduler=scheduler, config=student_ds)
    kd_engine = None
    if cfg.kd.weight > 0:
        kd_model = AutoModelForSequenceClassification.from_pretrained(models.kd_teacher, dtype=dtype)
        kd_model.eval().requires_grad_(False)
        kd_engine, *_ = deepspeed.initialize(model=kd_model, config=teacher_ds)
    log.info("training %s (%.1fM trainable parameters), ZeRO-%d, %s%s", type(models.module).__name__,
             sum(p.numel() for p in models.module.parameters() if p.requires_grad) / 1e6, zero_stage(student_ds),
             "bf16" if bf16 else "fp32", f", logit KD weight {cfg.kd.weight}" if kd_engine else "")

    # ---- resume ----
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep_last, env.rank)
    tag = checkpointer.resolve(cfg.checkpoint.resume)
    state: dict[str, Any] = {"step": 0, "best": None, "consecutive_skips": 0}
    torch.manual_seed(cfg.train.seed + env.rank)
    if tag is not None:
        state = checkpointer.load(engine, tag, strict=False)  # frozen teacher layers are not in checkpoints
        if models.sampler is not None:
            models.sampler.load_state_dict(state["sampler"])
        log.info("resumed from %s at step %d", checkpointer.dir / tag, state["step"])
    start_step = state["step"]
    divergence = DivergenceGuard(cfg.train.max_consecutive_skips, state.get("consecutive_skips", 0))
    loader = DataLoader(
        train_set, collate_fn=lambda b: collate_glue(b, models.tokenizer.pad_token_id),
        batch_sampler=ResumableBatchSampler(len(train_set), mbs, env.rank, env.world_size, cfg.train.seed,
                                            start_batch=start_step * accum),
        # Creating the iterator draws a seed; from a private generator, never the global RNG (dropout's stream).
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    batches = iter(loader)
    metrics = MetricsLogger(run_dir / "tensorboard", env.rank, cfg.train.steps, start_step, cfg.metrics.progress_bar)
    masks_log = open(run_dir / "masks.jsonl", "a") if env.is_main and models.sampler is not None else None
    preemption = PreemptionHandler(run_dir / STOP_FILE)
    throughput = Throughput()
    best = state["best"]
    step = start_step
    eval_metrics: dict[str, float] = {}

    # ---- the loop ----
    engine.train()  # from_pretrained returns models in eval mode: dropout must be on from the first step
    for step in range(start_step + 1, cfg.train.steps + 1):
        t = step - 1  # optimizer steps completed before this one: the schedule's and sampler's clock
        rate, mask = 1.0, None
        if models.sampler is not None:
            rate = models.schedule.rate(t)
            mask = models.sampler.mask(t, rate)
            _check_masks_agree(mask, step, rate, env, masks_log)
        # loss summed over micro-steps; stop flag. On the device: NCCL reduces only CUDA tensors.
        sums = torch.zeros(2, dtype=torch.float64, device=env.device)
        for _ in range(accum):
            batch = next(batches)
            labels = batch.pop("labels").to(env.device)
            batch.pop("index")
            inputs = {k: v.to(env.device) for k, v in batch.items()}
            logits = _logits(engine, models, inputs, mask)
            loss = task_loss(logits, labels, spec)
            if kd_engine is not None:
                with torch.no_grad():
                    teacher_logits = kd_engine(**inputs).logits
                loss = loss + cfg.kd.weight * kd_loss(logits, teacher_logits, cfg.kd, spec)
            loss = poison_loss(loss, step, env.rank)  # ARC_FAULTS (tests only): a NaN at a chosen step
            engine.backward(loss)
            engine.step()
            sums[0] += loss.detach().double()
            throughput.add(labels.shape[0])
        sums[1] = float(preemption.requested)
        dist.all_reduce(sums)
        loss_value = sums[0].item() / (accum * env.world_size)
        stop = sums[1].item() > 0 or step == cfg.train.stop_at_step
        metrics.advance(loss=loss_value)
        # DeepSpeed skips an update with non-finite gradients on every rank alike; N skips in a row raise here.
        skipped = divergence.check(engine, step, loss_value, checkpointer, metrics)

        if step % cfg.metrics.log_every == 0 or step == cfg.train.steps or skipped:
            samples_per_sec, _ = throughput.rate()
            scalars = {"train/loss": loss_value, "train/lr": scheduler.get_last_lr()[0],
                       "train/grad_norm": float(engine.get_global_grad_norm() or 0.0),
                       "train/skipped_steps": engine.skipped_steps,
                       "perf/samples_per_sec": samples_per_sec * env.world_size,
                       "memory/peak_gib": peak_memory_gib(env.device)}
            if models.sampler is not None:
                scalars["train/replacing_rate"] = rate
                scalars["train/student_layers_active"] = float(mask.sum())
            metrics.log(step, scalars)
        every = cfg.data.eval_every_steps
        if step == cfg.train.steps or (every and step % every == 0):
            eval_metrics = evaluate(engine, models, dev_sets, spec, env, cfg.data.eval_batch_size)
            metrics.log(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
            if best is None or eval_metrics[spec.main_metric] > best[spec.main_metric]:
                best = {**eval_metrics, "step": step}
                export_hf_model(engine, models.student, models.tokenizer, run_dir / "best", env.rank,
                                extra={"metrics.json": {**best, "task": spec.name}})
        every = cfg.checkpoint.every_steps
        if stop or step == cfg.train.steps or (every and step % every == 0):
            trainer_state = {"step": step, "data_batches": step * accum, "best": best,
                             "consecutive_skips": divergence.consecutive}
            if models.sampler is not None:
                trainer_state["sampler"] = models.sampler.state_dict()
            checkpointer.save(engine, step, trainer_state, exclude_frozen=True)
        if stop:
            log.warning("stopping at step %d (%s); checkpoint written, resume continues from it", step,
                        preemption.signal_name or "train.stop_at_step or another rank's request")
            if env.is_main:
                preemption.consume()
            break

    metrics.close()
    if masks_log is not None:
        masks_log.close()
    summary: dict[str, Any] = {"step": step, "completed": step == cfg.train.steps, "task": spec.name,
                               "final_loss": loss_value if step > start_step else None,
                               "final_eval": eval_metrics, "best_eval": best}
    if summary["completed"]:
        export_dir = run_dir / models.export_name
        export_hf_model(engine, models.student, models.tokenizer, export_dir, env.rank,
                        extra={"metrics.json": {**eval_metrics, "step": step, "task": spec.name}})
        summary["export_dir"] = str(export_dir)
        log.info("exported %s to %s (dev %s); best %s; TensorBoard logs in %s", models.export_name, export_dir,
                 eval_metrics, best, run_dir / "tensorboard")
    if env.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    preemption.restore()
    watchdog.close()
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Building the models
# ---------------------------------------------------------------------------------------------------------------


def load_classifier(path: str, spec: TaskSpec, num_layers: int | None = None) -> nn.Module:
    """An AutoModelForSequenceClassification for the task from any encoder directory (a fresh head if it has
    none), optionally cut to its bottom `num_layers` layers."""
    config = load_model_config(path)
    family_for(config)
    if num_layers is not None:
        if num_layers > config.num_hidden_layers:
            raise ConfigError(f"cannot keep {num_layers} layers of {path}: it has {config.num_hidden_layers}")
        config.num_hidden_layers = num_layers
    config.num_labels = spec.num_labels
    config.problem_type = "regression" if spec.is_regression else "single_label_classification"
    try:
        return AutoModelForSequenceClassification.from_pretrained(path, config=config)
    except (RuntimeError, ValueError) as e:  # e.g. a saved head of another size
        raise ConfigError(f"{path} cannot be loaded as a {spec.num_labels}-label classifier for {spec.name}: {e}") from None


def build_finetune(cfg: FinetuneJobConfig, spec: TaskSpec) -> GlueModels:
    torch.manual_seed(cfg.train.seed)  # the fresh head's init
    model = load_classifier(cfg.model, spec, cfg.truncate_layers)
    return GlueModels(module=model, student=model, tokenizer=load_tokenizer(cfg.model), kd_teacher=cfg.kd_teacher,
                      export_name="model")


def build_compress(cfg: CompressJobConfig, spec: TaskSpec) -> GlueModels:
    teacher_config = load_model_config(cfg.teacher)
    if teacher_config.num_labels != spec.num_labels:
        raise ConfigError(
            f"teacher {cfg.teacher} has {teacher_config.num_labels} labels but {spec.name} has {spec.num_labels}: "
            "pass a teacher fine-tuned on this task (arc finetune-teacher)"
        )
    # The mapping is checked against the configs before any weight is loaded.
    student_layers = (cfg.student.truncate_teacher_layers if cfg.student.truncate_teacher_layers is not None
                      else load_model_config(cfg.student.path).num_hidden_layers)
    mapping = layer_mapping(cfg.mapping.kind, teacher_config.num_hidden_layers, student_layers, cfg.mapping.explicit)
    tokenizer = load_tokenizer(cfg.teacher)
    torch.manual_seed(cfg.train.seed)
    if cfg.student.truncate_teacher_layers is not None:
        student = load_classifier(cfg.teacher, spec, cfg.student.truncate_teacher_layers)
    else:
        _check_same_tokenizer(cfg.student.path, tokenizer, cfg.teacher)
        student = load_classifier(cfg.student.path, spec)
    teacher = AutoModelForSequenceClassification.from_pretrained(cfg.teacher)
    if cfg.student.head == "teacher":
        _copy_head(teacher, student)
    hybrid = HybridModel(student, teacher, mapping)
    log.info("layer mapping (student slot -> teacher layers, 1-based): %s",
             {i + 1: [j + 1 for j in slot] for i, slot in enumerate(mapping)})
    return GlueModels(module=hybrid, student=student, tokenizer=tokenizer,
                      schedule=ReplacementSchedule(cfg.schedule),
                      sampler=ReplacementSampler(len(mapping), cfg.train.seed), kd_teacher=cfg.teacher)


def _check_same_tokenizer(student_path: str, teacher_tokenizer, teacher_path: str) -> None:
    """A student whose directory carries a tokenizer must share the teacher's vocabulary: replacement feeds the
    student's embeddings into teacher layers and back, so ids must mean the same thing."""
    try:
        student_tokenizer = load_tokenizer(student_path)
    except ConfigError:
        return  # no tokenizer saved with the student: it is used with the teacher's
    a, b = tokenizer_fingerprint(student_tokenizer), tokenizer_fingerprint(teacher_tokenizer)
    if a != b:
        raise ConfigError(
            f"the student {student_path} was built with another tokenizer (fingerprint {a}) than the teacher "
            f"{teacher_path} ({b}): distil the student from this teacher (stage 1) or pick a matching one"
        )


def _copy_head(teacher: nn.Module, student: nn.Module) -> None:
    family = family_for(student.config)
    parts = ["classifier"] + (["pooler"] if family.head_on_pooler else [])
    for part in parts:
        src = teacher.get_submodule(part) if part == "classifier" else family.encoder_of(teacher).pooler
        dst = student.get_submodule(part) if part == "classifier" else family.encoder_of(student).pooler
        src_state, dst_state = src.state_dict(), dst.state_dict()
        if {k: v.shape for k, v in src_state.items()} != {k: v.shape for k, v in dst_state.items()}:
            raise ConfigError(
                f"student.head=teacher: the teacher's {part} does not fit the student (widths "
                f"{teacher.config.hidden_size} vs {student.config.hidden_size}); use student.head=fresh"
            )
        dst.load_state_dict(src_state)


# ---------------------------------------------------------------------------------------------------------------
# Step pieces
# ---------------------------------------------------------------------------------------------------------------


def _logits(engine, models: GlueModels, inputs: dict[str, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
    if isinstance(models.module, HybridModel):
        return engine(**inputs, student_mask=mask)
    return engine(**inputs).logits


def task_loss(logits: torch.Tensor, labels: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    if spec.is_regression:
        return F.mse_loss(logits.float().squeeze(-1), labels.float())
    return F.cross_entropy(logits.float(), labels)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, cfg: KDConfig, spec: TaskSpec) -> torch.Tensor:
    """Logit distillation: KL(teacher || student) at temperature T, scaled by T^2 (Hinton et al.); MSE for
    regression."""
    s, t = student_logits.float(), teacher_logits.float()
    if spec.is_regression:
        return F.mse_loss(s, t)
    temp = cfg.temperature
    return F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), log_target=True,
                    reduction="batchmean") * temp * temp


def _check_masks_agree(mask: torch.Tensor, step: int, rate: float, env: DistEnv, log_file) -> None:
    """The sampler makes masks agree by construction; one tiny all-gather per step proves it and records it.
    Ranks running different networks would hang ZeRO-3 or silently average unrelated gradients under DDP.
    The sampler draws on the host; the gather runs on the device (NCCL takes only CUDA tensors)."""
    local = mask.to(env.device, torch.uint8)
    gathered = [torch.empty_like(local) for _ in range(env.world_size)]
    dist.all_gather(gathered, local)
    rows = [g.tolist() for g in gathered]
    if log_file is not None:
        log_file.write(json.dumps({"step": step, "rate": rate, "masks": rows}) + "\n")
        log_file.flush()
    if any(r != rows[0] for r in rows):
        raise RuntimeError(f"replacement masks differ across ranks at step {step}: {rows}")


@torch.no_grad()
def evaluate(engine, models: GlueModels, dev_sets: dict[str, GlueDataset], spec: TaskSpec, env,
             batch_size: int) -> dict[str, float]:
    """The student alone on every dev split, each rank a disjoint share, scored on rank 0 over the whole set.

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively inside forward),
    so a rank with a smaller share pads with a repeated example whose prediction is discarded.
    """
    engine.eval()
    results: dict[str, float] = {}
    for i, (split, dataset) in enumerate(dev_sets.items()):
        own = shard_for_eval(len(dataset), env.rank, env.world_size)
        per_rank = -(-len(dataset) // env.world_size)
        padded = own + [own[0] if own else 0] * (per_rank - len(own))
        predictions: list[tuple[int, list[float]]] = []
        for start in range(0, per_rank, batch_size):
            chunk = padded[start : start + batch_size]
            batch = collate_glue([dataset[j] for j in chunk], models.tokenizer.pad_token_id)
            batch.pop("labels")
            index = batch.pop("index").tolist()
            logits = _logits(engine, models, {k: v.to(env.device) for k, v in batch.items()}, None)
            for pos, (j, row) in enumerate(zip(index, logits.float().cpu().tolist())):
                if start + pos < len(own):
                    predictions.append((j, row))
        gathered: list[Any] = [None] * env.world_size
        dist.all_gather_object(gathered, predictions)
        scores: list[dict[str, float] | None] = [None]
        if env.is_main:
            merged = sorted(p for part in gathered for p in part)
            assert [j for j, _ in merged] == list(range(len(dataset))), "evaluation lost or duplicated examples"
            preds = torch.tensor([row for _, row in merged])
            scores[0] = compute_glue_metrics(spec, preds, dataset.labels)
        dist.broadcast_object_list(scores, src=0)
        suffix = "" if i == 0 else f"_{split.removeprefix('dev_')}"
        results.update({f"{k}{suffix}": v for k, v in scores[0].items()})
    engine.train()
    return results


def _subset(examples: list, size: int | None, seed: int) -> list:
    return [examples[i] for i in subset_indices(len(examples), size, seed)]
