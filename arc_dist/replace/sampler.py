"""The per-step replacement mask: which slots run their student layer, identical on every rank by construction.

Every data-parallel rank must run the same set of layers at the same optimizer step. If ranks disagreed, ZeRO-3
would hang (ranks would wait in all-gathers for parameters of layers the other ranks never call) and DDP/ZeRO-1/2
would silently average gradients of *different* networks. Public Theseus implementations draw the mask from the
global RNG, which diverges across ranks as soon as anything rank-specific consumes random numbers (dropout seeded
per rank, data loading). Here the mask is a pure function of (seed, step, rate): a dedicated CPU generator is
seeded from a hash of (seed, step) on every call, so all ranks agree without any communication, and a resumed
run reproduces the exact masks of the interrupted one from the restored step counter.
"""

from __future__ import annotations

import hashlib

import torch

from arc_dist.errors import ConfigError


class ReplacementSampler:
    def __init__(self, num_slots: int, seed: int):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self.seed = seed

    def mask(self, step: int, rate: float) -> torch.Tensor:
        """Bool tensor [num_slots] on the CPU, True where the slot runs its student layer at optimizer `step`.

        Slot i is a student slot iff u_i < rate with u ~ U[0,1)^num_slots drawn from the (seed, step) stream.
        The draw does not depend on `rate`, so at a given step a higher rate keeps every student slot of a lower
        one. If no slot is a student slot, the one with the smallest u is forced to be: an all-teacher step would
        train nothing but the embeddings and head. The choice is deterministic, so ranks still agree.
        """
        if not 0 < rate <= 1:
            raise ValueError(f"replacement rate must be in (0, 1], got {rate}")
        if rate == 1.0:
            return torch.ones(self.num_slots, dtype=torch.bool)
        generator = torch.Generator(device="cpu")
        generator.manual_seed(self._stream_seed(step))
        u = torch.rand(self.num_slots, generator=generator)
        mask = u < rate
        if not mask.any():
            mask[torch.argmin(u)] = True
        return mask

    def _stream_seed(self, step: int) -> int:
        # sha256 rather than Python's hash(): hash() of str is salted per process, which would break cross-rank
        # and cross-run agreement. 63 bits keeps the value inside what Generator.manual_seed accepts.
        digest = hashlib.sha256(f"arc-replace/{self.seed}/{step}".encode()).digest()
        return int.from_bytes(digest[:8], "big") & (2**63 - 1)

    def state_dict(self) -> dict[str, int]:
        """Everything the masks depend on besides (step, rate): saved with checkpoints to guard resumes."""
        return {"seed": self.seed, "num_slots": self.num_slots}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Refuse to resume with a different seed or slot count: the run would silently switch mask streams."""
        mine = self.state_dict()
        diff = {k: (state.get(k), mine[k]) for k in mine if state.get(k) != mine[k]}
        if diff:
            details = ", ".join(f"{k}: checkpoint {saved!r} vs config {now!r}" for k, (saved, now) in diff.items())
            raise ConfigError(
                f"the checkpoint's replacement sampler does not match this run ({details}); resume with the "
                "checkpoint's train.seed and student size, or start a new run"
            )
