"""Tiny torch.distributed job for the Slurm tests (run under torchrun by slurm/common.sh).

Accepts the launcher calling convention of slurm/common.sh (`[--config X] run_dir=<dir> [key=value...]`).

Always: joins the gloo group from torchrun's environment, all-reduces (rank + 1) and writes
`<run_dir>/probe/rank<R>.json` (hostname, reduced value, MASTER_ADDR, attempt).

With `probe.steps=N` it also plays a preemptible trainer that follows the launchers' contract, without any model:
resume from `<run_dir>/probe_state.json`; each "step" (`probe.step_time=` seconds) ends with an all-reduce of the
stop flag (STOP file or SIGUSR1/SIGTERM on any rank), and a stop writes the state, rank 0 deletes STOP, and the
program exits 0 with summary.json `"completed": false`; the last step writes `"completed": true`. Every step
appends "<step> <attempt>" to `<run_dir>/probe/steps.txt` (rank 0).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def main(argv: list[str]) -> int:
    kv = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
    if "run_dir" not in kv:
        print("usage: slurm_probe.py [--config X] run_dir=<dir> [probe.steps=N probe.step_time=S]", file=sys.stderr)
        return 2
    run_dir = Path(kv["run_dir"])
    steps, step_time = int(kv.get("probe.steps", 0)), float(kv.get("probe.step_time", 0.2))
    attempt = os.environ.get("SLURM_RESTART_COUNT", "0")
    stop = {"signal": None}
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.update(signal=signal.Signals(signum).name))

    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    out = run_dir / "probe"
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "rank": rank, "world_size": world, "hostname": socket.gethostname(), "sum": value.item(),
        "master_addr": os.environ.get("MASTER_ADDR"), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_nodeid": os.environ.get("SLURM_NODEID"), "restart_count": attempt,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    print(f"probe rank {rank}/{world} on {record['hostname']}: sum={record['sum']}", flush=True)

    if steps:
        state_file, stop_file = run_dir / "probe_state.json", run_dir / "STOP"
        start = json.loads(state_file.read_text())["step"] if state_file.is_file() else 0
        step = start
        completed = True
        for step in range(start + 1, steps + 1):
            time.sleep(step_time)
            flag = torch.tensor([float(stop["signal"] is not None or stop_file.exists())])
            dist.all_reduce(flag)
            if rank == 0:
                with open(out / "steps.txt", "a") as f:
                    f.write(f"{step} {attempt}\n")
            if flag.item() > 0 and step < steps:
                completed = False
                break
        dist.barrier()
        if rank == 0:
            state_file.write_text(json.dumps({"step": step}))
            if not completed:
                stop_file.unlink(missing_ok=True)
                print(f"probe: stopping at step {step} ({stop['signal'] or 'stop file'})", flush=True)
            (run_dir / "summary.json").write_text(json.dumps({"step": step, "completed": completed}))
        dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
