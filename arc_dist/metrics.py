"""Logging on rank 0: TensorBoard scalars (train/, eval/, perf/, memory/), console lines, a tqdm bar.

Also the measurements behind perf/ and memory/: peak memory of this process, and the machine's matmul peak used
as the MFU denominator (measured in the run's own dtype, because a datasheet number means little on a CPU).
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("arc_dist")


def setup_logging(rank: int) -> None:
    """Rank 0 logs at INFO; other ranks only warnings and errors (so a failure on any rank is still seen)."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level, stream=sys.stdout, format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S", force=True
    )
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import transformers

    # Weight-loading reports and shard-writing bars: once (rank 0) is information, N copies are noise.
    transformers.utils.logging.disable_progress_bar()
    if rank != 0:
        transformers.utils.logging.set_verbosity_error()


class MetricsLogger:
    def __init__(self, log_dir: str | Path, rank: int, total_steps: int, start_step: int, progress_bar: bool):
        self.rank = rank
        self.writer = None
        self.bar = None
        self.jsonl = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm import tqdm

            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(log_dir))
            # A machine-readable copy of every logged scalar, for scripts and tests that do not parse event files.
            self.jsonl = open(Path(log_dir) / "scalars.jsonl", "a")
            if progress_bar:
                self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                                file=sys.stderr, mininterval=2.0)

    def log(self, step: int, scalars: dict[str, float], console: bool = True) -> None:
        if self.rank != 0:
            return
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        if console:
            text = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
            if self.bar is not None:
                self.bar.write(f"step {step}: {text}")
            else:
                log.info("step %d: %s", step, text)

    def advance(self, n: int = 1, **postfix: float) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.close()
        self.writer.flush()
        self.writer.close()
        self.jsonl.close()


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on GPU; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def matmul_peak_size(device: torch.device, n: int) -> int:
    """The matrix width `measure_matmul_tflops` times for a requested `n` on `device` (larger on a GPU, see there)."""
    return max(n, 8192) if device.type == "cuda" else n


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    """The achievable matmul peak that MFU is measured against: the best time over `repeats` runs of each matmul
    entry point a model uses (`mm`, `addmm` = nn.Linear with bias, `linear`). On some CPUs they dispatch to
    different kernels: measured on an AVX2 EPYC, fp32 mm 42 vs addmm 84 GFLOP/s, and bf16 (emulated) mm 0.6 vs
    linear 7.8 GFLOP/s; an MFU against the slower one would overstate utilisation (even above 1).
    On a GPU a 1024^3 matmul takes a few microseconds, less than the launch and synchronisation around it, so there
    the matrices are 8192 wide and each timing covers 10 back-to-back calls."""
    n, per_sync = matmul_peak_size(device, n), (10 if device.type == "cuda" else 1)
    g = torch.Generator(device=device).manual_seed(0)  # never the global RNG: it drives dropout, saved in checkpoints
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    best = float("inf")
    for op in (lambda: a @ b, lambda: torch.addmm(c, a, b), lambda: torch.nn.functional.linear(a, b)):
        spent = 0.0
        for _ in range(repeats + 1):  # the first run warms up; a slow (emulated) kernel is not repeated for long
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(per_sync):
                op()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = (time.perf_counter() - t0) / per_sync
            best, spent = min(best, elapsed), spent + elapsed
            if spent > 2.0:
                break
    return 2 * n**3 / best / 1e12


def encoder_flops_per_token(layers: int, hidden: int, intermediate: int, seq_len: int) -> float:
    """Forward matmul FLOPs per token of a full encoder layer stack (projections, attention, FFN)."""
    projections = 2 * (4 * hidden * hidden + 2 * hidden * intermediate)
    attention = 2 * 2 * seq_len * hidden  # QK^T and attention x V
    return layers * (projections + attention)


class Throughput:
    """Tokens (or samples) per second between two log points."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n

    def rate(self) -> tuple[float, float]:
        """(items per second, seconds elapsed) since the last call; resets."""
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        rate = self.count / dt
        self.t0, self.count = now, 0
        return rate, dt


@torch.no_grad()
def compare_latency(models: dict[str, torch.nn.Module], inputs: dict[str, torch.Tensor], repeats: int = 10,
                    warmup: int = 2) -> dict[str, float]:
    """Median forward latency (seconds) of each model on the same inputs, measured alternately.

    Alternating (A, B, A, B, ...) rather than all-A-then-all-B keeps machine noise from landing on one side;
    the median ignores the occasional stall.
    """
    times: dict[str, list[float]] = {name: [] for name in models}
    device = next(iter(inputs.values())).device
    for i in range(warmup + repeats):
        for name, model in models.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            model(**inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
