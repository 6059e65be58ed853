"""The replacement rate p(t): the probability that a slot runs its student layer at optimizer step t.

BERT-of-Theseus found a linear curriculum (start mostly teacher, end all student) better than a constant rate,
and a constant rate of 0.5-0.7 robust. After `replacing_steps` the rate is 1: the hybrid is the student alone and
training continues as plain fine-tuning of the student ("successor fine-tuning").
"""

from __future__ import annotations

from arc_dist.config import ReplacementScheduleConfig


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
