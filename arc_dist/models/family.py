"""Family adapters: where each encoder family keeps its embeddings, layers and Q/K/V projections.

The rest of the project never reaches into a model's attributes directly; it asks the adapter. Adding a family
(DeBERTa, say) means adding one adapter here, not editing the trainers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.masking_utils import create_bidirectional_mask

from arc_dist.errors import ConfigError


@dataclass(frozen=True)
class FamilyAdapter:
    """BERT-style encoders: `model.embeddings`, `model.encoder.layer[i].attention.self.{query,key,value}`."""

    name: str
    model_types: tuple[str, ...]
    # ELECTRA's embeddings may be narrower than the hidden size and are projected up before the first layer.
    embeddings_project: bool = False
    # BERT classifies the pooled [CLS] (pooler + dropout + classifier); RoBERTa/XLM-R/ELECTRA's `classifier` head
    # takes the whole sequence output and picks <s> itself.
    head_on_pooler: bool = False

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.encoder.layer

    def qkv(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        attn = layer.attention.self
        return attn.query, attn.key, attn.value

    def embed(self, model: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        hidden = model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        if self.embeddings_project and hasattr(model, "embeddings_project"):
            hidden = model.embeddings_project(hidden)
        return hidden

    def attention_mask(self, model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None):
        """The mask in whatever form the model's attention implementation expects (eager, sdpa, ...)."""
        return create_bidirectional_mask(config=model.config, inputs_embeds=hidden, attention_mask=attention_mask)

    def unused_above_qkv(self, layer: nn.Module) -> list[nn.Module]:
        """Sub-modules of a layer that run after its Q/K/V projections (attention output and FFN)."""
        return [layer.attention.output, layer.intermediate, layer.output]

    def attention_mask_for(self, config: PretrainedConfig, hidden: torch.Tensor, attention_mask: torch.Tensor | None):
        """`attention_mask` for a config without its model: stage 2 keeps the teacher's layers but not the model."""
        return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)

    def encoder_of(self, seq_model: nn.Module) -> nn.Module:
        """The base encoder inside a task model (`.bert`, `.roberta`, `.electra`: HF's `base_model_prefix`)."""
        prefix = getattr(seq_model, "base_model_prefix", "")
        encoder = getattr(seq_model, prefix, None) if prefix else None
        if encoder is None or not hasattr(seq_model, "classifier"):
            raise ConfigError(
                f"expected a {self.name} sequence-classification model (AutoModelForSequenceClassification), "
                f"got {type(seq_model).__name__}"
            )
        return encoder

    def classify(self, seq_model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_labels] from the last hidden states [B, S, d], with the task model's own head."""
        if self.head_on_pooler:
            pooled = self.encoder_of(seq_model).pooler(hidden)
            return seq_model.classifier(seq_model.dropout(pooled))
        return seq_model.classifier(hidden)


FAMILIES = (
    FamilyAdapter("bert", ("bert",), head_on_pooler=True),
    FamilyAdapter("roberta", ("roberta", "xlm-roberta", "camembert")),
    FamilyAdapter("electra", ("electra",), embeddings_project=True),
)


def family_for(config: PretrainedConfig) -> FamilyAdapter:
    for family in FAMILIES:
        if config.model_type in family.model_types:
            return family
    supported = sorted(t for f in FAMILIES for t in f.model_types)
    raise ConfigError(
        f"model type {config.model_type!r} is not supported; supported families: {supported}. "
        "Add a FamilyAdapter in arc_dist/models/family.py for a new encoder family."
    )


class QKVExtractor(nn.Module):
    """Runs an encoder up to the Q/K/V projections of one layer and returns them: ([B,S,d],) * 3.

    Used for both models in stage 1: the truncated teacher (whose last kept layer is the distilled one) and the
    student (whose last layer contributes only Q/K/V to the relation loss, so its attention output and FFN are
    never computed). Every parameter is touched inside this module's forward through sub-module calls, which is
    what ZeRO-3's gather hooks need.
    """

    def __init__(self, model: nn.Module, family: FamilyAdapter, layer_index: int):
        super().__init__()
        self.model = model
        self.family = family
        self.layer_index = layer_index

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = self.family.embed(self.model, input_ids, token_type_ids)
        mask = self.family.attention_mask(self.model, hidden, attention_mask)
        layers = self.family.layers(self.model)
        for layer in layers[: self.layer_index]:
            hidden = layer(hidden, mask)
        query, key, value = self.family.qkv(layers[self.layer_index])
        return query(hidden), key(hidden), value(hidden)
