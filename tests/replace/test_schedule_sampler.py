"""The replacement-rate schedule and the rank-independent, resumable replacement mask."""

from __future__ import annotations

import pytest
import torch

from arc_dist.errors import ConfigError
from arc_dist.replace.sampler import ReplacementSampler
from arc_dist.replace.schedule import ReplacementSchedule, ReplacementScheduleConfig

# ----------------------------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------------------------


def test_linear_default_slope_reaches_one_at_replacing_steps():
    sched = ReplacementSchedule(ReplacementScheduleConfig(kind="linear", base=0.3, replacing_steps=100))
    # k = (1 - 0.3) / 100 = 0.007
    expected = {0: 0.3, 1: 0.307, 10: 0.37, 50: 0.65, 99: 0.993, 100: 1.0, 101: 1.0, 5000: 1.0}
    for step, p in expected.items():
        assert sched.rate(step) == pytest.approx(p, abs=1e-12), step
    assert not sched.student_only(99)
    assert sched.student_only(100)


def test_linear_explicit_slope_caps_at_one_then_phase_end_forces_one():
    sched = ReplacementSchedule(ReplacementScheduleConfig(kind="linear", base=0.2, slope=0.01, replacing_steps=200))
    expected = {0: 0.2, 40: 0.6, 79: 0.99, 80: 1.0, 150: 1.0, 200: 1.0}
    for step, p in expected.items():
        assert sched.rate(step) == pytest.approx(p, abs=1e-12), step
    assert sched.student_only(80)  # p hit 1 before the phase ended: no teacher layer runs any more

    slow = ReplacementSchedule(ReplacementScheduleConfig(kind="linear", base=0.3, slope=0.001, replacing_steps=100))
    assert slow.rate(99) == pytest.approx(0.399)
    assert slow.rate(100) == 1.0  # successor fine-tuning starts at the end of the phase regardless of k


def test_constant_switch_step():
    sched = ReplacementSchedule(ReplacementScheduleConfig(kind="constant", rate=0.6, switch_step=30, replacing_steps=100))
    assert [sched.rate(s) for s in (0, 1, 29, 30, 31, 99, 100, 1000)] == [0.6, 0.6, 0.6, 1.0, 1.0, 1.0, 1.0, 1.0]
    default = ReplacementSchedule(ReplacementScheduleConfig(kind="constant", rate=0.5, replacing_steps=100))
    assert [default.rate(s) for s in (0, 99, 100)] == [0.5, 0.5, 1.0]
    assert not default.student_only(99) and default.student_only(100)


@pytest.mark.parametrize(
    "fields, fragment",
    [
        (dict(rate=0.0), "rate=0.0 must be in (0, 1]"),
        (dict(rate=1.5), "rate=1.5 must be in (0, 1]"),
        (dict(base=0.0), "base=0.0 must be in (0, 1]"),
        (dict(base=1.2), "base=1.2 must be in (0, 1]"),
        (dict(slope=0.0), "slope=0.0 must be > 0"),
        (dict(slope=-0.1), "slope=-0.1 must be > 0"),
        (dict(replacing_steps=0), "replacing_steps=0 must be >= 1"),
        (dict(switch_step=101, replacing_steps=100), "switch_step=101 must be in 0..replacing_steps=100"),
        (dict(kind="cosine"), "kind='cosine' is not allowed"),
    ],
)
def test_validation(fields, fragment):
    with pytest.raises(ConfigError) as info:
        ReplacementSchedule(ReplacementScheduleConfig(**fields))
    assert fragment in str(info.value)


def test_validation_against_total_steps():
    cfg = ReplacementScheduleConfig(replacing_steps=500)
    cfg.validate(total_steps=500)
    with pytest.raises(ConfigError, match="replacing_steps=500 exceeds train.steps=400"):
        cfg.validate(total_steps=400)


def test_negative_step_is_rejected():
    with pytest.raises(ValueError):
        ReplacementSchedule(ReplacementScheduleConfig()).rate(-1)


# ----------------------------------------------------------------------------------------------------------------
# Sampler
# ----------------------------------------------------------------------------------------------------------------


def test_mask_is_pure_in_seed_step_rate_and_ignores_global_rng():
    first = ReplacementSampler(6, seed=1234)
    reference = [first.mask(step, 0.5) for step in range(50)]
    for global_seed in (0, 7, 99):
        torch.manual_seed(global_seed)
        torch.rand(1000)  # consume the global stream, as dropout on another rank would
        other = ReplacementSampler(6, seed=1234)
        for step in reversed(range(50)):  # order of calls must not matter either
            assert torch.equal(other.mask(step, 0.5), reference[step]), (global_seed, step)
    # ... and sampling does not disturb the global stream it ignores
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first.mask(3, 0.5)
    assert torch.equal(torch.rand(3), expected)


def test_masks_vary_over_steps_and_seeds():
    sampler = ReplacementSampler(6, seed=0)
    masks = {tuple(sampler.mask(step, 0.5).tolist()) for step in range(200)}
    assert len(masks) > 30  # 63 possible non-empty masks
    other = ReplacementSampler(6, seed=1)
    assert any(not torch.equal(sampler.mask(s, 0.5), other.mask(s, 0.5)) for s in range(10))


def test_never_all_teacher():
    sampler = ReplacementSampler(6, seed=3)
    counts = [int(sampler.mask(step, 0.01).sum()) for step in range(500)]
    assert min(counts) >= 1
    assert counts.count(1) > 450  # at rate 0.01 nearly always exactly the forced slot


def test_student_fraction_matches_rate():
    sampler = ReplacementSampler(6, seed=11)
    fraction = torch.stack([sampler.mask(step, 0.5) for step in range(2000)]).float().mean().item()
    # forcing adds (1 - rate)^6 / 6 ~ 0.0026 of student slots; binomial sd over 12000 draws ~ 0.0046
    assert abs(fraction - 0.5) < 0.02


def test_higher_rate_keeps_lower_rate_students():
    sampler = ReplacementSampler(6, seed=5)
    for step in range(100):
        low, high = sampler.mask(step, 0.3), sampler.mask(step, 0.7)
        assert bool((high | ~low).all())


def test_rate_one_is_all_student():
    sampler = ReplacementSampler(4, seed=0)
    for step in range(20):
        mask = sampler.mask(step, 1.0)
        assert mask.dtype == torch.bool and mask.tolist() == [True] * 4


def test_invalid_rate():
    with pytest.raises(ValueError):
        ReplacementSampler(4, seed=0).mask(0, 0.0)


def test_state_dict_round_trip_and_mismatch():
    sampler = ReplacementSampler(6, seed=42)
    assert sampler.state_dict() == {"seed": 42, "num_slots": 6}
    ReplacementSampler(6, seed=42).load_state_dict(sampler.state_dict())
    with pytest.raises(ConfigError) as info:
        ReplacementSampler(6, seed=43).load_state_dict(sampler.state_dict())
    assert "seed: checkpoint 42 vs config 43" in str(info.value)
    with pytest.raises(ConfigError, match="num_slots: checkpoint 6 vs config 4"):
        ReplacementSampler(4, seed=42).load_state_dict(sampler.state_dict())
