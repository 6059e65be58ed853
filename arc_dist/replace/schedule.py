"""The replacement rate p(t): the probability that a slot runs its student layer at optimizer step t.

BERT-of-Theseus found a linear curriculum (start mostly teacher, end all student) better than a constant rate,
and a constant rate of 0.5-0.7 robust. After `replacing_steps` the rate is 1: the hybrid is the student alone and
training continues as plain fine-tuning of the student ("successor fine-tuning").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from arc_dist.config import option
from arc_dist.errors import ConfigError


@dataclass
class ReplacementScheduleConfig:
    kind: Literal["constant", "linear"] = option(
        "linear", "Replacement-rate schedule: 'linear' curriculum p = min(1, slope*t + base), or 'constant' p = rate."
    )
    rate: float = option(0.5, "Constant schedule: the replacement rate p, in (0, 1] (0.5-0.7 is robust; 0.1 is bad).")
    switch_step: int | None = option(
        None, "Constant schedule: optimizer step from which p = 1; default: replacing_steps."
    )
    base: float = option(0.3, "Linear schedule: p at step 0 (b), in (0, 1].")
    slope: float | None = option(
        None, "Linear schedule: increase of p per optimizer step (k); default (1 - base) / replacing_steps."
    )
    replacing_steps: int = option(
        1000,
        "Optimizer steps of the replacement phase; from this step on p = 1 and the student is fine-tuned alone "
        "for the rest of train.steps.",
    )

    def validate(self, total_steps: int | None = None) -> None:
        """Check ranges; with `total_steps` (train.steps) also check the replacement phase fits in training."""
        if self.kind not in ("constant", "linear"):
            raise ConfigError(f"replace.schedule.kind={self.kind!r} is not allowed; choose one of ['constant', 'linear']")
        if not 0 < self.rate <= 1:
            raise ConfigError(f"replace.schedule.rate={self.rate} must be in (0, 1]: at 0 no student layer would train")
        if not 0 < self.base <= 1:
            raise ConfigError(f"replace.schedule.base={self.base} must be in (0, 1]")
        if self.slope is not None and self.slope <= 0:
            raise ConfigError(f"replace.schedule.slope={self.slope} must be > 0 (or null for the default)")
        if self.replacing_steps < 1:
            raise ConfigError(f"replace.schedule.replacing_steps={self.replacing_steps} must be >= 1")
        if self.switch_step is not None and not 0 <= self.switch_step <= self.replacing_steps:
            raise ConfigError(
                f"replace.schedule.switch_step={self.switch_step} must be in 0..replacing_steps="
                f"{self.replacing_steps} (p is 1 after the replacement phase anyway)"
            )
        if total_steps is not None and self.replacing_steps > total_steps:
            raise ConfigError(
                f"replace.schedule.replacing_steps={self.replacing_steps} exceeds train.steps={total_steps}: "
                "the replacement phase must fit inside training"
            )


class ReplacementSchedule:
    """p(t) as a function of the global optimizer step t (the number of optimizer steps already completed).

    Keyed on the optimizer step rather than the micro-step so that every micro-batch of one accumulated step uses
    the same rate, and a resumed run (which restores the step counter) continues the curve exactly.
    """

    def __init__(self, config: ReplacementScheduleConfig):
        config.validate()
        self.config = config
        self.switch_step = config.replacing_steps if config.switch_step is None else config.switch_step
        self.slope = (1.0 - config.base) / config.replacing_steps if config.slope is None else config.slope

    def rate(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"optimizer step must be >= 0, got {step}")
        if step >= self.config.replacing_steps:
            return 1.0
        if self.config.kind == "constant":
            return self.config.rate if step < self.switch_step else 1.0
        return min(1.0, self.slope * step + self.config.base)

    def student_only(self, step: int) -> bool:
        """True once p has reached 1 (at the latest when the replacement phase ends): no teacher layer runs from
        this step on, since p never decreases, so the trainer may run the plain student."""
        return self.rate(step) == 1.0
