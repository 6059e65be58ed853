"""A dead rank must not hang the others: heartbeats through the rendezvous store, and a bounded exit naming it.

When a process is SIGKILLed, crashes, or its node drops off the network, the surviving ranks sit in their next
collective until the process-group timeout (gloo, NCCL), or fail with a transport error that names a socket, not a
rank. Under one launcher on one host the launcher kills the survivors; across Slurm nodes (one torchrun per node)
nothing does. So every rank runs a small thread that

  * bumps its own counter in the rendezvous store (the launcher's TCPStore at MASTER_ADDR:MASTER_PORT, reached
    through a separate client connection, so the thread never touches the process group) every `interval`;
  * reads the other ranks' counters and states: a rank whose counter has not moved for `timeout_s` (measured on
    this rank's own monotonic clock: no clock sync needed), or that published "failed", or a store that has been
    unreachable for `timeout_s`, is lost;
  * then prints which rank was lost (host, pid, what it said) and ends this process with EXIT_RANK_LOST. The main
    thread is blocked inside a collective that cannot be interrupted; exiting the process is the only bounded way
    out, and an unfinished checkpoint has no COMPLETE marker, so nothing half-written is ever resumed.

A rank that ends with an uncaught exception (or returns an error) publishes "failed: <error>" from an excepthook
and atexit hook, so the others stop at once instead of after the timeout; a rank that finishes normally publishes
"done" (`close()`), so a slow peer still exporting is not alarmed by it.
"""

from __future__ import annotations

import atexit
import datetime
import os
import socket
import sys
import threading
import time

import torch.distributed as dist

EXIT_RANK_LOST = 3


class RankWatchdog:
    """Started by each trainer right after the process group forms; `close()` when the job is done. Off for one
    rank or `timeout_s == 0` (train.rank_timeout_s)."""

    def __init__(self, rank: int, world_size: int, timeout_s: float):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.enabled = world_size > 1 and timeout_s > 0
        self._pid = os.getpid()
        self._closed = False
        self._failed = False
        self._stop = threading.Event()
        if not self.enabled:
            return
        self.interval = max(0.2, min(5.0, timeout_s / 10))
        # A fresh namespace per launch attempt: torchrun restarts reuse the agent's store.
        self._prefix = f"arc_watchdog/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self._store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, wait_for_workers=False,
            timeout=datetime.timedelta(seconds=max(1.0, min(timeout_s, 30.0))),
        )
        self._store.set(self._key("info", rank), f"{socket.gethostname()} pid {os.getpid()}")
        self._store.add(self._key("beat", rank), 1)
        self._previous_excepthook = sys.excepthook
        sys.excepthook = self._excepthook
        atexit.register(self._atexit)
        self._thread = threading.Thread(target=self._run, name="arc-rank-watchdog", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """The job finished on this rank: tell the others, stop the thread."""
        if self.enabled and not self._closed:
            self._publish("done")
            self._closed = True
            self._stop.set()
            sys.excepthook = self._previous_excepthook

    # ---- the thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        now = time.monotonic()
        peers = [r for r in range(self.world_size) if r != self.rank]
        last_count = dict.fromkeys(peers, -1)
        last_change = dict.fromkeys(peers, now)
        store_ok = now
        reported: set[int] = set()
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            try:
                self._store.add(self._key("beat", self.rank), 1)
                for r in list(peers):
                    state = self._get(self._key("state", r))
                    if state == "done":
                        peers.remove(r)
                        continue
                    if state is not None:
                        # Reported one heartbeat later: when every rank stops with the same error (a diverged
                        # run), this rank is on its way out too and must not report the others for it.
                        if r in reported:
                            self._abort(f"rank {r} ({self._describe(r)}) {state}")
                        reported.add(r)
                        continue
                    count = self._store.add(self._key("beat", r), 0)
                    if count != last_count[r]:
                        last_count[r], last_change[r] = count, now
                    elif now - last_change[r] > self.timeout_s:
                        self._abort(
                            f"rank {r} ({self._describe(r)}) has sent no heartbeat for {now - last_change[r]:.0f} s "
                            f"(train.rank_timeout_s={self.timeout_s:g}): it was killed or its node is unreachable"
                        )
                store_ok = now
            except Exception as e:  # the store's host (rank 0, or node 0's launcher) is gone or unreachable
                if self._stop.is_set():
                    return
                if now - store_ok > self.timeout_s:
                    self._abort(
                        f"the rendezvous store at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} has been "
                        f"unreachable for {now - store_ok:.0f} s ({type(e).__name__}): rank 0 or the first node's "
                        "launcher, which hosts it, is gone"
                    )

    def _abort(self, what: str) -> None:
        if self._stop.is_set():  # this rank is already on its way out with its own error
            return
        print(
            f"[rank {self.rank}] error: lost a peer: {what}. Exiting (code {EXIT_RANK_LOST}) instead of waiting in "
            "a collective. Completed checkpoints are intact: restart the job and it resumes from the newest "
            "complete one (checkpoint.resume=auto).", file=sys.stderr, flush=True,
        )
        os._exit(EXIT_RANK_LOST)

    # ---- this rank failing ----------------------------------------------------------------------------------

    def _excepthook(self, exc_type, exc, tb) -> None:
        self._previous_excepthook(exc_type, exc, tb)
        text = str(exc)
        if issubclass(exc_type, dist.DistError) or "gloo" in text or "NCCL" in text:
            # A transport error because a peer vanished ("Connection closed by peer"): this rank is a victim, not
            # the cause, so it publishes nothing yet and gives the thread the time it needs to name the lost peer
            # (the thread exits the process when it does).
            time.sleep(self.timeout_s + 3 * self.interval)
        self._publish(f"failed with {exc_type.__name__}: {text.splitlines()[0] if text else ''}")
        self._failed = True
        self._stop.set()

    def _atexit(self) -> None:
        if os.getpid() == self._pid and not self._closed:
            self._stop.set()  # this rank's own error was printed; do not report the peers that stop because of it
            if not self._failed:
                self._publish("exited before finishing its job (see its log)")

    def _publish(self, state: str) -> None:
        try:
            self._store.set(self._key("state", self.rank), state)
        except Exception:
            pass  # the store is gone too; the peers will time out on the heartbeat instead

    # ---- helpers ------------------------------------------------------------------------------------------

    def _key(self, kind: str, rank: int) -> str:
        return f"{self._prefix}{kind}/{rank}"

    def _get(self, key: str) -> str | None:
        return self._store.get(key).decode() if self._store.check([key]) else None

    def _describe(self, rank: int) -> str:
        try:
            return self._get(self._key("info", rank)) or "no heartbeat yet"
        except Exception:
            return "unknown host"
