"""The stage-2 hybrid against hand-run Hugging Face pieces: student path, teacher path, adapters, export, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForSequenceClassification
from transformers.masking_utils import create_bidirectional_mask

from arc_dist.errors import ConfigError
from arc_dist.replace.hybrid import HybridModel
from arc_dist.replace.mapping import layer_mapping
from arc_dist.replace.sampler import ReplacementSampler
from arc_dist.replace.schedule import ReplacementSchedule, ReplacementScheduleConfig

VOCAB = 60
SEQ = 12


def seq_model(
    model_type: str, *, layers: int, hidden: int, num_labels: int = 3, seed: int = 0, dropout: float = 0.1,
    attn: str = "sdpa",
):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=SEQ + 2 + (2 if model_type == "roberta" else 0),
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        **({"embedding_size": hidden} if model_type == "electra" else {}),
    )
    return AutoModelForSequenceClassification.from_config(cfg, attn_implementation=attn)


def batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # padding exercises the attention masks
    mask[-1, 4:] = 0
    return ids, mask


def head(model, model_type: str, hidden: torch.Tensor) -> torch.Tensor:
    """The task head by hand, from each family's modeling code."""
    if model_type == "bert":
        return model.classifier(model.dropout(model.bert.pooler(hidden)))
    return model.classifier(hidden)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "electra"])
def test_all_student_equals_student_forward(model_type):
    student = seq_model(model_type, layers=3, hidden=32, seed=1).eval()
    teacher = seq_model(model_type, layers=6, hidden=32, seed=2)
    hybrid = HybridModel(student, teacher, layer_mapping("uniform", 6, 3)).eval()
    ids, mask = batch()
    with torch.no_grad():
        expected = student(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(hybrid(ids, mask), expected)
        assert torch.equal(hybrid(ids, mask, student_mask=torch.ones(3, dtype=torch.bool)), expected)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize("slots", [[False, False, False], [True, False, True]])
def test_teacher_slots_run_mapped_teacher_layers(model_type, slots):
    student = seq_model(model_type, layers=3, hidden=32, seed=1).eval()
    teacher = seq_model(model_type, layers=6, hidden=32, seed=2).eval()
    hybrid = HybridModel(student, teacher, layer_mapping("uniform", 6, 3)).eval()
    ids, mask = batch()
    base_s, base_t = getattr(student, model_type), getattr(teacher, model_type)
    with torch.no_grad():
        hidden = base_s.embeddings(input_ids=ids)
        attn = create_bidirectional_mask(config=student.config, inputs_embeds=hidden, attention_mask=mask)
        for i, (use_student, teacher_index) in enumerate(zip(slots, [1, 3, 5])):
            layer = base_s.encoder.layer[i] if use_student else base_t.encoder.layer[teacher_index]
            hidden = layer(hidden, attn)
        expected = head(student, model_type, hidden)
        got = hybrid(ids, mask, student_mask=torch.tensor(slots))
    assert torch.equal(got, expected)


def test_teacher_mask_follows_the_teacher_attention_implementation():
    student = seq_model("bert", layers=2, hidden=32, seed=1).eval()
    teacher = seq_model("bert", layers=2, hidden=32, seed=2, attn="eager").eval()
    hybrid = HybridModel(student, teacher, layer_mapping("uniform", 2, 2)).eval()
    ids, mask = batch()
    with torch.no_grad():
        hidden = student.bert.embeddings(input_ids=ids)
        eager = create_bidirectional_mask(config=teacher.config, inputs_embeds=hidden, attention_mask=mask)
        sdpa = create_bidirectional_mask(config=student.config, inputs_embeds=hidden, attention_mask=mask)
        expected = head(student, "bert", student.bert.encoder.layer[1](teacher.bert.encoder.layer[0](hidden, eager), sdpa))
        got = hybrid(ids, mask, student_mask=torch.tensor([False, True]))
    assert torch.equal(got, expected)


def test_block_mapping_runs_every_layer_of_the_block():
    student = seq_model("bert", layers=2, hidden=32, seed=1).eval()
    teacher = seq_model("bert", layers=4, hidden=32, seed=2).eval()
    hybrid = HybridModel(student, teacher, layer_mapping("block", 4, 2)).eval()
    ids, mask = batch()
    with torch.no_grad():
        hidden = student.bert.embeddings(input_ids=ids)
        attn = create_bidirectional_mask(config=student.config, inputs_embeds=hidden, attention_mask=mask)
        for layer in (teacher.bert.encoder.layer[0], teacher.bert.encoder.layer[1], student.bert.encoder.layer[1]):
            hidden = layer(hidden, attn)
        expected = head(student, "bert", hidden)
        got = hybrid(ids, mask, student_mask=torch.tensor([False, True]))
    assert torch.equal(got, expected)


def test_width_mismatch_gradients_flow_through_adapters_only_where_used():
    student = seq_model("bert", layers=3, hidden=64, seed=1)
    teacher = seq_model("bert", layers=6, hidden=128, seed=2)
    hybrid = HybridModel(student, teacher, layer_mapping("uniform", 6, 3)).train()
    assert hybrid.adapters_in is not None and hybrid.adapters_out is not None
    assert [a.weight.shape for a in hybrid.adapters_in] == [torch.Size([128, 64])] * 3
    ids, mask = batch()
    logits = hybrid(ids, mask, student_mask=torch.tensor([False, True, True]))
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()

    def grads(module):
        return [p.grad for p in module.parameters()]

    for used in (hybrid.adapters_in[0], hybrid.adapters_out[0], student.bert.encoder.layer[1],
                 student.bert.encoder.layer[2], student.bert.embeddings, student.classifier, student.bert.pooler):
        assert all(g is not None and g.abs().sum() > 0 for g in grads(used))
    for unused in (student.bert.encoder.layer[0], hybrid.adapters_in[1], hybrid.adapters_out[2]):
        assert all(g is None for g in grads(unused))
    assert all(not p.requires_grad and p.grad is None for p in hybrid.teacher_layers.parameters())


def test_adapters_start_as_an_identity_round_trip():
    hybrid = HybridModel(seq_model("bert", layers=2, hidden=32), seq_model("bert", layers=2, hidden=64, seed=2),
                         layer_mapping("uniform", 2, 2))
    x = torch.randn(5, 32)
    with torch.no_grad():
        for up, down in zip(hybrid.adapters_in, hybrid.adapters_out):
            torch.testing.assert_close(down(up(x)), x, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(up(x).norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_teacher_layers_stay_frozen_and_in_eval_mode():
    teacher = seq_model("bert", layers=4, hidden=32, seed=2)
    hybrid = HybridModel(seq_model("bert", layers=2, hidden=32), teacher, layer_mapping("uniform", 4, 2))
    hybrid.train()
    assert hybrid.student.training
    assert not any(m.training for m in hybrid.teacher_layers.modules())
    # with dropout off in the teacher slots and the student's embeddings in eval, all-teacher runs are repeatable
    hybrid.student.bert.embeddings.eval()
    hybrid.student.dropout.eval()
    ids, mask = batch()
    all_teacher = torch.zeros(2, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(hybrid(ids, mask, student_mask=all_teacher), hybrid(ids, mask, student_mask=all_teacher))
    assert {id(p) for p in hybrid.trainable_parameters()} == {id(p) for p in hybrid.student.parameters()}


def test_student_model_is_the_plain_student():
    student = seq_model("bert", layers=3, hidden=64, seed=1)
    hybrid = HybridModel(student, seq_model("bert", layers=6, hidden=128, seed=2), layer_mapping("uniform", 6, 3))
    exported = hybrid.student_model()
    assert exported is student
    fresh = seq_model("bert", layers=3, hidden=64, seed=9)
    assert exported.state_dict().keys() == fresh.state_dict().keys()
    extra = {id(p) for m in (hybrid.adapters_in, hybrid.adapters_out, hybrid.teacher_layers) for p in m.parameters()}
    assert extra and not extra & {id(p) for p in exported.parameters()}
    trainable = {id(p) for p in hybrid.trainable_parameters()}
    adapters = {id(p) for m in (hybrid.adapters_in, hybrid.adapters_out) for p in m.parameters()}
    assert trainable == {id(p) for p in exported.parameters()} | adapters


def test_training_through_random_masks_reduces_the_loss():
    torch.manual_seed(0)
    student = seq_model("bert", layers=2, hidden=32, num_labels=2, seed=1, dropout=0.0)
    teacher = seq_model("bert", layers=4, hidden=32, num_labels=2, seed=2, dropout=0.0)
    hybrid = HybridModel(student, teacher, layer_mapping("uniform", 4, 2)).train()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, VOCAB, (32, SEQ), generator=g)
    labels = (ids[:, 1] >= (VOCAB + 5) // 2).long()  # learnable from one token's identity
    mask = torch.ones_like(ids)
    schedule = ReplacementSchedule(ReplacementScheduleConfig(kind="constant", rate=0.5, replacing_steps=40))
    sampler = ReplacementSampler(hybrid.num_slots, seed=7)
    optimizer = torch.optim.SGD(hybrid.trainable_parameters(), lr=0.1, momentum=0.9)

    def loss(student_mask=None):
        return F.cross_entropy(hybrid(ids, mask, student_mask=student_mask), labels)

    with torch.no_grad():
        before = {name: loss(m).item() for name, m in (("student", None), ("mixed", torch.tensor([False, True])))}
    seen = set()
    for step in range(40):
        student_mask = sampler.mask(step, schedule.rate(step))
        seen.add(tuple(student_mask.tolist()))
        optimizer.zero_grad()
        loss(student_mask).backward()
        optimizer.step()
    assert len(seen) == 3  # every non-empty mask of two slots was trained
    with torch.no_grad():
        after = {name: loss(m).item() for name, m in (("student", None), ("mixed", torch.tensor([False, True])))}
    for name in before:
        assert after[name] < 0.7 * before[name], (name, before[name], after[name])


def test_errors():
    bert3 = seq_model("bert", layers=3, hidden=32)
    with pytest.raises(ConfigError, match="roberta family.*bert family"):
        HybridModel(bert3, seq_model("roberta", layers=6, hidden=32), layer_mapping("uniform", 6, 3))
    with pytest.raises(ConfigError, match="mapping has 2 slots but the student has 3 layers"):
        HybridModel(bert3, seq_model("bert", layers=6, hidden=32), layer_mapping("uniform", 6, 2))
    with pytest.raises(ConfigError, match="outside the teacher's layers 0..3"):
        HybridModel(bert3, seq_model("bert", layers=4, hidden=32), [[1], [3], [5]])
    with pytest.raises(ConfigError, match="teacher has 2 labels but the student 3"):
        HybridModel(bert3, seq_model("bert", layers=6, hidden=32, num_labels=2), layer_mapping("uniform", 6, 3))
    with pytest.raises(ConfigError, match="sequence-classification model"):
        HybridModel(bert3, seq_model("bert", layers=6, hidden=32).bert, layer_mapping("uniform", 6, 3))
    hybrid = HybridModel(bert3, seq_model("bert", layers=6, hidden=32), layer_mapping("uniform", 6, 3))
    ids, mask = batch()
    with pytest.raises(ValueError, match="shape \\(3,\\)"):
        hybrid(ids, mask, student_mask=torch.ones(2, dtype=torch.bool))
