"""Tiny, real fixtures: a WordPiece tokenizer, randomly initialised encoders saved as Hugging Face directories,
structured synthetic text and a learnable SST-2-format task.

Shared by the test suite and the benchmarks' `--quick` mode (one recipe, so a quick benchmark exercises what the
tests do). Nothing here is a mock: the tokenizer, models and files are the real formats, only tiny.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

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
