"""MiniLMv2 fine-grained self-attention relation loss (stage 1 of ARC, see docs/ARC_METHOD.md, "Stage 1").

For each relation R in {qq, kk, vv} the query/key/value projection outputs X of shape [B, S, d] are split into
A_r relation heads, and the teacher's row-wise softmax of X X^T / sqrt(d_r) is distilled into the student's with a
KL divergence, averaged over relation heads and valid (non-padded) query rows of the whole batch.

Why a fused custom autograd function instead of plain autograd:
the relation matrices are [B, A_r, S, S] per relation. Plain autograd (``reference_relation_loss``) keeps the teacher
probabilities, the student log-probabilities and several other S x S intermediates alive until backward, so peak
memory is quadratic in S and dominates a stage-1 step at long sequence lengths. The loss is a scalar and the
gradient of a row's KL with respect to the student scores is simply ``softmax(student) - rel_T`` (per valid row,
divided by the normaliser), so ``_FusedRelationKL`` computes the value and the gradient in one pass over blocks of
the relation matrices: per block (``chunk_heads`` (batch, head) pairs x ``chunk_size`` query rows, against all S
keys) it builds the teacher and student scores, adds the block's KL to the sum and immediately turns the score
gradient into the gradient of the student projection (X_S is on both sides of the score matmul, so it gets a row
term and a column term). Nothing is recomputed in backward, which only rescales the saved gradient by
``grad_output``. Memory: four reused [chunk_heads, chunk_size, S] work buffers plus O(B * S * d_s) saved for
backward -- linear in S for a fixed chunk size. The work buffers are reused across blocks rather than freshly
allocated because on CPU every fresh allocation of that size costs page faults, and kept small (``auto_chunk``:
about 1M elements each on CPU) because each block makes some ten passes over them: at cache size those passes do
not go to main memory, which is what bounds this loss (with 8-wide relation heads its matmuls are memory-bound).

Numerics: everything is computed in float32 (float64 stays float64) even for bf16/fp16 inputs; the gradient is
returned in the student input's dtype. Padded key columns get probability exactly 0 (-inf in the reference, half
the dtype's lowest finite value in the fused loss) and padded query rows add exactly 0 to the sum and are left out
of the normaliser; padded positions are zeroed first, so garbage (even inf/NaN) in padded rows cannot leak into the
loss or create NaN, and padded rows get a zero gradient. A sequence without any real token is left unmasked (all
-inf rows would give NaN); it has no valid query row, so it never reaches the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from arc_dist.errors import ConfigError

QKV = tuple[Tensor, Tensor, Tensor]
"""Query, key and value projection outputs, each [B, S, d] (``nn.Linear`` outputs, bias included, before head split)."""

RELATIONS: tuple[str, ...] = ("qq", "kk", "vv")
"""Relation names, in the order of the (query, key, value) tuple elements they pair with themselves."""


@dataclass
class RelationLossOutput:
    """Result of the relation loss.

    ``total`` carries the gradient; ``per_relation`` holds detached values for logging.
    """

    total: Tensor
    per_relation: dict[str, Tensor]


def _check_weights(weights: dict[str, float] | None) -> dict[str, float]:
    """Fill in default weights (1.0) and reject unknown relation names and negative or non-finite weights."""
    resolved = {name: 1.0 for name in RELATIONS}
    if weights is None:
        return resolved
    unknown = sorted(set(weights) - set(RELATIONS))
    if unknown:
        raise ConfigError(f"unknown relation weight key(s) {unknown}; valid keys are {list(RELATIONS)}")
    for name, value in weights.items():
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"relation weight {name}={value} must be a finite number >= 0")
        resolved[name] = value
    return resolved


def _check_num_heads(num_relation_heads: int) -> None:
    if isinstance(num_relation_heads, bool) or not isinstance(num_relation_heads, int) or num_relation_heads < 1:
        raise ConfigError(f"num_relation_heads must be a positive integer, got {num_relation_heads!r}")


def check_relation_heads(num_relation_heads: int, teacher_width: int, student_width: int) -> None:
    """A_r must split both widths evenly; called at job start-up (before any weight loads) and on every forward."""
    _check_num_heads(num_relation_heads)
    d_t, d_s = teacher_width, student_width
    if d_t % num_relation_heads or d_s % num_relation_heads:
        common = [str(k) for k in range(1, math.gcd(d_t, d_s) + 1) if d_t % k == 0 and d_s % k == 0]
        raise ConfigError(
            f"num_relation_heads={num_relation_heads} must divide both the teacher width {d_t} and the student "
            f"width {d_s}; common divisors: {', '.join(common)}"
        )


def _check_inputs(teacher: QKV, student: QKV, attention_mask: Tensor | None, num_relation_heads: int) -> None:
    """Validate shapes and widths so that mistakes surface as ConfigError naming the offending sizes."""
    for side, qkv in (("teacher", teacher), ("student", student)):
        if not isinstance(qkv, (tuple, list)) or len(qkv) != 3:
            raise ConfigError(f"{side} must be a (query, key, value) tuple of 3 tensors")
        for name, x in zip(("query", "key", "value"), qkv):
            if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ConfigError(f"{side} {name} must be a floating-point tensor [batch, seq, width], got {shape}")
        shapes = [tuple(x.shape) for x in qkv]
        if len(set(shapes)) != 1:
            raise ConfigError(f"{side} query/key/value shapes differ: {shapes}")
    t_shape, s_shape = tuple(teacher[0].shape), tuple(student[0].shape)
    if t_shape[:2] != s_shape[:2]:
        raise ConfigError(
            f"teacher and student disagree on [batch, seq]: teacher {list(t_shape[:2])}, student {list(s_shape[:2])}"
        )
    devices = {x.device for x in (*teacher, *student)}
    if attention_mask is not None:
        if tuple(attention_mask.shape) != t_shape[:2]:
            raise ConfigError(
                f"attention_mask shape {list(attention_mask.shape)} does not match [batch, seq] = {list(t_shape[:2])}"
            )
        devices.add(attention_mask.device)
    if len(devices) != 1:
        raise ConfigError(f"teacher, student and attention_mask must be on one device, got {sorted(map(str, devices))}")
    check_relation_heads(num_relation_heads, t_shape[2], s_shape[2])


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 if any input is float64: low-precision inputs never drive the softmax/KL arithmetic."""
    dtype = torch.float32
    for x in tensors:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _valid_mask(attention_mask: Tensor | None, x: Tensor) -> Tensor:
    """[B, S] bool, True for real tokens."""
    if attention_mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return attention_mask != 0


def _count_valid(valid: Tensor, valid_tokens: int | None) -> int:
    """The number of real tokens: ``valid_tokens`` if the caller gave it, else counted (once per loss, not per
    relation). A given count is checked where checking is free (on CPU), so a wrong one cannot pass the tests."""
    if valid_tokens is None or valid.device.type == "cpu":
        counted = int(valid.sum())
        if valid_tokens is not None and valid_tokens != counted:
            raise ValueError(f"valid_tokens={valid_tokens!r} but attention_mask has {counted} non-zero entries; "
                             "pass the count of the same mask (or None to count it here)")
        return counted
    return int(valid_tokens)


def _split_heads_transposed(x: Tensor, padding: Tensor | None, num_heads: int, dtype: torch.dtype,
                            scale: float) -> Tensor:
    """[B, S, d] -> a fresh contiguous [B, A_r, d_r, S] (heads split, each transposed) in `dtype`, times `scale`,
    positions where `padding` [B, S] is True zeroed (so garbage cannot leak). One pass for a `dtype` input: the
    transpose and the scaling share it."""
    b, s, d = x.shape
    heads = x.reshape(b, s, num_heads, d // num_heads).permute(0, 2, 3, 1)
    out = torch.empty(heads.shape, dtype=dtype, device=x.device)
    torch.mul(heads.to(dtype), scale, out=out)
    if padding is not None:
        out.masked_fill_(padding[:, None, None, :], 0.0)
    return out


def _key_fill_mask(valid: Tensor) -> Tensor:
    """[B, 1, 1, S] bool: key columns that get -inf.

    Sequences without any real token are left unmasked: they have no valid query row, so they never reach the loss,
    and leaving them unmasked keeps their (discarded) softmax finite instead of NaN.
    """
    fill = ~valid & valid.any(dim=1, keepdim=True)
    return fill[:, None, None, :]


class _FusedRelationKL(torch.autograd.Function):
    """One relation's KL loss, with the student gradient computed during forward (see the module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x_student: Tensor,
        x_teacher: Tensor,
        valid: Tensor,
        num_valid: int,
        num_heads: int,
        chunk_rows: int,
        chunk_heads: int,
        need_grad: bool,
    ) -> Tensor:
        dtype = _compute_dtype(x_student, x_teacher)
        b, s, d_s = x_student.shape
        bh = b * num_heads
        padding = None if num_valid == b * s else ~valid
        root_scale_s = (d_s // num_heads) ** -0.25
        # Heads flattened into the batch dimension, so that every matmul is one bmm, and each side kept as Y^T,
        # [B * A_r, d_r, S] contiguous, pre-multiplied by scale**0.5 so that a score block is a single bmm of Y
        # against Y^T. This layout (rather than [.., S, d_r]) makes S, not d_r (8 or so), the inner dimension of
        # every matmul output in the loop, which is what CPU GEMM kernels are fast at: the gradient matmuls became
        # 2.7x faster at A_r = 48, S = 128 (measured side by side); the score bmm reads its rows operand as a
        # transposed view at no cost.
        y_s_keys = _split_heads_transposed(x_student.detach(), padding, num_heads, dtype, root_scale_s).view(bh, -1, s)
        y_t_keys = _split_heads_transposed(x_teacher.detach(), padding, num_heads, dtype,
                                           (x_teacher.shape[-1] // num_heads) ** -0.25).view(bh, -1, s)
        # Padded key columns get a huge negative score rather than -inf: their probabilities are still exactly 0, and
        # 0 times a finite score is 0, so the KL below needs no mask (-inf would give NaN). Padded query rows need
        # none either: their Y rows are zero on both sides, so teacher and student rows are identical and their KL
        # is exactly 0. (Only the normaliser has to leave them out.)
        key_fill = (None if padding is None
                    else _key_fill_mask(valid).expand(b, num_heads, 1, s).reshape(bh, 1, s))
        fill_value = torch.finfo(dtype).min / 2
        normaliser = float(num_heads * max(num_valid, 1))
        grad_y_t = torch.zeros_like(y_s_keys) if need_grad else None  # the gradient of Y, transposed like y_s_keys
        kl_sum = torch.zeros((), dtype=dtype, device=x_student.device)
        # Four work buffers of [chunk_heads, chunk_rows, S] reused by every block: sized to stay cache-resident
        # across the block's passes, and fresh allocations of this size would cost page faults on every block.
        # The last, smaller blocks use a contiguous prefix of each buffer.
        rows_per, heads_per = min(chunk_rows, s), min(chunk_heads, bh)
        buffers = torch.empty(4, heads_per * rows_per * s, dtype=dtype, device=x_student.device)

        for h0 in range(0, bh, heads_per):
            heads = slice(h0, min(h0 + heads_per, bh))
            ys_keys, yt_keys = y_s_keys[heads], y_t_keys[heads]
            for r0 in range(0, s, rows_per):
                rows = slice(r0, min(r0 + rows_per, s))
                shape = (heads.stop - h0, rows.stop - r0, s)
                n = shape[0] * shape[1] * s
                buf_t, buf_p, buf_s, buf_q = (buf[:n].view(shape) for buf in buffers)
                scores_t = torch.bmm(yt_keys[:, :, rows].transpose(1, 2), yt_keys, out=buf_t)
                scores_s = torch.bmm(ys_keys[:, :, rows].transpose(1, 2), ys_keys, out=buf_s)
                if key_fill is not None:
                    scores_t.masked_fill_(key_fill[heads], fill_value)
                    scores_s.masked_fill_(key_fill[heads], fill_value)
                p = torch.softmax(scores_t, dim=-1, out=buf_p)
                q = torch.softmax(scores_s, dim=-1, out=buf_q)
                # A row's KL without log-probabilities. With m = max(x) and lse(x) = m - log(max(softmax(x))) (the
                # largest probability is exp(m - lse)), log p_j - log q_j = (t_j - s_j) - (m_t - m_s) + log max p
                # - log max q, so, as sum(p) = 1,
                #   KL(p || q) = sum_j p_j [(t_j - s_j) - (m_t - m_s)] + log max p - log max q.
                # Two softmaxes, three cheap passes and a dot instead of two log-softmaxes, two exps, a subtraction
                # and a dot: 1.4x faster on the block (one exp pass per side; measured side by side). Taking the
                # difference of the max-shifted rows keeps the rounding at the level of the log-probabilities' (a
                # per-row shift between teacher and student scores cancels before the dot, not after), and
                # max(softmax) >= 1/S keeps the logs finite. Padded key columns hold the same fill on both sides, so
                # their difference is finite and their p is 0.
                row_shift = scores_t.amax(dim=-1, keepdim=True).sub_(scores_s.amax(dim=-1, keepdim=True))
                shifted_diff = scores_t.sub_(scores_s).sub_(row_shift)
                kl_sum += (torch.dot(p.view(-1), shifted_diff.view(-1))
                           + p.amax(dim=-1).log_().sub_(q.amax(dim=-1).log_()).sum())
                if grad_y_t is not None:
                    # d loss / d scores = (softmax_S - p_T) / normaliser; scores = Y Y^T, so Y gets a row term (the
                    # block's rows, against all keys) and a column term (all rows, against the block's rows), here
                    # in the transposed layout: G_Y^T[:, rows] += Y^T G^T and G_Y^T += Y^T[:, rows] G. The constant
                    # factor is applied once after the loop. Padded query rows need no mask here: their Y rows are
                    # zero, so the column term gets nothing from them and the row term only reaches padded rows,
                    # which are zeroed below.
                    grad_scores = q.sub_(p)
                    grad_y_t[heads, :, rows].baddbmm_(ys_keys, grad_scores.transpose(1, 2))
                    grad_y_t[heads].baddbmm_(ys_keys[:, :, rows], grad_scores)

        if grad_y_t is not None:
            grad_y_t = grad_y_t.view(b, num_heads, -1, s)
            if padding is not None:
                grad_y_t.masked_fill_(padding[:, None, None, :], 0.0)
            grad_x = torch.empty((b, s, num_heads, grad_y_t.shape[2]), dtype=dtype, device=x_student.device)
            torch.mul(grad_y_t.permute(0, 3, 1, 2), root_scale_s / normaliser, out=grad_x)
            ctx.save_for_backward(grad_x.view(b, s, d_s))
        ctx.student_dtype = x_student.dtype
        return kl_sum / normaliser

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        if not ctx.saved_tensors:
            return None, None, None, None, None, None, None, None
        (grad_x,) = ctx.saved_tensors
        return (grad_x * grad_output).to(ctx.student_dtype), None, None, None, None, None, None, None


# Automatic chunking: whole rows up to this many keys (a block then covers complete relation matrices of a few
# heads, and the gradient's row and column terms come from the same block), and as many (batch, head) pairs as keep
# a work buffer near the device's element budget.
# - CPU: 1M elements (4 MiB in fp32), so the block's passes stay in cache: the fastest of the block shapes tried at
#   S = 128, 512 and 1024 (1/16x-2x this size). Together with the other changes made with it, forward+backward
#   became 1.36x faster than the earlier row-only chunks of 4M elements at B=8, A_r=12, S=512 and 1.47x at B=32,
#   A_r=48, S=128 (the two alternating in one process).
# - GPU: 32M elements (128 MiB per buffer, 512 MiB in all). Measured on an H200 in bf16 (scripts/gpu_chunk_sweep.sh,
#   benchmarks/RESULTS.md): a block costs 0.35-0.8 ms of host-side overhead whatever its size, so small blocks are
#   slow: at B=32, A_r=64, S=512 (a BERT-large stage 1) 2M elements took 355 ms against the reference's 88, 8M
#   115 ms, 32M 60 ms (0.036x the reference's 18.1 GiB); 64M and 128M were only 3% and 7% faster again for 1.8x
#   and 3.3x the peak memory. Likewise at S=2048 (B=8, A_r=12). 16M was not tried.
AUTO_CHUNK_ROWS = 512
AUTO_CHUNK_ELEMENTS = {"cpu": 1 << 20, "other": 1 << 25}


def auto_chunk(batch: int, num_relation_heads: int, seq_len: int, rows: int | None = None,
               device_type: str = "cpu") -> tuple[int, int]:
    """(query rows, (batch, head) pairs) per block of the fused loss; `rows` fixed by the caller if given."""
    rows = min(seq_len, rows or AUTO_CHUNK_ROWS)
    budget = AUTO_CHUNK_ELEMENTS["cpu" if device_type == "cpu" else "other"]
    heads = max(1, budget // (rows * seq_len))
    return rows, min(heads, batch * num_relation_heads)


class RelationLoss(nn.Module):
    """MiniLMv2 QQ/KK/VV self-attention relation loss with a block-wise, fused forward/backward.

    ``num_relation_heads`` (A_r) must divide both model widths; ``weights`` maps "qq"/"kk"/"vv" to non-negative
    factors (default 1 each). The relation matrices are processed in blocks of ``chunk_size`` query rows (against
    all S keys) of ``chunk_heads`` (batch, relation head) pairs: a memory/speed trade-off, transient memory is
    4 x chunk_heads x chunk_size x S floats. None sizes either automatically (``auto_chunk``).
    """

    def __init__(self, num_relation_heads: int, weights: dict[str, float] | None = None,
                 chunk_size: int | None = None, chunk_heads: int | None = None):
        super().__init__()
        _check_num_heads(num_relation_heads)
        for name, value in (("chunk_size", chunk_size), ("chunk_heads", chunk_heads)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be an integer >= 1 (or None for automatic), got {value!r}")
        self.num_relation_heads = num_relation_heads
        self.weights = _check_weights(weights)
        if not any(self.weights.values()):
            raise ConfigError(f"all relation weights are 0 ({self.weights}); at least one must be > 0")
        self.chunk_size = chunk_size
        self.chunk_heads = chunk_heads

    def extra_repr(self) -> str:
        return (f"num_relation_heads={self.num_relation_heads}, weights={self.weights}, chunk_size={self.chunk_size}, "
                f"chunk_heads={self.chunk_heads}")

    def forward(self, teacher: QKV, student: QKV, attention_mask: Tensor | None,
                valid_tokens: int | None = None) -> RelationLossOutput:
        """The loss of one batch. ``valid_tokens``, the number of non-zero ``attention_mask`` entries, is for a
        caller that already knows it from a host copy of the mask: on a GPU, counting here is a host sync that
        waits for the forwards queued before the loss."""
        _check_inputs(teacher, student, attention_mask, self.num_relation_heads)
        valid = _valid_mask(attention_mask, student[0])
        num_valid = _count_valid(valid, valid_tokens)
        # The fused gradient is only worth computing when autograd will ask for it.
        grad_enabled = torch.is_grad_enabled()
        per_relation: dict[str, Tensor] = {}
        losses: list[Tensor] = []
        with torch.autocast(device_type=student[0].device.type, enabled=False):
            for name, x_t, x_s in zip(RELATIONS, teacher, student):
                weight = self.weights[name]
                if weight == 0.0:
                    # Still reported for logging, but kept out of the graph so it costs no gradient work.
                    x_s = x_s.detach()
                need_grad = grad_enabled and x_s.requires_grad
                rows, heads = auto_chunk(x_s.shape[0], self.num_relation_heads, x_s.shape[1], self.chunk_size,
                                         x_s.device.type)
                loss = _FusedRelationKL.apply(x_s, x_t, valid, num_valid, self.num_relation_heads, rows,
                                              self.chunk_heads or heads, need_grad)
                per_relation[name] = loss.detach()
                if weight != 0.0:
                    losses.append(loss * weight)
        return RelationLossOutput(total=torch.stack(losses).sum(), per_relation=per_relation)


def reference_relation_loss(
    teacher: QKV,
    student: QKV,
    attention_mask: Tensor | None,
    num_relation_heads: int,
    weights: dict[str, float] | None = None,
) -> RelationLossOutput:
    """Straightforward relation loss on full [B, A_r, S, S] matrices with plain autograd.

    The ground truth for tests and the benchmark baseline for ``RelationLoss``: same semantics, quadratic memory.
    """
    _check_inputs(teacher, student, attention_mask, num_relation_heads)
    resolved = _check_weights(weights)
    valid = _valid_mask(attention_mask, student[0])
    key_fill = _key_fill_mask(valid)
    dtype = _compute_dtype(*teacher, *student)
    row_valid = valid[:, None, :]  # [B, 1, S] against per-row KL [B, A_r, S]
    normaliser = num_relation_heads * max(int(valid.sum()), 1)

    def log_relation(x: Tensor) -> Tensor:
        b, s, d = x.shape
        y = torch.where(valid.unsqueeze(-1), x.to(dtype), 0.0).view(b, s, num_relation_heads, -1).transpose(1, 2)
        scores = torch.matmul(y, y.transpose(-1, -2)) / math.sqrt(y.shape[-1])
        return torch.log_softmax(scores.masked_fill(key_fill, float("-inf")), dim=-1)

    per_relation: dict[str, Tensor] = {}
    total = torch.zeros((), dtype=dtype, device=student[0].device)
    with torch.autocast(device_type=student[0].device.type, enabled=False):
        for name, x_t, x_s in zip(RELATIONS, teacher, student):
            with torch.no_grad():
                log_p = log_relation(x_t)
            p = log_p.exp()
            log_q = log_relation(x_s)
            kl = torch.where(key_fill, 0.0, p * (log_p - log_q)).sum(dim=-1)
            loss = torch.where(row_valid, kl, 0.0).sum() / normaliser
            per_relation[name] = loss.detach()
            total = total + resolved[name] * loss
    return RelationLossOutput(total=total, per_relation=per_relation)
