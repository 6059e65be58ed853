"""One rank of the dead-rank tests: joins the process group, runs the watchdog, all-reduces in a loop.

    python watchdog_worker.py TIMEOUT_S [raise_at=N]      (RANK/WORLD_SIZE/MASTER_* come from the environment)

Prints "rank R iteration N" every iteration so the test knows the ranks are inside the collective loop.
"""

import sys
import time

import torch
import torch.distributed as dist

from arc_dist.engine.distributed import init_distributed
from arc_dist.engine.watchdog import RankWatchdog

timeout_s = float(sys.argv[1])
raise_at = int(sys.argv[2].removeprefix("raise_at=")) if len(sys.argv) > 2 else -1
env = init_distributed(timeout_s=600.0)  # far longer than the watchdog's: only the watchdog can end a hang
watchdog = RankWatchdog(env.rank, env.world_size, timeout_s)
for iteration in range(1_000_000):
    if env.rank == 1 and iteration == raise_at:
        raise ValueError("injected failure in the training step")
    x = torch.ones(4)
    dist.all_reduce(x)
    print(f"rank {env.rank} iteration {iteration}", flush=True)
    time.sleep(0.05)
