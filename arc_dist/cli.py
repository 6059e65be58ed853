"""`arc` command line: thin argument parsing that hands over to the library.

    arc prepare-corpus --tokenizer <teacher dir> --out <dir> <text files/dirs | hf:name[:config]> ...
    arc compress --teacher <dir> --task sst2 --text <corpus> ...   the whole pipeline (arc_dist/pipeline.py)
    arc distill | finetune-teacher | replace --config configs/x.yaml [section.key=value ...]
        single stages in one process; launchers/{distill,finetune_teacher,compress}.py run them under
        deepspeed or torchrun on several ranks (compress.py is stage 2, `arc replace`)

Errors the user can fix (`ArcError`) are printed as one line, with exit code 2, instead of a stack trace.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from arc_dist.errors import ArcError


def _job_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--resume", help="shortcut for checkpoint.resume=<auto|none|tag>")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment carries the same information.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=100 student.layers=4")
    return p


# job name -> (config class, trainer function), as "module:attribute" so `arc --help` imports no torch.
JOBS = {
    "distill": ("arc_dist.config:DistillJobConfig", "arc_dist.distill.trainer:train"),
    "finetune-teacher": ("arc_dist.config:FinetuneJobConfig", "arc_dist.replace.trainer:train_glue"),
    "replace": ("arc_dist.config:CompressJobConfig", "arc_dist.replace.trainer:train_glue"),
}


def _resolve(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def run_job(kind: str, argv: list[str]) -> int:
    """Parse a job's arguments, load and validate its config, run it. Used by `arc` and by launchers/*.py."""
    from arc_dist.config import describe, load_config

    cls = _resolve(JOBS[kind][0])
    args = _job_parser(f"arc {kind}", cls.__doc__ or "").parse_intermixed_args(argv)
    if args.help_config:
        for key, default, text in describe(cls):
            print(f"{key:40s} {default:28s} {text}")
        return 0
    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    try:
        cfg = load_config(cls, args.config, overrides)
        _resolve(JOBS[kind][1])(cfg)
    except ArcError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def prepare_corpus_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="arc prepare-corpus",
                                description="Tokenize text with the teacher's tokenizer into WebDataset shards.")
    p.add_argument("sources", nargs="+", help="text files, folders of .txt/.raw files, or hf:<dataset>[:<config>]")
    p.add_argument("--tokenizer", required=True, help="the teacher's directory (its tokenizer is used)")
    p.add_argument("--out", required=True, help="output corpus directory")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--min-shards", type=int, default=1, help="at least ranks x workers of the training job")
    p.add_argument("--hf-split", default="train")
    p.add_argument("--hf-text-field", default="text")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    from arc_dist.data.corpus import prepare_corpus
    from arc_dist.models.builders import load_tokenizer

    try:
        manifest = prepare_corpus(
            args.sources, load_tokenizer(args.tokenizer), args.out, seq_len=args.seq_len,
            samples_per_shard=args.samples_per_shard, min_shards=args.min_shards, hf_split=args.hf_split,
            hf_text_field=args.hf_text_field, overwrite=args.overwrite,
        )
    except ArcError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(manifest.shards)} shards, {manifest.num_samples} sequences, {manifest.num_tokens} tokens "
          f"to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from arc_dist import pipeline

    commands = {"prepare-corpus": prepare_corpus_main, "compress": pipeline.main,
                **{job: (lambda a, j=job: run_job(j, a)) for job in JOBS}}
    if not argv or argv[0] not in commands:
        print(f"usage: arc {{{','.join(commands)}}} ...  (arc <command> --help)", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
