"""Checkpointer with a real (single-rank, gloo) DeepSpeed engine: resume picks the newest intact checkpoint."""

from __future__ import annotations

import os

import pytest
import torch

from arc_dist.engine.checkpoint import Checkpointer
from arc_dist.errors import ConfigError


@pytest.fixture(scope="module")
def engine():
    import deepspeed

    from arc_dist.engine.distributed import init_distributed, load_ds_config

    init_distributed()
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    ds = load_ds_config("ds_configs/student_zero2.json", {"train_micro_batch_size_per_gpu": 2,
                                                          "gradient_accumulation_steps": 1,
                                                          "gradient_clipping": 1.0, "bf16.enabled": False})
    eng, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=ds)
    return eng


def step(engine):
    loss = engine(torch.randn(2, 8)).pow(2).mean()
    engine.backward(loss)
    engine.step()


def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path, engine):
    ckpt = Checkpointer(tmp_path, keep_last=5, rank=0)
    for s in (1, 2, 3):
        step(engine)
        ckpt.save(engine, s, {"step": s})
    assert ckpt.resolve("auto") == "step_00000003"
    assert (tmp_path / "latest").read_text() == "step_00000003"

    optim = next((tmp_path / "step_00000003").glob("*optim_states.pt"))
    with open(optim, "r+b") as f:  # a truncated copy
        f.truncate(os.path.getsize(optim) // 2)
    assert "corrupt" in ckpt.verify("step_00000003")
    assert ckpt.resolve("auto") == "step_00000002"
    with pytest.raises(ConfigError, match="unusable"):
        ckpt.resolve("step_00000003")

    (tmp_path / "step_00000002" / "rank_00000.pt").unlink()
    assert ckpt.resolve("auto") == "step_00000001"
    state = ckpt.load(engine, "step_00000001")
    assert state == {"step": 1}


def test_incomplete_checkpoint_is_never_resumed(tmp_path, engine):
    ckpt = Checkpointer(tmp_path, keep_last=2, rank=0)
    step(engine)
    ckpt.save(engine, 1, {"step": 1})
    # a write killed before the barrier: files exist, COMPLETE and `latest` do not
    (tmp_path / "step_00000002").mkdir()
    (tmp_path / "step_00000002" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    assert ckpt.resolve("auto") == "step_00000001"
    assert ckpt.resolve("none") is None


def test_keep_last_prunes_old_checkpoints(tmp_path, engine):
    ckpt = Checkpointer(tmp_path, keep_last=2, rank=0)
    for s in range(1, 5):
        step(engine)
        ckpt.save(engine, s, {"step": s})
    assert ckpt.complete_tags() == ["step_00000003", "step_00000004"]
