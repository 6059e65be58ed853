"""Shared test helpers: tiny tokenizers and models built from configs, synthetic text, and an N-rank launcher.

Everything here is real (real tokenizers, real HF models, real launchers); only the sizes are tiny.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
VENV_BIN = Path(PYTHON).parent

from arc_dist.engine.distributed import deepspeed_shm_buffer, free_port  # noqa: E402,F401  (free_port re-exported)
from arc_dist.testing import (  # noqa: E402  (re-exported for the tests)
    WORDS,
    make_bert,
    make_teacher_dir,
    make_tokenizer,
    synthetic_text,
    write_sst2,
)

def child_env(**extra: str) -> dict:
    """Environment for child processes: CPU, one thread per rank, offline hub, cached DeepSpeed op builds."""
    # An in-process test may have joined a 1-rank process group; its rendezvous variables must not leak to children.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(
        DS_ACCELERATOR="cpu",
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        PATH=str(VENV_BIN) + os.pathsep + env.get("PATH", ""),
    )
    env.update(extra)
    return env


def launch(
    script: str | Path,
    args: list[str],
    *,
    nprocs: int = 2,
    launcher: str = "deepspeed",
    timeout: float = 600,
    env: dict | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run `script` on `nprocs` local ranks through the real `deepspeed` or `torchrun` launcher on a free port."""
    port = str(free_port())
    if launcher == "deepspeed":
        cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(nprocs), "--master_port", port, str(script), *args]
    elif launcher == "torchrun":
        cmd = [
            str(VENV_BIN / "torchrun"), "--nproc_per_node", str(nprocs), "--master_port", port, str(script), *args,
        ]
    elif launcher == "python":
        cmd = [PYTHON, str(script), *args]
    else:
        raise ValueError(launcher)
    proc = subprocess.run(
        cmd, cwd=REPO, env=env or child_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n"
            f"--- stderr ---\n{proc.stderr[-6000:]}"
        )
    # DeepSpeed's CPU shared-memory buffers (69 MB per rank) must not outlive a job (engine.distributed). Checked
    # after a clean exit only: a rank killed inside init (a fault test) can still leave its buffer.
    pattern = deepspeed_shm_buffer("*", addr="*", port=port)
    leaked = sorted(pattern.parent.glob(pattern.name))
    assert proc.returncode != 0 or not leaked, f"{' '.join(cmd)} left shared memory behind: {[p.name for p in leaked]}"
    return proc


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def scalars(run_dir: str | Path) -> dict[int, dict]:
    """A run's logged scalars by step (<run_dir>/tensorboard/scalars.jsonl, written next to the event files)."""
    out: dict[int, dict] = {}
    for row in read_jsonl(Path(run_dir) / "tensorboard" / "scalars.jsonl"):
        out.setdefault(row["step"], {}).update(row)
    return out


def tiny_stage1(root: Path, steps: int) -> dict:
    """A tiny 4-layer teacher, a 4-shard corpus (2 ranks x 2 workers) and a stage-1 config dict for them."""
    from transformers import AutoTokenizer

    from arc_dist.data.corpus import prepare_corpus

    teacher = make_teacher_dir(root / "teacher", layers=4, hidden=64, heads=4, intermediate=128, max_positions=64)
    text = synthetic_text(root / "corpus.txt", n_lines=1500)
    prepare_corpus([str(text)], AutoTokenizer.from_pretrained(teacher), root / "corpus", seq_len=32,
                   samples_per_shard=200, min_shards=4)
    return {
        "teacher": {"path": str(teacher), "layer": -1},
        "student": {"layers": 2, "hidden": 32, "heads": 4, "intermediate": 64},
        "loss": {"relation_heads": 4, "chunk_size": 16},
        "data": {"path": str(root / "corpus"), "seq_len": 32, "num_workers": 2},
        "optim": {"lr": 2e-3, "warmup_steps": 3},
        "train": {"steps": steps, "micro_batch_size": 8, "seed": 7, "precision": "fp32"},
        "checkpoint": {"every_steps": 10, "keep_last": 2},
        "metrics": {"log_every": 1, "progress_bar": False},
    }


def tiny_stage2(root: Path, finetune_steps: int, compress_steps: int, replacing_steps: int,
                eval_every: int) -> tuple[dict, dict]:
    """SST-2-format data, a pre-trained 4x128 teacher-to-be and a 2x64 student; (finetune, compress) configs."""
    write_sst2(root / "glue")
    tok = make_tokenizer(root / "pretrained")
    make_bert(root / "pretrained", vocab_size=len(tok), layers=4, hidden=128, heads=4, intermediate=256,
              max_positions=64, seed=1)
    tok.save_pretrained(root / "student_init")
    make_bert(root / "student_init", vocab_size=len(tok), layers=2, hidden=64, heads=4, intermediate=128,
              max_positions=64, seed=2)
    common = {
        "data": {"task": "sst2", "glue_dir": str(root / "glue"), "max_seq_len": 32, "eval_every_steps": eval_every,
                 "eval_batch_size": 16},
        "metrics": {"log_every": 1, "progress_bar": False},
    }
    finetune = {**common, "model": str(root / "pretrained"), "optim": {"lr": 1e-3},
                "train": {"steps": finetune_steps, "micro_batch_size": 16, "precision": "fp32"},
                "checkpoint": {"every_steps": 0}}
    compress = {**common, "student": {"path": str(root / "student_init")},
                "schedule": {"kind": "linear", "base": 0.3, "replacing_steps": replacing_steps},
                "optim": {"lr": 1e-3},
                "train": {"steps": compress_steps, "micro_batch_size": 8, "seed": 3, "precision": "fp32"},
                "checkpoint": {"every_steps": 10, "keep_last": 2}}
    return finetune, compress
