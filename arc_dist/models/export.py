"""Export a trained encoder as a stock Hugging Face directory (save_pretrained + tokenizer), from any ZeRO stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param


def export_hf_model(engine, model: torch.nn.Module, tokenizer, out_dir: str | Path, rank: int,
                    extra: dict[str, Any] | None = None) -> None:
    """Collective. Gathers ZeRO-3 partitions where needed; rank 0 writes fp32 weights, config and tokenizer.

    Under bf16 the module holds bf16 working copies and the fp32 master weights live in DeepSpeed's optimizer:
    trained parameters are exported from the masters, so the export (and a stage 2 started from it) keeps full
    precision. Frozen parameters have no master and are written as the module holds them.
    The result loads with `AutoModel.from_pretrained(out_dir)` (or the Auto class of its head) and no project code.
    `extra` maps file names to JSON-serialisable objects written beside it (e.g. "metrics.json").
    """
    out_dir = Path(out_dir)
    params = list(model.parameters())
    partitioned = any(hasattr(p, "ds_id") for p in params)
    # Keyed by the parameter itself, not its name: a tied pair (e.g. a masked-LM decoder sharing the word
    # embeddings) is one parameter with one master under two state-dict names, and both must be written from it.
    masters: dict[int, torch.Tensor] = {}
    if any(p.dtype != torch.float32 for p in params):
        # Collective on every rank, in the same order (an all-reduce or all-gather per parameter); only rank 0,
        # which writes them, keeps a host copy.
        for p in params:
            master = safe_get_full_fp32_param(p)
            if master is not None and rank == 0:
                # copy=True: a host tensor of its own even where the master already lives on the host (CPU runs).
                masters[id(p)] = master.detach().to("cpu", torch.float32, copy=True)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=partitioned):
        if rank == 0:
            # keep_vars=True: the entries are the parameters themselves, so each finds its master by identity.
            state = {k: masters[id(v)] if id(v) in masters else v.detach().to("cpu", torch.float32, copy=True)
                     for k, v in model.state_dict(keep_vars=True).items()}
            model.save_pretrained(str(out_dir), state_dict=state)
            # save_pretrained records the module's dtype (bf16 under bf16 training), and from_pretrained's default
            # dtype="auto" would then load these fp32 weights as bf16: the config must say what was written.
            model.config.dtype = "float32"
            model.config.save_pretrained(str(out_dir))
            tokenizer.save_pretrained(str(out_dir))
            for name, content in (extra or {}).items():
                (out_dir / name).write_text(json.dumps(content, indent=2, default=str))
    dist.barrier()
