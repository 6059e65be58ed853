"""Non-finite steps: DeepSpeed's skip (the contract we rely on, per shipped config), our guard, fault injection."""

from __future__ import annotations

import math

import pytest
import torch

from arc_dist.engine.divergence import DivergenceGuard, TrainingDiverged, check_skipping_supported
from arc_dist.engine.faults import active, poison_loss
from arc_dist.errors import ConfigError


@pytest.mark.parametrize("ds_config", ["ds_configs/student_zero2.json", "ds_configs/student_zero3.json"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_deepspeed_skips_a_nonfinite_step_on_shipped_configs(ds_config, bf16):
    """With our shipped student configs a NaN loss leaves every parameter bit-identical and the LR schedule
    unchanged; the next step is applied. If a DeepSpeed upgrade changes this, this test says so."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from arc_dist.engine.distributed import init_distributed, load_ds_config

    init_distributed()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    ds = load_ds_config(ds_config, {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                                    "gradient_clipping": 1.0, "bf16.enabled": bf16})
    check_skipping_supported(ds, ds_config)
    engine, _, _, schedule = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                                  config=ds)
    dtype = torch.bfloat16 if bf16 else torch.float32

    def params():
        return [safe_get_full_fp32_param(p).clone() for p in engine.module.parameters()]

    def optimizer_step(poison: bool) -> None:
        for micro in range(2):
            loss = engine(torch.randn(2, 8, dtype=dtype)).float().pow(2).mean()
            engine.backward(loss * float("nan") if poison and micro == 1 else loss)
            engine.step()

    optimizer_step(poison=False)
    before, lr_before = params(), schedule.get_last_lr()[0]
    optimizer_step(poison=True)
    assert not engine.was_step_applied() and engine.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, params())), "a NaN step changed the parameters"
    assert schedule.get_last_lr()[0] == lr_before
    optimizer_step(poison=False)
    assert engine.was_step_applied() and engine.skipped_steps == 1
    after = params()
    assert all(torch.isfinite(p).all() for p in after) and not all(torch.equal(a, b) for a, b in zip(before, after))


def test_zero0_fp32_is_refused_because_it_would_apply_nan_updates():
    with pytest.raises(ConfigError, match="ZeRO stage 0 in fp32 applies updates with NaN"):
        check_skipping_supported({"zero_optimization": {"stage": 0}}, "my_ds.json")
    with pytest.raises(ConfigError, match="my_ds.json"):
        check_skipping_supported({}, "my_ds.json")
    check_skipping_supported({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}, "x.json")
    check_skipping_supported({"zero_optimization": {"stage": 1}}, "x.json")


def test_guard_counts_runs_of_skips_and_names_the_last_good_checkpoint():
    guard = DivergenceGuard(max_consecutive=3)
    assert not guard.record(1, True, 0.5, 0)
    assert not guard.record(2, False, math.nan, 1)
    assert not guard.record(3, True, 0.4, 1)  # an applied step resets the run
    assert not guard.record(4, False, math.nan, 2)
    assert not guard.record(5, False, math.inf, 3)
    assert guard.record(6, False, math.nan, 4)
    err = guard.error(6, "/runs/x/checkpoints/step_00000004")
    assert isinstance(err, TrainingDiverged)
    assert "steps 4-6 (3 in a row, train.max_consecutive_skips=3)" in str(err)
    assert "/runs/x/checkpoints/step_00000004, is untouched" in str(err) and "optim.lr" in str(err)
    resumed = DivergenceGuard(max_consecutive=3, consecutive=2)  # restored from a checkpoint mid-run
    assert resumed.record(7, False, math.nan, 5)
    assert "steps 5-7" in str(resumed.error(7, None)) and "no checkpoint is untouched" in str(resumed.error(7, None))


def test_fault_injection_is_exact_and_rejects_malformed_values(monkeypatch):
    monkeypatch.setenv("ARC_FAULTS", "nan_loss@5:1, stall_save@10")
    assert active("nan_loss", 5, 1) and not active("nan_loss", 5, 0) and not active("nan_loss", 6, 1)
    assert active("stall_save", 10, 0) and active("stall_save", 10, 3)
    assert torch.isnan(poison_loss(torch.tensor(1.0), 5, 1)) and poison_loss(torch.tensor(1.0), 4, 1) == 1.0
    monkeypatch.setenv("ARC_FAULTS", "nan_los@5")
    with pytest.raises(ConfigError, match="ARC_FAULTS='nan_los@5': bad entry"):
        active("nan_loss", 5, 0)
    monkeypatch.delenv("ARC_FAULTS")
    assert not active("nan_loss", 5, 0)
