"""Run under torchrun: every rank streams a fixed number of batches and writes the sequences it saw to JSON.

Usage: stream_ranks.py CORPUS_DIR OUT_DIR --batches N --batch-size B --workers W --seed S
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from arc_dist.data.stream import build_stream_loader


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("corpus_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--batches", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    loader = build_stream_loader(
        args.corpus_dir, args.batch_size, rank, world_size, args.seed, num_workers=args.workers
    )
    batches = []
    for _, batch in zip(range(args.batches), loader):
        rows = zip(batch["input_ids"], batch["attention_mask"])
        batches.append([ids[mask.bool()].tolist() for ids, mask in rows])
    # Every rank must reach this collective with its batches taken; a rank starved of data would hang here.
    total = torch.tensor([len(batches)])
    dist.all_reduce(total)
    out = Path(args.out_dir) / f"rank{rank}.json"
    result = {"rank": rank, "world_size": world_size, "total_batches": int(total), "batches": batches}
    out.write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
