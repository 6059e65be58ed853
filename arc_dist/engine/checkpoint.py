"""Sharded DeepSpeed checkpoints that resume exactly: model, optimizer, LR schedule, step, data position, RNG.

Layout under `<run_dir>/checkpoints/`:
    step_00000100/            DeepSpeed's own files (model states, per-rank optimizer shards)
    step_00000100/rank_00001.pt   this rank's RNG states (CPU, CUDA, numpy, python)
    step_00000100/COMPLETE    written by rank 0 only after every rank finished writing
    latest                    the tag of the newest COMPLETE checkpoint (same format DeepSpeed and zero_to_fp32 read)

`latest` is replaced atomically (write + os.replace) after a barrier, so a process killed while writing leaves the
previous checkpoint as the one resumed. The checkpointer knows nothing about the model: the trainer hands it an
engine and a dict of its own state.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from arc_dist.engine.faults import stall_if_requested
from arc_dist.errors import ConfigError

log = logging.getLogger("arc_dist")

COMPLETE = "COMPLETE"
LATEST = "latest"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    def __init__(self, directory: str | Path, keep_last: int, rank: int):
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.rank = rank

    @staticmethod
    def tag_for(step: int) -> str:
        return f"step_{step:08d}"

    def save(self, engine, step: int, trainer_state: dict[str, Any], exclude_frozen: bool = False) -> str:
        """Collective: every rank must call it. Returns the tag.

        `exclude_frozen` leaves frozen parameters (stage 2's teacher layers) out: they are reloaded from the
        teacher's own directory, and would otherwise make every checkpoint as large as the teacher."""
        tag = self.tag_for(step)
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0 and (self.dir / tag).is_dir() and not (self.dir / tag / COMPLETE).is_file():
            # Left by a run killed while writing this very step: start it afresh, no stale file from before.
            shutil.rmtree(self.dir / tag)
        dist.barrier()
        engine.save_checkpoint(str(self.dir), tag=tag, client_state={"trainer": trainer_state}, save_latest=False,
                               exclude_frozen_parameters=exclude_frozen)
        stall_if_requested("stall_save", step, self.rank)  # ARC_FAULTS (tests): a kill lands mid-checkpoint
        torch.save({"rng": rng_state(), "trainer": trainer_state}, self.dir / tag / f"rank_{self.rank:05d}.pt")
        dist.barrier()
        if self.rank == 0:
            (self.dir / tag / COMPLETE).write_text(f"world_size={dist.get_world_size()}\n")
            tmp = self.dir / f".{LATEST}.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.dir / LATEST)
            self._prune()
        dist.barrier()
        return tag

    def resolve(self, resume: str) -> str | None:
        """The tag to resume from: 'none' -> None; 'auto' -> the newest complete one or None; else that tag."""
        if resume == "none":
            return None
        if resume == "auto":
            for folder in sorted(self.dir.glob("step_*")):
                if not (folder / COMPLETE).is_file():
                    log.warning("checkpoint %s is incomplete (the job stopped while writing it); ignored", folder)
            # Newest first; `latest` normally names the newest complete one, but a checkpoint damaged after it was
            # completed (a truncated copy, a lost shard) is reported and the previous complete one is used.
            for tag in reversed(self.complete_tags()):
                problem = self.verify(tag)
                if problem is None:
                    return tag
                log.warning("checkpoint %s is unusable (%s); trying the previous one", self.dir / tag, problem)
            return None
        if not (self.dir / resume / COMPLETE).is_file():
            raise ConfigError(
                f"checkpoint.resume={resume!r}: no complete checkpoint {self.dir / resume}; "
                f"complete ones: {self.complete_tags() or 'none'}"
            )
        problem = self.verify(resume)
        if problem is not None:
            raise ConfigError(f"checkpoint {self.dir / resume} is unusable: {problem}")
        return resume

    def verify(self, tag: str) -> str | None:
        """None if every file the checkpoint needs is present and intact (zip CRCs), else what is wrong."""
        folder = self.dir / tag
        world = int((folder / COMPLETE).read_text().strip().removeprefix("world_size="))
        expected = [folder / f"rank_{r:05d}.pt" for r in range(world)]
        model_states = sorted(folder.glob("*model_states.pt"))
        optim_states = sorted(folder.glob("*optim_states.pt"))
        if not model_states:
            return "no model_states file"
        if optim_states and len(optim_states) != world:
            return f"{len(optim_states)} optimizer shards for {world} ranks"
        for path in expected + model_states + optim_states:
            if not path.is_file():
                return f"{path.name} is missing"
            try:
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
            except (zipfile.BadZipFile, OSError) as e:
                return f"{path.name} is corrupt ({e})"
            if bad is not None:
                return f"{path.name} is corrupt (member {bad})"
        return None

    def load(self, engine, tag: str, strict: bool = True) -> dict[str, Any]:
        """Collective. Restores the engine (model, optimizer, scheduler) and this rank's RNG; returns trainer state."""
        world = dist.get_world_size()
        saved_world = (self.dir / tag / COMPLETE).read_text().strip().removeprefix("world_size=")
        if saved_world != str(world):
            raise ConfigError(
                f"checkpoint {self.dir / tag} was written by {saved_world} ranks but this run has {world}: "
                "resume with the same number of ranks (or consolidate it with zero_to_fp32 and start anew)"
            )
        load_path, _ = engine.load_checkpoint(str(self.dir), tag=tag, load_module_strict=strict)
        if load_path is None:
            raise ConfigError(f"DeepSpeed could not load checkpoint {self.dir / tag}")
        own = torch.load(self.dir / tag / f"rank_{self.rank:05d}.pt", weights_only=False)
        set_rng_state(own["rng"])
        return own["trainer"]

    def newest(self) -> str | None:
        """The newest complete checkpoint's directory, for messages."""
        tags = self.complete_tags()
        return str(self.dir / tags[-1]) if tags else None

    def complete_tags(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.glob("step_*") if (p / COMPLETE).is_file())

    def _prune(self) -> None:
        for tag in self.complete_tags()[: -self.keep_last]:
            shutil.rmtree(self.dir / tag, ignore_errors=True)
