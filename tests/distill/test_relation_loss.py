"""RelationLoss (fused, row-chunked) against its definition in docs/ARC_METHOD.md, via reference_relation_loss."""

from __future__ import annotations

import pytest
import torch

from arc_dist.distill.relation_loss import RELATIONS, RelationLoss, _count_valid, reference_relation_loss
from arc_dist.errors import ConfigError

TEACHER_WIDTH, STUDENT_WIDTH, SEQ = 48, 24, 37


def make_qkv(batch: int, seq: int, width: int, *, requires_grad: bool, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(batch, seq, width, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
        for _ in range(3)
    )


def ragged_mask(lengths: list[int], seq: int) -> torch.Tensor:
    return (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()


def grads(student) -> list[torch.Tensor]:
    return [x.grad for x in student]


def run(loss_fn, teacher, student, mask):
    """Loss output and the gradients of its total with respect to the student tensors (which are reset first)."""
    for x in student:
        x.grad = None
    out = loss_fn(teacher, student, mask)
    out.total.backward()
    return out, grads(student)


def reference(num_heads: int, weights=None):
    return lambda t, s, m: reference_relation_loss(t, s, m, num_heads, weights)


def assert_grads_close(actual, expected, rtol: float) -> None:
    for a, e in zip(actual, expected):
        assert a is not None and a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * float(e.abs().max()))


def test_identical_student_gives_zero_loss_and_gradient():
    teacher = make_qkv(3, SEQ, TEACHER_WIDTH, requires_grad=False)
    student = tuple(x.clone().requires_grad_(True) for x in teacher)
    mask = ragged_mask([SEQ, 30, 9], SEQ)
    out, student_grads = run(RelationLoss(6, chunk_size=16), teacher, student, mask)
    assert abs(float(out.total.detach())) < 1e-6
    for name in RELATIONS:
        assert abs(float(out.per_relation[name])) < 1e-6
    for g in student_grads:
        assert float(g.abs().max()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("num_heads", [4, 6])
@pytest.mark.parametrize("chunk_size", [1, 5, 16, SEQ, 100])
@pytest.mark.parametrize("chunk_heads", [1, 5, None])
def test_matches_reference_in_value_and_gradient(dtype, padded, num_heads, chunk_size, chunk_heads):
    teacher = make_qkv(3, SEQ, TEACHER_WIDTH, requires_grad=False, dtype=dtype, seed=1)
    student = make_qkv(3, SEQ, STUDENT_WIDTH, requires_grad=True, dtype=dtype, seed=2)
    mask = ragged_mask([SEQ, 20, 3], SEQ) if padded else None
    ref, ref_grads = run(reference(num_heads), teacher, student, mask)
    out, out_grads = run(RelationLoss(num_heads, chunk_size=chunk_size, chunk_heads=chunk_heads), teacher, student,
                         mask)
    # fp32: the chunked and the full-matrix sums add S*S terms in different orders (1.2e-5 relative was seen on
    # one relation on a Xeon); fp64 shows that the two compute the same thing.
    rtol = 5e-5 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(out.total, ref.total, rtol=rtol, atol=0)
    for name in RELATIONS:
        torch.testing.assert_close(out.per_relation[name], ref.per_relation[name], rtol=rtol, atol=0)
    assert_grads_close(out_grads, ref_grads, rtol=max(rtol, 1e-5))


def test_mask_of_ones_equals_no_mask():
    teacher = make_qkv(2, SEQ, TEACHER_WIDTH, requires_grad=False)
    student = make_qkv(2, SEQ, STUDENT_WIDTH, requires_grad=True, seed=1)
    loss = RelationLoss(4, chunk_size=8)
    out_none, grads_none = run(loss, teacher, student, None)
    out_ones, grads_ones = run(loss, teacher, student, torch.ones(2, SEQ, dtype=torch.long))
    torch.testing.assert_close(out_ones.total, out_none.total, rtol=0, atol=0)
    assert_grads_close(grads_ones, grads_none, rtol=0)


@pytest.mark.parametrize("lengths", [[SEQ, SEQ], [SEQ, 20]])
def test_token_count_from_the_caller_gives_the_same_loss(lengths):
    """The stage-1 trainer passes the token count of the host copy of the mask (valid_tokens), so that a GPU step
    does not sync to count it: the result is bit-identical to counting here, padded or not."""
    teacher = make_qkv(2, SEQ, TEACHER_WIDTH, requires_grad=False)
    student = make_qkv(2, SEQ, STUDENT_WIDTH, requires_grad=True, seed=1)
    mask = ragged_mask(lengths, SEQ)
    loss = RelationLoss(4, chunk_size=8)
    out_counted, grads_counted = run(loss, teacher, student, mask)
    out_given, grads_given = run(lambda t, s, m: loss(t, s, m, valid_tokens=sum(lengths)), teacher, student, mask)
    torch.testing.assert_close(out_given.total, out_counted.total, rtol=0, atol=0)
    assert_grads_close(grads_given, grads_counted, rtol=0)


def test_wrong_token_count_is_rejected_on_cpu_and_trusted_elsewhere():
    teacher = make_qkv(2, SEQ, TEACHER_WIDTH, requires_grad=False)
    student = make_qkv(2, SEQ, STUDENT_WIDTH, requires_grad=True, seed=1)
    mask = ragged_mask([SEQ, 20], SEQ)
    with pytest.raises(ValueError, match=r"valid_tokens=74 but attention_mask has 57 non-zero entries"):
        RelationLoss(4)(teacher, student, mask, valid_tokens=2 * SEQ)
    # Off the CPU a given count is used as is: counting is what it saves (a meta tensor cannot even be counted).
    assert _count_valid(torch.ones(2, 3, dtype=torch.bool, device="meta"), 5) == 5
    assert _count_valid(mask != 0, None) == SEQ + 20


@pytest.mark.parametrize("loss_name", ["project", "reference"])
def test_padding_with_garbage_changes_nothing_on_real_positions(loss_name):
    """A ragged batch padded with garbage gives the loss of the unpadded sequences, pooled over all real rows."""
    lengths, seq, heads = [SEQ, 21, 6], SEQ + 7, 6
    loss_fn = RelationLoss(heads, chunk_size=8) if loss_name == "project" else reference(heads)
    real_teacher = [make_qkv(1, n, TEACHER_WIDTH, requires_grad=False, seed=10 + i) for i, n in enumerate(lengths)]
    real_student = [make_qkv(1, n, STUDENT_WIDTH, requires_grad=True, seed=20 + i) for i, n in enumerate(lengths)]

    # Unpadded, one sequence at a time: the batch loss is the sum of per-row KLs over all real rows / (A_r * rows).
    total_rows = sum(lengths)
    expected_loss = torch.zeros((), dtype=torch.float32)
    expected_grads = []
    for n, t, s in zip(lengths, real_teacher, real_student):
        out, g = run(loss_fn, t, s, None)
        expected_loss += out.total.detach() * n / total_rows
        expected_grads.append([x * n / total_rows for x in g])

    gen = torch.Generator().manual_seed(99)

    def pad(parts, width, requires_grad):
        out = []
        for k in range(3):
            x = 1e4 * torch.randn(len(lengths), seq, width, generator=gen)
            x[0, -1] = float("nan")
            x[1, -1] = float("inf")
            for i, (n, part) in enumerate(zip(lengths, parts)):
                x[i, :n] = part[k][0].detach()
            out.append(x.requires_grad_(requires_grad))
        return tuple(out)

    teacher = pad(real_teacher, TEACHER_WIDTH, False)
    student = pad(real_student, STUDENT_WIDTH, True)
    out, padded_grads = run(loss_fn, teacher, student, ragged_mask(lengths, seq))

    torch.testing.assert_close(out.total.detach(), expected_loss, rtol=1e-5, atol=0)
    for k in range(3):
        for i, n in enumerate(lengths):
            torch.testing.assert_close(padded_grads[k][i, :n], expected_grads[i][k][0], rtol=1e-5, atol=1e-9)
            assert torch.equal(padded_grads[k][i, n:], torch.zeros_like(padded_grads[k][i, n:]))


def test_all_padding_sequence_contributes_nothing():
    teacher = make_qkv(2, 9, TEACHER_WIDTH, requires_grad=False)
    student = make_qkv(2, 9, STUDENT_WIDTH, requires_grad=True, seed=1)
    out, g = run(RelationLoss(4, chunk_size=4), teacher, student, ragged_mask([9, 0], 9))
    alone = RelationLoss(4)(tuple(x[:1] for x in teacher), tuple(x[:1] for x in student), None)
    assert torch.isfinite(out.total)
    torch.testing.assert_close(out.total, alone.total, rtol=1e-5, atol=0)
    assert float(g[0][0].abs().max()) > 0
    for x in g:
        assert torch.equal(x[1], torch.zeros_like(x[1]))


def test_weights_scale_relations_and_zero_weight_removes_gradient():
    teacher = make_qkv(2, SEQ, TEACHER_WIDTH, requires_grad=False)
    student = make_qkv(2, SEQ, STUDENT_WIDTH, requires_grad=True, seed=1)
    mask = ragged_mask([SEQ, 12], SEQ)
    weights = {"qq": 0.5, "kk": 0.0, "vv": 2.0}
    out, (g_q, g_k, g_v) = run(RelationLoss(6, weights=weights, chunk_size=10), teacher, student, mask)
    expected = sum(w * out.per_relation[name] for name, w in weights.items())
    torch.testing.assert_close(out.total.detach(), expected, rtol=1e-6, atol=0)
    assert float(out.per_relation["kk"]) > 0  # still computed for logging
    assert all(not v.requires_grad for v in out.per_relation.values())
    assert g_k is None
    assert float(g_q.abs().max()) > 0 and float(g_v.abs().max()) > 0

    ref, ref_grads = run(reference(6, weights), teacher, student, mask)
    torch.testing.assert_close(out.total, ref.total, rtol=1e-5, atol=0)
    assert_grads_close([g_q, g_v], [ref_grads[0], ref_grads[2]], rtol=1e-5)

    unweighted, (u_q, _, _) = run(RelationLoss(6, chunk_size=10), teacher, student, mask)
    torch.testing.assert_close(g_q, 0.5 * u_q, rtol=1e-6, atol=0)


def test_no_grad_evaluation_matches_and_builds_no_graph():
    teacher = make_qkv(2, SEQ, TEACHER_WIDTH, requires_grad=False)
    student = make_qkv(2, SEQ, STUDENT_WIDTH, requires_grad=True, seed=1)
    loss = RelationLoss(4)
    with torch.no_grad():
        evaluated = loss(teacher, student, None)
    assert evaluated.total.grad_fn is None
    torch.testing.assert_close(evaluated.total, loss(teacher, student, None).total.detach(), rtol=0, atol=0)


def test_bf16_inputs_are_computed_in_fp32():
    teacher = make_qkv(2, SEQ, TEACHER_WIDTH, requires_grad=False)
    student = make_qkv(2, SEQ, STUDENT_WIDTH, requires_grad=True, seed=1)
    mask = ragged_mask([SEQ, 15], SEQ)
    teacher_bf16 = tuple(x.to(torch.bfloat16) for x in teacher)
    student_bf16 = tuple(x.detach().to(torch.bfloat16).requires_grad_(True) for x in student)
    loss = RelationLoss(6, chunk_size=16)
    out_bf16, grads_bf16 = run(loss, teacher_bf16, student_bf16, mask)
    out_fp32, grads_fp32 = run(loss, teacher, student, mask)
    assert out_bf16.total.dtype == torch.float32
    assert all(g.dtype == torch.bfloat16 for g in grads_bf16)
    torch.testing.assert_close(out_bf16.total, out_fp32.total, rtol=5e-2, atol=0)
    for g16, g32 in zip(grads_bf16, grads_fp32):
        cosine = torch.nn.functional.cosine_similarity(g16.float().flatten(), g32.flatten(), dim=0)
        assert float(cosine) > 0.99


def test_num_heads_must_divide_both_widths():
    teacher = make_qkv(1, 4, TEACHER_WIDTH, requires_grad=False)
    student = make_qkv(1, 4, STUDENT_WIDTH, requires_grad=True)
    message = r"num_relation_heads=5 .*teacher width 48.*student width 24; common divisors: 1, 2, 3, 4, 6, 8, 12, 24"
    with pytest.raises(ConfigError, match=message):
        RelationLoss(5)(teacher, student, None)
    with pytest.raises(ConfigError, match=message):
        reference_relation_loss(teacher, student, None, 5)
    with pytest.raises(ConfigError, match="student width 24"):
        RelationLoss(16)(teacher, student, None)  # divides 48 only


@pytest.mark.parametrize(
    ("teacher_shapes", "student_shapes", "mask_shape", "match"),
    [
        ([(2, 5, 48)] * 3, [(2, 5, 24), (2, 5, 24), (2, 5, 12)], None, "student query/key/value shapes differ"),
        ([(2, 5, 48), (2, 4, 48), (2, 5, 48)], [(2, 5, 24)] * 3, None, "teacher query/key/value shapes differ"),
        ([(2, 5, 48)] * 3, [(2, 6, 24)] * 3, None, r"disagree on \[batch, seq\]"),
        ([(2, 5, 48)] * 3, [(3, 5, 24)] * 3, None, r"disagree on \[batch, seq\]"),
        ([(2, 5, 48)] * 3, [(2, 5, 24)] * 3, (2, 4), r"attention_mask shape \[2, 4\]"),
        ([(2, 5, 48)] * 3, [(5, 24)] * 3, None, r"\[batch, seq, width\]"),
    ],
)
def test_shape_mismatches_raise_config_error(teacher_shapes, student_shapes, mask_shape, match):
    teacher = tuple(torch.randn(shape) for shape in teacher_shapes)
    student = tuple(torch.randn(shape) for shape in student_shapes)
    mask = None if mask_shape is None else torch.ones(mask_shape)
    with pytest.raises(ConfigError, match=match):
        RelationLoss(4)(teacher, student, mask)
    with pytest.raises(ConfigError, match=match):
        reference_relation_loss(teacher, student, mask, 4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_relation_heads": 0}, "num_relation_heads must be a positive integer"),
        ({"num_relation_heads": 4, "weights": {"qk": 1.0}}, r"unknown relation weight key\(s\) \['qk'\]"),
        ({"num_relation_heads": 4, "weights": {"vv": -1.0}}, "vv=-1.0 must be a finite number >= 0"),
        ({"num_relation_heads": 4, "chunk_size": 0}, "chunk_size must be an integer >= 1"),
        ({"num_relation_heads": 4, "chunk_heads": 2.5}, "chunk_heads must be an integer >= 1"),
        ({"num_relation_heads": 4, "weights": dict.fromkeys(RELATIONS, 0.0)}, "at least one must be > 0"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RelationLoss(**kwargs)


def test_gradient_descent_on_student_reduces_loss():
    teacher = make_qkv(2, 16, TEACHER_WIDTH, requires_grad=False)
    student = make_qkv(2, 16, STUDENT_WIDTH, requires_grad=True, seed=1)
    mask = ragged_mask([16, 11], 16)
    loss = RelationLoss(4, chunk_size=5)
    optimizer = torch.optim.SGD(student, lr=20.0)
    history = []
    for _ in range(10):
        optimizer.zero_grad()
        out = loss(teacher, student, mask)
        out.total.backward()
        optimizer.step()
        history.append(float(out.total.detach()))
    assert all(later < earlier for earlier, later in zip(history, history[1:])), history
    assert history[-1] < 0.7 * history[0], history


def test_gradcheck_float64():
    teacher = make_qkv(2, 5, 6, requires_grad=False, dtype=torch.float64)
    student = make_qkv(2, 5, 4, requires_grad=True, dtype=torch.float64, seed=1)
    mask = ragged_mask([5, 3], 5)
    loss = RelationLoss(2, weights={"qq": 1.0, "kk": 0.5, "vv": 2.0}, chunk_size=2)
    assert torch.autograd.gradcheck(lambda q, k, v: loss(teacher, (q, k, v), mask).total, student)


def test_automatic_chunk_size_matches_reference():
    from arc_dist.distill.relation_loss import auto_chunk

    # (rows, heads): whole rows of 64 heads at the stage-1 shape, 4 at S=512, half rows of 2 heads at S=1024.
    assert auto_chunk(32, 48, 128) == (128, 64) and auto_chunk(8, 12, 512) == (512, 4)
    assert auto_chunk(8, 12, 1024) == (512, 2) and auto_chunk(8, 12, 4096) == (512, 1)
    assert auto_chunk(2, 2, 7) == (7, 4)  # never more rows than the sequence has, nor more heads than it has
    assert auto_chunk(32, 48, 128, rows=16) == (16, 512)  # a fixed chunk_size gets as many heads as fit
    # On a GPU blocks are 32x larger (fewer kernel launches): 128 of the 4096 (batch, head) pairs at B=64, A_r=64.
    assert auto_chunk(64, 64, 512, device_type="cuda") == (512, 128)
    assert auto_chunk(8, 12, 128, device_type="cuda") == (128, 96)
    g = torch.Generator().manual_seed(11)
    teacher = tuple(torch.randn(2, 9, 12, generator=g) for _ in range(3))
    student = tuple(torch.randn(2, 9, 6, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    got = RelationLoss(3)(teacher, student, mask).total
    want = reference_relation_loss(teacher, student, mask, 3).total
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_non_contiguous_inputs_match_reference():
    """Q/K/V that are views give the same loss and gradient: the teacher's are every other column of wider tensors
    (a strided last dimension), the student's are [S, B, d] leaves transposed."""
    teacher = tuple(x[..., ::2] for x in make_qkv(3, SEQ, 2 * TEACHER_WIDTH, requires_grad=False, seed=4))
    base = make_qkv(SEQ, 3, STUDENT_WIDTH, requires_grad=True, seed=5)  # [S, B, d] leaves
    student = tuple(x.transpose(0, 1) for x in base)
    assert not any(x.is_contiguous() for x in (*teacher, *student))
    mask = ragged_mask([SEQ, 20, 3], SEQ)
    out = RelationLoss(4, chunk_size=7, chunk_heads=5)(teacher, student, mask)
    out.total.backward()
    got = [x.grad.clone() for x in base]
    for x in base:
        x.grad = None
    ref = reference_relation_loss(teacher, student, mask, 4)
    ref.total.backward()
    torch.testing.assert_close(out.total, ref.total, rtol=5e-5, atol=0)
    for g, x in zip(got, base):
        torch.testing.assert_close(g, x.grad, rtol=1e-5, atol=1e-5 * float(x.grad.abs().max()))


def test_float32_value_stays_accurate_when_the_student_is_close():
    """Late in distillation the KL is small next to the scores; fp32 must still give it to 2e-5 relative (the fused
    loss subtracts max-shifted teacher and student scores before it sums, so no large sum cancels; a version that
    took the difference of two dot products of p with the raw scores was off by 3% here)."""
    g = torch.Generator().manual_seed(12)
    teacher = tuple(4 * torch.randn(4, 64, 48, generator=g, dtype=torch.float64) for _ in range(3))
    student = tuple(x + 0.01 * torch.randn(x.shape, generator=g, dtype=torch.float64) for x in teacher)
    mask = ragged_mask([64, 50, 64, 9], 64)
    want = reference_relation_loss(teacher, student, mask, 6).total
    got = RelationLoss(6)(tuple(x.float() for x in teacher), tuple(x.float() for x in student), mask).total
    assert 1e-4 < float(want) < 1e-1  # small: the scores reach some 50
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=0)
