"""Benchmark: the fused, row-chunked RelationLoss against reference_relation_loss (forward + backward).

Time is the median over repetitions that alternate project and reference in one process, so that machine noise
(other jobs, frequency scaling) hits both alike. Peak memory is the extra memory one forward+backward needs on top
of its inputs:
- CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the memory allocated before the call.
- CPU: torch has no CPU allocator statistics and tracemalloc does not see torch's allocator, so each (method, S)
  runs once in a fresh subprocess that reports how far the peak RSS (VmHWM in /proc/self/status, reset to the
  current RSS through /proc/self/clear_refs just before the call) rises above the RSS before the call, after a tiny
  warm-up has initialised the kernels and thread pools. getrusage's ru_maxrss is no good here: Linux carries the
  parent's peak over into a forked child, and it cannot be reset. The subprocess runs with a fixed glibc mmap
  threshold so that freed tensors go back to the OS instead of lingering on the heap and hiding later growth.

The last stdout line is a JSON object (also written to --out); a human-readable table precedes it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import report_path, write_report

from arc_dist.distill.relation_loss import RelationLoss, reference_relation_loss

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
METHODS = ("project", "reference")


def make_inputs(args: argparse.Namespace, seq_len: int, seed: int = 0):
    """Random teacher/student Q/K/V and a mask whose sequences lose 0-20% of their tail (about 10% padding)."""
    gen = torch.Generator().manual_seed(seed)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)

    def rand(width: int, requires_grad: bool) -> torch.Tensor:
        x = torch.randn(args.batch, seq_len, width, generator=gen).to(device=device, dtype=dtype)
        return x.requires_grad_(requires_grad)

    teacher = tuple(rand(args.teacher_width, False) for _ in range(3))
    student = tuple(rand(args.student_width, True) for _ in range(3))
    pad = torch.linspace(0.0, 0.2, args.batch) * seq_len
    lengths = (seq_len - pad.round().long()).clamp_min(1)
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long().to(device)
    return teacher, student, mask


def make_step(args: argparse.Namespace, method: str, inputs):
    """A closure running one forward+backward of `method`; student gradients are reset each call."""
    teacher, student, mask = inputs
    project = RelationLoss(args.heads, chunk_size=args.chunk_size, chunk_heads=args.chunk_heads)

    def step() -> None:
        for x in student:
            x.grad = None
        if method == "project":
            out = project(teacher, student, mask)
        else:
            out = reference_relation_loss(teacher, student, mask, args.heads)
        out.total.backward()

    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_methods(args: argparse.Namespace, seq_len: int) -> dict[str, float]:
    """Median milliseconds per forward+backward, project and reference alternating."""
    inputs = make_inputs(args, seq_len)
    steps = {m: make_step(args, m, inputs) for m in METHODS}
    for m in METHODS:  # warm-up
        steps[m]()
    samples: dict[str, list[float]] = {m: [] for m in METHODS}
    for rep in range(args.repeats):
        order = METHODS if rep % 2 == 0 else METHODS[::-1]
        for m in order:
            sync(args.device)
            t0 = time.perf_counter()
            steps[m]()
            sync(args.device)
            samples[m].append((time.perf_counter() - t0) * 1e3)
    return {m: statistics.median(v) for m, v in samples.items()}


def peak_mib_here(args: argparse.Namespace, method: str, seq_len: int) -> float:
    """Peak extra memory (MiB) of one forward+backward, measured in this process (see the module docstring)."""
    if args.device.startswith("cuda"):
        inputs = make_inputs(args, seq_len)
        step = make_step(args, method, inputs)
        step()  # warm-up: cuBLAS workspaces and kernel caches are not part of the method's memory
        sync(args.device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        sync(args.device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    make_step(args, method, make_inputs(args, 16))()  # initialise kernels and thread pools at negligible size
    inputs = make_inputs(args, seq_len)
    step = make_step(args, method, inputs)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    base = _proc_status_kib("VmRSS")
    step()
    return (_proc_status_kib("VmHWM") - base) / 1024


def _proc_status_kib(field: str) -> int:
    """A memory field of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def peak_mib(args: argparse.Namespace, method: str, seq_len: int) -> float:
    """CUDA: measured in-process. CPU: in a fresh subprocess, whose heap holds nothing from the timing runs."""
    if args.device.startswith("cuda"):
        return peak_mib_here(args, method, seq_len)
    cmd = [sys.executable, str(Path(__file__).resolve()), *args.forward_args, "--measure-memory", method, str(seq_len)]
    # A fixed mmap threshold stops glibc from keeping freed large blocks on its heap (its threshold is dynamic by
    # default), so RSS follows the live tensors instead of remembering earlier, unrelated allocations.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return float(proc.stdout.strip().splitlines()[-1])


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run (seconds)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None, help="default 128 512 1024 (quick: 64 128)")
    parser.add_argument("--batch", type=int, default=None, help="default 8 (quick: 2)")
    parser.add_argument("--heads", type=int, default=12, help="relation heads A_r")
    parser.add_argument("--teacher-width", type=int, default=768)
    parser.add_argument("--student-width", type=int, default=384)
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="RelationLoss chunk_size (default: automatic, as in training)")
    parser.add_argument("--chunk-heads", type=int, default=None,
                        help="RelationLoss chunk_heads, (batch, head) pairs per block (default: automatic)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per method (default 7, quick 3)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/relation_loss.json (quick: relation_loss_quick.json)")
    parser.add_argument("--measure-memory", nargs=2, metavar=("METHOD", "SEQ_LEN"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.seq_lens = args.seq_lens or ([64, 128] if args.quick else [128, 512, 1024])
    args.batch = args.batch or (2 if args.quick else 8)
    args.repeats = args.repeats or (3 if args.quick else 7)
    # What a memory-measuring subprocess needs to rebuild the same inputs.
    args.forward_args = [
        f"--batch={args.batch}", f"--heads={args.heads}", f"--teacher-width={args.teacher_width}",
        f"--student-width={args.student_width}", f"--device={args.device}", f"--dtype={args.dtype}",
        *([f"--chunk-size={args.chunk_size}"] if args.chunk_size else []),
        *([f"--chunk-heads={args.chunk_heads}"] if args.chunk_heads else []),
    ]  # fmt: skip
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.measure_memory:
        method, seq_len = args.measure_memory
        print(peak_mib_here(args, method, int(seq_len)))
        return
    memory_method = (
        "torch.cuda.max_memory_allocated delta after reset_peak_memory_stats"
        if args.device.startswith("cuda")
        else "peak RSS growth across one forward+backward (/proc/self/status VmHWM after a /proc/self/clear_refs "
        "reset, minus VmRSS before), fresh subprocess per (method, seq_len), MALLOC_MMAP_THRESHOLD_=65536"
    )
    print(
        f"relation loss fwd+bwd: device={args.device} dtype={args.dtype} batch={args.batch} A_r={args.heads} "
        f"teacher={args.teacher_width} student={args.student_width} chunk_size={args.chunk_size} "
        f"chunk_heads={args.chunk_heads} threads={torch.get_num_threads()} repeats={args.repeats}"
    )
    print(
        f"{'S':>6} {'project ms':>11} {'reference ms':>13} {'time ratio':>11} "
        f"{'proj MiB':>10} {'ref MiB':>10} {'mem ratio':>10}"
    )
    results = []
    for seq_len in args.seq_lens:
        times = time_methods(args, seq_len)
        mem = {m: peak_mib(args, m, seq_len) for m in METHODS}
        row = {
            "seq_len": seq_len,
            "time_ratio": times["project"] / times["reference"],
            "mem_ratio": mem["project"] / mem["reference"] if mem["reference"] > 0 else None,
            "project_ms": times["project"],
            "reference_ms": times["reference"],
            "project_peak_mib": mem["project"],
            "reference_peak_mib": mem["reference"],
        }
        results.append(row)
        print(
            f"{seq_len:>6} {row['project_ms']:>11.1f} {row['reference_ms']:>13.1f} {row['time_ratio']:>11.3f} "
            f"{row['project_peak_mib']:>10.1f} {row['reference_peak_mib']:>10.1f} {_ratio(row['mem_ratio']):>10}",
            flush=True,
        )
    report = {
        "benchmark": "relation_loss",
        "device": args.device,
        "memory_method": memory_method,
        "config": {
            "batch": args.batch, "heads": args.heads, "teacher_width": args.teacher_width,
            "student_width": args.student_width, "chunk_size": args.chunk_size, "chunk_heads": args.chunk_heads,
            "dtype": args.dtype, "repeats": args.repeats, "threads": torch.get_num_threads(),
        },
        "results": results,
    }  # fmt: skip
    write_report(report, report_path(args.out, "relation_loss", args.quick))


if __name__ == "__main__":
    main()
