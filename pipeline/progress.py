"""Progress of a long loop: a tqdm bar on a terminal; elsewhere (CI logs, `ray job
logs`, a file) plain lines, at most one every `every` seconds and one at the end,
instead of a bar's carriage-return redraws."""

from __future__ import annotations

import sys
import time


class PlainLines:
    def __init__(self, total: int, desc: str, unit: str, every: float):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.done, self.started, self.last = 0, time.monotonic(), time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.done >= self.total or now - self.last >= self.every:
            self.last = now
            print(f"{self.desc}: {self.done}/{self.total} {self.unit}s, {now - self.started:.0f}s", file=sys.stderr, flush=True)

    def __enter__(self) -> "PlainLines":
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress(total: int, desc: str, unit: str, every: float = 10.0, leave: bool = False):
    """A context manager with `update(n)`."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=leave)
    return PlainLines(total, desc, unit, every)
