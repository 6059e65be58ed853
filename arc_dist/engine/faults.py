"""Deterministic fault injection for the reliability tests, driven by the `ARC_FAULTS` environment variable.

Real faults (a diverging step, a kill in the middle of a checkpoint write) are rare and badly timed; the tests need
them at an exact step. `ARC_FAULTS` is a comma-separated list of

    nan_loss@STEP[:RANK]      the loss of optimizer step STEP is multiplied by NaN (on RANK only, default all ranks)
    stall_save@STEP[:RANK]    the checkpoint save of step STEP stops after DeepSpeed wrote its files and before
                              this rank's own file and the COMPLETE marker (a test then kills the job there)

Unset (the normal case) every hook is a no-op. A malformed value is an error at start-up, not a silent no-op.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time

import torch

from arc_dist.errors import ConfigError

log = logging.getLogger("arc_dist")

ENV = "ARC_FAULTS"
KINDS = ("nan_loss", "stall_save")


@functools.cache
def _parse(value: str) -> frozenset[tuple[str, int, int | None]]:
    faults = set()
    for item in filter(None, (s.strip() for s in value.split(","))):
        kind, _, where = item.partition("@")
        step, _, rank = where.partition(":")
        if kind not in KINDS or not step.isdigit() or (rank and not rank.isdigit()):
            raise ConfigError(f"{ENV}={value!r}: bad entry {item!r}; expected KIND@STEP[:RANK] with KIND in {KINDS}")
        faults.add((kind, int(step), int(rank) if rank else None))
    return frozenset(faults)


def active(kind: str, step: int, rank: int) -> bool:
    return any(k == kind and s == step and r in (None, rank) for k, s, r in _parse(os.environ.get(ENV, "")))


def poison_loss(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """`loss`, or `loss * NaN` when ARC_FAULTS asks for a diverging step here."""
    if active("nan_loss", step, rank):
        log.warning("%s: injecting a NaN loss at step %d on rank %d", ENV, step, rank)
        return loss * float("nan")
    return loss


def stall_if_requested(kind: str, step: int, rank: int) -> None:
    """Block forever (until killed) when ARC_FAULTS asks for a stall here; prints a line a test can wait for."""
    if active(kind, step, rank):
        # One write() of the whole line: ranks share the launcher's pipe, and print() writes the text and the
        # newline separately, so two ranks' lines could interleave into one.
        sys.stderr.write(f"{ENV}: rank {rank} stalled in {kind} at step {step}\n")
        sys.stderr.flush()
        while True:
            time.sleep(3600)
