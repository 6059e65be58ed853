"""Cooperative stop: on SIGUSR1 (Slurm's warning before the time limit), SIGTERM (scancel, node drain), or when
a stop file appears (what a batch script touches on a shared filesystem; it reaches every rank of every node
whatever launcher sits in between).

The handler only records the request; the training loop finishes the step in flight, agrees with the other
ranks (an all-reduce of the flag, so every rank stops at the same step), writes a checkpoint and exits.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

# Relative to the run directory: `touch <run_dir>/STOP` asks a running job to checkpoint and exit.
STOP_FILE = "STOP"


class PreemptionHandler:
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, stop_file: str | Path | None = None) -> None:
        self.stop_file = Path(stop_file) if stop_file else None
        self.signal_name: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        if self.signal_name is None and self.stop_file is not None and self.stop_file.exists():
            self.signal_name = f"stop file {self.stop_file}"
        return self.signal_name is not None

    def consume(self) -> None:
        """After the stop checkpoint: remove the stop file so that the resumed run does not stop at once."""
        if self.stop_file is not None:
            self.stop_file.unlink(missing_ok=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
