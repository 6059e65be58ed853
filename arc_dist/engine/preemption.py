"""Cooperative stop on SIGUSR1 (Slurm's warning before the time limit) and SIGTERM (scancel, node drain).

The handler only records the request; the training loop finishes the step in flight, agrees with the other
ranks (an all-reduce of the flag, so every rank stops at the same step), writes a checkpoint and exits.
"""

from __future__ import annotations

import signal
import threading


class PreemptionHandler:
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
