"""The stage-2 hybrid: student embeddings and head around slots that run a student layer or frozen teacher layers.

BERT-of-Theseus style replacement: at each step every slot i runs either the (trainable) student layer i or the
frozen fine-tuned teacher layers the mapping assigns to it. Gradients flow *through* the frozen teacher layers, so
student layers below a teacher slot learn to produce what the teacher's upper layers expect, and student layers
above it learn to consume the teacher's representations; the teacher layers themselves never change.
"""

from __future__ import annotations

import torch
from torch import nn

from arc_dist.errors import ConfigError
from arc_dist.models.family import family_for


class HybridModel(nn.Module):
    """Student `AutoModelForSequenceClassification` with per-slot frozen teacher layers and width adapters.

    Only what the hybrid runs is kept as sub-modules: the whole student seq model, the teacher layers of each slot
    (registered, so DeepSpeed partitions and places them with the rest, but frozen), and, when the widths differ,
    one trainable `d_s -> d_t` / `d_t -> d_s` adapter pair per slot. The teacher's embeddings and head are not
    kept: the hybrid's input and output ends are always the student's, which is what gets exported.
    The teacher layers are taken from `teacher` (not copied) and frozen in place.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, mapping: list[list[int]]):
        super().__init__()
        family = family_for(student.config)
        teacher_family = family_for(teacher.config)
        if teacher_family.name != family.name:
            raise ConfigError(
                f"the teacher is a {teacher.config.model_type} model ({teacher_family.name} family) but the student "
                f"is {student.config.model_type} ({family.name} family): layer replacement needs one family"
            )
        student_layers = family.layers(family.encoder_of(student))
        teacher_layers = family.layers(family.encoder_of(teacher))
        if len(mapping) != len(student_layers):
            raise ConfigError(
                f"the layer mapping has {len(mapping)} slots but the student has {len(student_layers)} layers"
            )
        bad = [slot for slot in mapping if not slot or not all(0 <= j < len(teacher_layers) for j in slot)]
        if bad:
            raise ConfigError(
                f"layer mapping slots {bad} are empty or outside the teacher's layers 0..{len(teacher_layers) - 1}"
            )
        if student.config.num_labels != teacher.config.num_labels:
            raise ConfigError(
                f"the teacher has {teacher.config.num_labels} labels but the student {student.config.num_labels}: "
                "both must be built for the task's label set"
            )

        self.family = family
        self.mapping = [list(slot) for slot in mapping]
        self.student = student
        # Only the config is kept from the teacher's model: the masks for its layers follow its attention
        # implementation, which may differ from the student's.
        self.teacher_config = teacher.config
        self.teacher_layers = nn.ModuleList(nn.ModuleList(teacher_layers[j] for j in slot) for slot in mapping)
        self.teacher_layers.requires_grad_(False)
        self.teacher_layers.eval()

        d_s, d_t = student.config.hidden_size, teacher.config.hidden_size
        self.adapters_in: nn.ModuleList | None = None
        self.adapters_out: nn.ModuleList | None = None
        if d_s != d_t:
            pairs = [_isometric_pair(d_s, d_t) for _ in mapping]
            self.adapters_in = nn.ModuleList(up for up, _ in pairs)
            self.adapters_out = nn.ModuleList(down for _, down in pairs)

    @property
    def num_slots(self) -> int:
        return len(self.mapping)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        student_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, num_labels]; `student_mask[i]` True runs student layer i in slot i (None: all student)."""
        use_student = self._slots(student_mask)
        encoder = self.family.encoder_of(self.student)
        hidden = self.family.embed(encoder, input_ids, token_type_ids)
        student_attn = self.family.attention_mask(encoder, hidden, attention_mask)
        teacher_attn = None
        if not all(use_student):
            teacher_attn = self.family.attention_mask_for(self.teacher_config, hidden, attention_mask)
        for i, layer in enumerate(self.family.layers(encoder)):
            if use_student[i]:
                hidden = layer(hidden, student_attn)
            else:
                hidden = self._teacher_slot(i, hidden, teacher_attn)
        return self.family.classify(self.student, hidden)

    def _teacher_slot(self, i: int, hidden: torch.Tensor, mask) -> torch.Tensor:
        if self.adapters_in is not None:
            hidden = self.adapters_in[i](hidden)
        for layer in self.teacher_layers[i]:
            hidden = layer(hidden, mask)
        if self.adapters_out is not None:
            hidden = self.adapters_out[i](hidden)
        return hidden

    def _slots(self, student_mask: torch.Tensor | None) -> list[bool]:
        if student_mask is None:
            return [True] * self.num_slots
        if student_mask.dtype != torch.bool or tuple(student_mask.shape) != (self.num_slots,):
            raise ValueError(
                f"student_mask must be a bool tensor of shape ({self.num_slots},), "
                f"got {student_mask.dtype} {tuple(student_mask.shape)}"
            )
        return student_mask.tolist()

    def train(self, mode: bool = True) -> HybridModel:
        """Switch the student (and adapters); the teacher layers stay in eval mode, i.e. without dropout, since
        they are a fixed function the student is being fitted around."""
        super().train(mode)
        self.teacher_layers.eval()
        return self

    def student_model(self) -> nn.Module:
        """The plain student seq model (no adapters, no teacher layers): what stage 2 exports."""
        return self.student

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student and adapter parameters: what the optimizer gets (teacher layers are frozen)."""
        return [p for p in self.parameters() if p.requires_grad]


def _isometric_pair(d_s: int, d_t: int) -> tuple[nn.Linear, nn.Linear]:
    """Adapters `up: d_s -> d_t` and `down: d_t -> d_s` with `down.weight = up.weight.T`, `up.weight` orthogonal.

    Orthogonal rows/columns make `up` an isometry onto a d_s-dimensional subspace of the teacher's width (for
    d_s < d_t), so down(up(x)) = x exactly at the start and a teacher slot begins as "the teacher layer seen
    through a rotation" rather than through a random rescaling; norms (and the LayerNorm-ed scale the teacher
    layer's residual expects) are preserved and gradients through the pair are neither amplified nor damped.
    For d_s > d_t, down(up(x)) is the orthogonal projection of x onto d_t dimensions, the best a d_t bottleneck
    can do. Zero biases keep the pair linear at init.
    """
    up = nn.Linear(d_s, d_t)
    down = nn.Linear(d_t, d_s)
    with torch.no_grad():
        nn.init.orthogonal_(up.weight)
        down.weight.copy_(up.weight.T)
        up.bias.zero_()
        down.bias.zero_()
    return up, down
