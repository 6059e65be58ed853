"""Teacher truncation, family adapters and the student builder against plain Hugging Face forwards."""

from __future__ import annotations

import pytest
import torch

from arc_dist.config import StudentConfig
from arc_dist.errors import ConfigError
from arc_dist.models.builders import (
    build_student,
    default_relation_heads,
    freeze_unused_student_params,
    load_model_config,
    load_teacher_qkv,
    resolve_teacher_layer,
)
from arc_dist.models.family import QKVExtractor, family_for
from helpers import make_bert, make_tokenizer

FAMILIES = ["bert", "roberta", "xlm-roberta", "electra"]


def hooked_qkv(model, layer_index: int, ids, mask):
    """Reference: run the full HF model and capture the Q/K/V Linear outputs of one layer with forward hooks."""
    captured = {}
    attn = model.encoder.layer[layer_index].attention.self
    handles = [getattr(attn, n).register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o))
               for n in ("query", "key", "value")]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    return captured["query"], captured["key"], captured["value"]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_truncated_teacher_matches_full_model(tmp_path, model_type):
    tok = make_tokenizer(tmp_path)
    full = make_bert(tmp_path, vocab_size=len(tok), layers=4, hidden=32, heads=4, intermediate=64,
                     max_positions=40, model_type=model_type).eval()
    ids = torch.randint(5, len(tok), (3, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 12:] = 0
    mask[2, 5:] = 0
    teacher = load_teacher_qkv(str(tmp_path), layer=3, ds_config=None, dtype=torch.float32)
    layers = teacher.family.layers(teacher.model)
    assert len(layers) == 3, "layers above the distilled one must not be instantiated"
    last = layers[-1]
    assert isinstance(last.intermediate, torch.nn.Identity) and isinstance(last.output, torch.nn.Identity)
    assert isinstance(last.attention.output, torch.nn.Identity)
    assert getattr(teacher.model, "pooler", None) is None
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        got = teacher(ids, mask)
    for g, r in zip(got, hooked_qkv(full, 2, ids, mask)):
        # padded query rows may differ in implementation-specific ways; compare the real rows
        torch.testing.assert_close(g[mask.bool()], r[mask.bool()], rtol=1e-5, atol=1e-5)


def test_resolve_teacher_layer():
    assert resolve_teacher_layer(None, 6) == 6
    assert resolve_teacher_layer(None, 12) == 12
    assert resolve_teacher_layer(None, 24) == 21  # MiniLMv2's choice for BERT-large
    assert resolve_teacher_layer(-1, 24) == 24 and resolve_teacher_layer(-4, 24) == 21
    assert resolve_teacher_layer(3, 6) == 3
    for bad in (7, -7):
        with pytest.raises(ConfigError, match="out of range for a 6-layer teacher"):
            resolve_teacher_layer(bad, 6)


def test_default_relation_heads():
    assert default_relation_heads(768, 384) == 48
    assert default_relation_heads(1024, 384) == 64
    assert default_relation_heads(1024, 768) == 64
    assert default_relation_heads(384, 384) == 48
    heads = default_relation_heads(64, 32)
    assert 64 % heads == 0 and 32 % heads == 0 and 32 // heads >= 8


@pytest.mark.parametrize("model_type", FAMILIES)
def test_student_in_teacher_family(tmp_path, model_type):
    tok = make_tokenizer(tmp_path)
    make_bert(tmp_path, vocab_size=len(tok), layers=4, hidden=64, heads=4, model_type=model_type)
    tcfg = load_model_config(str(tmp_path))
    student, family = build_student(tcfg, StudentConfig(layers=2, hidden=32, heads=2, intermediate=48), seed=0)
    assert student.config.model_type == tcfg.model_type and family is family_for(tcfg)
    assert (student.config.num_hidden_layers, student.config.hidden_size, student.config.intermediate_size) == (2, 32, 48)
    assert student.config.vocab_size == tcfg.vocab_size
    extractor = QKVExtractor(student, family, 1)
    frozen = freeze_unused_student_params(extractor)
    assert frozen and all("layer.1." in n or "pooler" in n for n in frozen)
    assert not any("attention.self" in n for n in frozen)
    ids = torch.randint(5, len(tok), (2, 10))
    q, k, v = extractor(ids, torch.ones_like(ids))
    (q.sum() + k.sum() + v.sum()).backward()
    for name, p in student.named_parameters():
        if p.requires_grad and "word_embeddings" not in name and "token_type" not in name:
            assert p.grad is not None, f"trainable {name} got no gradient"


def test_student_init_size_mismatch(tmp_path):
    tok = make_tokenizer(tmp_path / "t")
    make_bert(tmp_path / "t", vocab_size=len(tok), layers=4, hidden=64, heads=4)
    make_bert(tmp_path / "s", vocab_size=len(tok), layers=3, hidden=32, heads=4)
    tcfg = load_model_config(str(tmp_path / "t"))
    with pytest.raises(ConfigError, match="3 layers x 32 wide"):
        build_student(tcfg, StudentConfig(layers=2, hidden=32, heads=4, init=str(tmp_path / "s")), seed=0)


def test_missing_or_bad_teacher(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_model_config(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="without config.json"):
        load_model_config(str(tmp_path / "empty"))
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="not supported"):
        family_for(load_model_config(str(tmp_path / "gpt2")))


def test_student_embeddings_from_teacher(tmp_path):
    tok = make_tokenizer(tmp_path)
    teacher = make_bert(tmp_path, vocab_size=len(tok), layers=3, hidden=32, heads=4)
    tcfg = load_model_config(str(tmp_path))
    student, _ = build_student(tcfg, StudentConfig(layers=2, hidden=32, heads=4, embeddings_from_teacher=True),
                               seed=0, teacher_path=str(tmp_path))
    for name, value in teacher.embeddings.state_dict().items():
        torch.testing.assert_close(student.embeddings.state_dict()[name], value, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="needs student.hidden"):
        build_student(tcfg, StudentConfig(layers=2, hidden=16, heads=4, embeddings_from_teacher=True),
                      seed=0, teacher_path=str(tmp_path))


def test_student_layers_from_teacher(tmp_path):
    tok = make_tokenizer(tmp_path)
    teacher = make_bert(tmp_path, vocab_size=len(tok), layers=4, hidden=32, heads=4, intermediate=128)
    tcfg = load_model_config(str(tmp_path))
    like_teacher = dict(hidden=32, heads=4, intermediate=128, embeddings_from_teacher=True)
    for spec, picked in (("uniform", [2, 4]), ([1, 3], [1, 3])):
        student, family = build_student(tcfg, StudentConfig(layers=2, layers_from_teacher=spec, **like_teacher),
                                        seed=0, teacher_path=str(tmp_path))
        for student_layer, teacher_layer in zip(family.layers(student), picked):
            for name, value in family.layers(teacher)[teacher_layer - 1].state_dict().items():
                torch.testing.assert_close(student_layer.state_dict()[name], value, rtol=0, atol=0)
        for name, value in teacher.embeddings.state_dict().items():
            torch.testing.assert_close(student.embeddings.state_dict()[name], value, rtol=0, atol=0)
        # The copied network computes what the teacher's layers compute in that order.
        ids = torch.randint(5, len(tok), (2, 7))
        h = teacher.eval().embeddings(input_ids=ids)
        for teacher_layer in picked:
            out = family.layers(teacher)[teacher_layer - 1](h)
            h = out[0] if isinstance(out, tuple) else out
        torch.testing.assert_close(student.eval()(input_ids=ids).last_hidden_state, h, rtol=1e-5, atol=1e-5)

    bad = [
        (dict(layers_from_teacher=[3, 1]), "strictly increasing"),
        (dict(layers_from_teacher="uniform", hidden=16), "student.hidden must equal the teacher's 32"),
        (dict(layers_from_teacher=[1, 5]), "out of range"),
        (dict(layers_from_teacher=[1, 2, 3]), "has 3 entries but the student has 2"),
        (dict(layers_from_teacher="uniform", intermediate=64), "student.intermediate must equal the teacher's 128"),
        (dict(layers_from_teacher="uniform", heads=8), "student.heads must equal the teacher's 4"),
    ]
    for change, message in bad:
        with pytest.raises(ConfigError, match=message):
            build_student(tcfg, StudentConfig(layers=2, **{**like_teacher, **change}), seed=0,
                          teacher_path=str(tmp_path))


def test_layers_from_teacher_config_checks():
    from arc_dist.config import DistillJobConfig, load_config

    base = ["teacher.path=t", "data.path=d"]
    cfg = load_config(DistillJobConfig, overrides=[*base, "student.layers_from_teacher=[2,4,6]",
                                                   "student.embeddings_from_teacher=true"])
    assert cfg.student.layers_from_teacher == [2, 4, 6]
    with pytest.raises(ConfigError, match="set student.embeddings_from_teacher=true as well"):
        load_config(DistillJobConfig, overrides=[*base, "student.layers_from_teacher=uniform"])
    with pytest.raises(ConfigError, match="layers_from_teacher"):
        load_config(DistillJobConfig, overrides=[*base, "student.layers_from_teacher=middle",
                                                 "student.embeddings_from_teacher=true"])
    with pytest.raises(ConfigError, match="set either student.init or those"):
        load_config(DistillJobConfig, overrides=[*base, "student.init=s", "student.embeddings_from_teacher=true"])
