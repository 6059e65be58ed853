"""Divergence: a step whose loss or gradients are not finite is skipped, counted, and N in a row stop the run.

The skip itself is DeepSpeed's: with ZeRO stage >= 1, or bf16 at any stage, the optimizer checks the reduced
gradients for inf/NaN on every rank (an all-reduce of the flag, so all ranks agree), drops the update, clears the
gradients and does not advance the LR schedule; `engine.was_step_applied()` says whether it happened and
`engine.skipped_steps` counts the skips (saved in DeepSpeed's checkpoint). ZeRO stage 0 in fp32 runs the plain
torch optimizer, which applies NaN updates, so that combination is refused up front (`check_skipping_supported`).

`DivergenceGuard` keeps the count of skips in a row (saved in our trainer state, so a resume continues it) and
turns N in a row into a `TrainingDiverged` error before the step's checkpoint is written: the newest complete
checkpoint on disk is the last good one.
"""

from __future__ import annotations

import logging
from typing import Any

from arc_dist.engine.distributed import zero_stage
from arc_dist.errors import ArcError, ConfigError

log = logging.getLogger("arc_dist")


class TrainingDiverged(ArcError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def check_skipping_supported(ds_config: dict[str, Any], path: str) -> None:
    if zero_stage(ds_config) == 0 and not ds_config.get("bf16", {}).get("enabled", False):
        raise ConfigError(
            f"DeepSpeed config {path}: ZeRO stage 0 in fp32 applies updates with NaN/inf gradients (DeepSpeed checks "
            "gradients only under ZeRO >= 1 or bf16), so a diverging step would corrupt the model; use "
            "ds_configs/student_zero2.json (or any zero_optimization.stage >= 1), or train.precision=bf16"
        )


class DivergenceGuard:
    def __init__(self, max_consecutive: int, consecutive: int = 0):
        self.max_consecutive = max_consecutive
        self.consecutive = consecutive  # skipped steps in a row up to now (restored from the trainer state)
        self.first_step: int | None = None

    def check(self, engine, step: int, loss: float, checkpointer, metrics) -> bool:
        """After an optimizer step: True if DeepSpeed skipped it. The Nth skip in a row closes the metrics (so
        TensorBoard keeps the last steps) and raises TrainingDiverged naming the newest complete checkpoint."""
        skipped = not engine.was_step_applied()
        if self.record(step, not skipped, loss, engine.skipped_steps):
            metrics.close()
            raise self.error(step, checkpointer.newest())
        return skipped

    def record(self, step: int, applied: bool, loss: float, total_skipped: int) -> bool:
        """Record whether `step`'s update was applied; True when the run must stop (then raise `error()`)."""
        if applied:
            self.consecutive, self.first_step = 0, None
            return False
        self.consecutive += 1
        self.first_step = self.first_step or step - self.consecutive + 1
        self.last_loss = loss
        log.warning("step %d: non-finite loss or gradient (loss %s); update skipped (%d in a row, %d in total)",
                    step, loss, self.consecutive, total_skipped)
        return self.consecutive >= self.max_consecutive

    def error(self, step: int, last_checkpoint: str | None) -> TrainingDiverged:
        where = f"the newest complete checkpoint, {last_checkpoint}," if last_checkpoint else "no checkpoint"
        return TrainingDiverged(
            f"training diverged: steps {self.first_step}-{step} ({self.consecutive} in a row, "
            f"train.max_consecutive_skips={self.max_consecutive}) all had a non-finite loss or gradient (last loss "
            f"{self.last_loss}) and were skipped. Stopped without saving; {where} is untouched. Lower optim.lr, "
            "add optim.warmup_steps or gradient clipping (optim.grad_clip), or check the data, then resume from it "
            "(checkpoint.resume=auto)."
        )
