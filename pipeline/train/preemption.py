"""Preemption: SIGTERM to the driver becomes a checkpoint and a clean stop.

Schedulers (Kubernetes, Slurm, spot reclaims) send SIGTERM and wait a grace period
before SIGKILL. While a training stage runs, the driver answers SIGTERM by creating
the run's stop file; the workers look for it every `log_every` steps
(`loop.StopWatcher`), save a checkpoint of that step through Ray Train and end.
The stage then fails with `Preempted`, keeping its directory: the same command run
again resumes from that checkpoint (Ray Train restores a run of the same storage
path and name).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from pipeline import storage

STOP_FILE = "STOP"
EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended


class Preempted(RuntimeError):
    """A training stage stopped at a checkpoint because the driver was asked to stop."""

    def __init__(self, step: int, run_dir: str):
        super().__init__(f"preempted: a checkpoint of step {step} is saved under {run_dir}; "
                         "run the same command again to resume from it")
        self.step = step


@contextlib.contextmanager
def stop_on_sigterm(stop_file: str) -> Iterator[None]:
    """While training, SIGTERM creates `stop_file` (a second SIGTERM exits at once).
    Only the main thread can take signals: elsewhere (a sweep's Ray task) this does nothing."""
    storage.remove_tree(stop_file)  # a stop asked of an earlier attempt is not a stop of this one
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame):
        if storage.exists(stop_file):
            raise SystemExit(EXIT_CODE)
        print("SIGTERM: asking the workers to checkpoint and stop (send it again to exit now)", flush=True)
        storage.write_bytes_atomic(stop_file, b"stop\n")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        storage.remove_tree(stop_file)
