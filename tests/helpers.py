"""Shared test helpers: tiny tokenizers and models built from configs, synthetic text, and an N-rank launcher.

Everything here is real (real tokenizers, real HF models, real launchers); only the sizes are tiny.
"""

from __future__ import annotations

import json
import os
import random
import socket
import string
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
VENV_BIN = Path(PYTHON).parent

WORDS = (
    "the of and to in a is was for on as with by he she at from his her it an were are which this that be or has "
    "had first new city river music war game year time people world team season film song album north south "
    "east west old young great small king queen church school state house party line road park"
).split()


def make_tokenizer(out_dir: str | Path, extra_words: int = 0):
    """A real WordPiece tokenizer with a small vocabulary, saved to `out_dir` and returned."""
    from transformers import BertTokenizer

    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(chars) + ["##" + c for c in chars] + WORDS
    tokens += [f"w{i}" for i in range(extra_words)]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tok = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=512)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return tok


def make_bert(
    out_dir: str | Path | None,
    *,
    vocab_size: int,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    intermediate: int = 128,
    max_positions: int = 128,
    seed: int = 0,
    model_type: str = "bert",
):
    """A randomly initialised encoder of the given family and size, saved with save_pretrained if out_dir is given."""
    import torch
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions + (2 if model_type in ("roberta", "xlm-roberta") else 0),
        **({"embedding_size": hidden} if model_type == "electra" else {}),
    )
    model = AutoModel.from_config(cfg)
    if out_dir is not None:
        model.save_pretrained(str(out_dir))
    return model


def make_teacher_dir(root: str | Path, **model_kwargs) -> Path:
    """A local HF directory with a tiny random teacher and its tokenizer (what users point `teacher.path` at)."""
    root = Path(root)
    tok = make_tokenizer(root)
    make_bert(root, vocab_size=len(tok), **model_kwargs)
    return root


def synthetic_text(path: str | Path, n_lines: int = 400, seed: int = 0) -> Path:
    """Plain text with some structure (repeated phrases), enough to make relation distillation learnable."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        n = rng.randint(5, 30)
        start = rng.randrange(len(WORDS))
        lines.append(" ".join(WORDS[(start + i * rng.choice([1, 1, 2, 3])) % len(WORDS)] for i in range(n)) + " .")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    """Environment for child processes: CPU, one thread per rank, offline hub, cached DeepSpeed op builds."""
    # An in-process test may have joined a 1-rank process group; its rendezvous variables must not leak to children.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(
        DS_ACCELERATOR="cpu",
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
    return proc


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_sst2(glue_dir: str | Path, n_train: int = 400, n_dev: int = 60, seed: int = 0) -> Path:
    """A learnable task in SST-2's official TSV layout: label 1 iff the sentence mentions 'river'."""
    rng = random.Random(seed)
    folder = Path(glue_dir) / "SST-2"
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            words = [w for w in rng.sample(WORDS, rng.randint(4, 12)) if w != "river"] + (["river"] if i % 2 else [])
            rng.shuffle(words)
            rows.append(f"{' '.join(words)}\t{i % 2}")
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return Path(glue_dir)


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
