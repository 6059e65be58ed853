"""Loading the frozen teacher (truncated, optionally ZeRO-3-partitioned at load) and building the student."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig
from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

from arc_dist.config import StudentConfig
from arc_dist.errors import ConfigError
from arc_dist.models.family import FamilyAdapter, QKVExtractor, family_for
from arc_dist.replace.mapping import layer_mapping


def load_model_config(path: str) -> PretrainedConfig:
    """The teacher's config alone (cheap), so that every size check runs before any weight is loaded."""
    local = Path(path)
    if local.is_dir() and not (local / "config.json").is_file():
        raise ConfigError(f"teacher.path={path!r} is a directory without config.json: point it at a save_pretrained directory")
    if not local.exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise ConfigError(f"teacher.path={path!r} does not exist")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"teacher.path={path!r} could not be loaded as a Hugging Face config: {e}") from None


def load_tokenizer(path: str):
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"no tokenizer could be loaded from {path!r} (the teacher's directory must hold one): {e}") from None


def resolve_teacher_layer(layer: int | None, num_layers: int) -> int:
    """1-based index of the distilled teacher layer (the method's default rule when `layer` is None)."""
    if layer is None:
        # MiniLMv2: the last layer for base-size teachers; an upper-middle layer (21 of 24) for large ones.
        return num_layers if num_layers <= 12 else round(0.875 * num_layers)
    resolved = layer if layer > 0 else num_layers + 1 + layer
    if not 1 <= resolved <= num_layers:
        raise ConfigError(
            f"teacher.layer={layer} is out of range for a {num_layers}-layer teacher: "
            f"use 1..{num_layers} or -1..-{num_layers}"
        )
    return resolved


def default_relation_heads(teacher_width: int, student_width: int) -> int:
    """MiniLMv2's choice: 48 relation heads for base width (768), 64 for large (>= 1024); else a common divisor."""
    for heads in (64, 48) if teacher_width >= 1024 else (48,):
        if teacher_width % heads == 0 and student_width % heads == 0:
            return heads
    g = torch.gcd(torch.tensor(teacher_width), torch.tensor(student_width)).item()
    candidates = [h for h in range(1, 49) if g % h == 0 and min(teacher_width, student_width) // h >= 8]
    return max(candidates) if candidates else 1


def load_teacher_qkv(path: str, layer: int, ds_config: dict[str, Any] | None, dtype: torch.dtype) -> QKVExtractor:
    """The frozen teacher, truncated at the Q/K/V projections of 1-based `layer`.

    Layers above `layer` are never instantiated (the config is cut to `layer` layers, so from_pretrained skips
    their weights). Layer `layer`'s attention output, FFN and the pooler are deleted right after load. With a
    ZeRO-3 `ds_config`, an `HfDeepSpeedConfig` is alive during from_pretrained, so every parameter is partitioned
    across ranks as it is loaded and no rank ever holds the whole teacher.
    """
    config = load_model_config(path)
    family = family_for(config)
    config.num_hidden_layers = layer
    hf_ds = HfDeepSpeedConfig(ds_config) if ds_config is not None else None
    try:
        model = AutoModel.from_pretrained(path, config=config, dtype=dtype)
    finally:
        # The global HfDeepSpeedConfig would make every later HF constructor (the student's) partition too.
        del hf_ds
        unset_hf_deepspeed_config()
    _drop_unused(model, family, layer - 1)
    model.eval()
    model.requires_grad_(False)
    return QKVExtractor(model, family, layer - 1)


def build_student(
    teacher_config: PretrainedConfig, cfg: StudentConfig, seed: int, teacher_path: str | None = None
) -> tuple[nn.Module, FamilyAdapter]:
    """A student of the teacher's family and vocabulary, sized by `cfg`; random init or from `cfg.init`,
    optionally with the teacher's embeddings (`cfg.embeddings_from_teacher`, read from `teacher_path`)."""
    family = family_for(teacher_config)
    if cfg.init:
        model = AutoModel.from_pretrained(cfg.init)
        got = (model.config.num_hidden_layers, model.config.hidden_size)
        if got != (cfg.layers, cfg.hidden):
            raise ConfigError(
                f"student.init={cfg.init!r} has {got[0]} layers x {got[1]} wide, but student.layers={cfg.layers}, "
                f"student.hidden={cfg.hidden}: make them agree"
            )
        return model, family
    overrides: dict[str, Any] = dict(
        num_hidden_layers=cfg.layers,
        hidden_size=cfg.hidden,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.intermediate or 4 * cfg.hidden,
    )
    if hasattr(teacher_config, "embedding_size"):
        overrides["embedding_size"] = cfg.hidden
    student_config = AutoConfig.for_model(
        teacher_config.model_type, **{**_family_fields(teacher_config), **overrides}
    )
    torch.manual_seed(seed)
    student = AutoModel.from_config(student_config)
    if cfg.embeddings_from_teacher or cfg.layers_from_teacher is not None:
        _copy_from_teacher(student, family, teacher_config, cfg, teacher_path)
    return student, family


def student_layers_from_teacher(teacher_config: PretrainedConfig, cfg: StudentConfig) -> list[int]:
    """The 1-based teacher layer each student layer is initialised from (`cfg.layers_from_teacher`; [] when unset).

    Checked against the teacher's config alone, so stage 1 can refuse a bad value before loading anything."""
    if cfg.layers_from_teacher is None:
        return []
    want = {"student.hidden": (cfg.hidden, teacher_config.hidden_size),
            "student.heads": (cfg.heads, teacher_config.num_attention_heads),
            "student.intermediate": (cfg.intermediate or 4 * cfg.hidden, teacher_config.intermediate_size)}
    for key, (got, teacher_value) in want.items():
        if got != teacher_value:
            raise ConfigError(f"student.layers_from_teacher copies whole teacher layers, so {key} must equal "
                              f"the teacher's {teacher_value}, got {got}")
    kind = "uniform" if cfg.layers_from_teacher == "uniform" else "explicit"
    explicit = None if kind == "uniform" else cfg.layers_from_teacher
    try:
        slots = layer_mapping(kind, teacher_config.num_hidden_layers, cfg.layers, explicit=explicit)
    except ConfigError as e:
        raise ConfigError(f"student.layers_from_teacher={cfg.layers_from_teacher}: {e}") from None
    return [slot[0] + 1 for slot in slots]


def _copy_from_teacher(
    student: nn.Module, family: FamilyAdapter, teacher_config: PretrainedConfig, cfg: StudentConfig,
    teacher_path: str | None,
) -> None:
    """Copy the teacher's embeddings and, with `cfg.layers_from_teacher`, chosen layers into a fresh student."""
    picked = student_layers_from_teacher(teacher_config, cfg)
    if teacher_config.hidden_size != cfg.hidden or teacher_path is None:
        raise ConfigError(f"student.embeddings_from_teacher needs student.hidden == the teacher's width "
                          f"({teacher_config.hidden_size}), got {cfg.hidden}")
    # A copy of the teacher cut at the highest layer needed (0 layers: embeddings only) loads nothing above it.
    cut = copy.deepcopy(teacher_config)
    cut.num_hidden_layers = max(picked, default=0)
    source = AutoModel.from_pretrained(teacher_path, config=cut)
    student.embeddings.load_state_dict(source.embeddings.state_dict())
    for student_layer, teacher_layer in zip(family.layers(student), picked):
        student_layer.load_state_dict(family.layers(source)[teacher_layer - 1].state_dict())


def freeze_unused_student_params(extractor: QKVExtractor) -> list[str]:
    """Stage 1 gives no gradient to the student's last-layer attention output/FFN or pooler: freeze them.

    This keeps them out of the optimizer (no state, no decay) and out of ZeRO's gradient bookkeeping.
    Returns the frozen parameter names.
    """
    model, family = extractor.model, extractor.family
    last = family.layers(model)[extractor.layer_index]
    frozen_modules = list(family.unused_above_qkv(last))
    for name in ("pooler",):
        if getattr(model, name, None) is not None:
            frozen_modules.append(getattr(model, name))
    ids = {id(p) for m in frozen_modules for p in m.parameters()}
    names = []
    for name, p in model.named_parameters():
        if id(p) in ids:
            p.requires_grad_(False)
            names.append(name)
    return names


def _drop_unused(model: nn.Module, family: FamilyAdapter, layer_index: int) -> None:
    last = family.layers(model)[layer_index]
    for module in family.unused_above_qkv(last):
        for name, child in list(last.named_modules()):
            if child is module and name:
                parent_name, _, attr = name.rpartition(".")
                parent = last.get_submodule(parent_name) if parent_name else last
                setattr(parent, attr, nn.Identity())
    if getattr(model, "pooler", None) is not None:
        model.pooler = None


def _family_fields(config: PretrainedConfig) -> dict[str, Any]:
    """Fields a student must share with its teacher: vocabulary, positions, token types, norms, activation."""
    keep = (
        "vocab_size", "max_position_embeddings", "type_vocab_size", "pad_token_id", "bos_token_id",
        "eos_token_id", "layer_norm_eps", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
        "position_embedding_type", "initializer_range",
    )
    return {k: getattr(config, k) for k in keep if hasattr(config, k)}
