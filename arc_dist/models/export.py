"""Export a trained encoder as a stock Hugging Face directory (save_pretrained + tokenizer), from any ZeRO stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist


def export_hf_model(engine, model: torch.nn.Module, tokenizer, out_dir: str | Path, rank: int,
                    extra: dict[str, Any] | None = None) -> None:
    """Collective. Gathers ZeRO-3 partitions where needed; rank 0 writes fp32 weights, config and tokenizer.

    The result loads with `AutoModel.from_pretrained(out_dir)` (or the Auto class of its head) and no project code.
    `extra` maps file names to JSON-serialisable objects written beside it (e.g. "metrics.json").
    """
    out_dir = Path(out_dir)
    params = list(model.parameters())
    partitioned = any(hasattr(p, "ds_id") for p in params)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=partitioned):
        if rank == 0:
            state = {k: v.detach().to(torch.float32).clone() for k, v in model.state_dict().items()}
            model.config.dtype = "float32"
            model.save_pretrained(str(out_dir), state_dict=state)
            tokenizer.save_pretrained(str(out_dir))
            for name, content in (extra or {}).items():
                (out_dir / name).write_text(json.dumps(content, indent=2, default=str))
    dist.barrier()
