"""Where a stage's per-shard work runs: Ray tasks on the cluster (`RayFanOut`, what
the pipeline uses), or this process, one call after another (`LocalFanOut`, for
tests of what a stage writes, where Ray is not what they check).

A stage hands over plain functions and arguments; it never imports Ray itself.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from pipeline.progress import progress


class FanOut:
    def map(self, fn: Callable[..., Any], calls: list[tuple], desc: str) -> list[Any]:
        """`fn(*args)` for every args tuple (one CPU each), results in order, with a progress bar."""
        raise NotImplementedError

    def call(self, fn: Callable[..., Any], *args: Any, num_cpus: int = 1, num_gpus: int = 0) -> Any:
        """`fn(*args)` as one task with these resources."""
        raise NotImplementedError

    def cpus(self) -> int:
        """CPUs there are to ask for (a task asking for more would wait forever)."""
        raise NotImplementedError


class RayFanOut(FanOut):
    def __init__(self, connect: Callable[[], None] = lambda: None):
        self.connect = connect  # brings Ray up (or joins the cluster) before the first task

    def map(self, fn, calls, desc):
        import ray

        self.connect()
        task = ray.remote(num_cpus=1)(fn)
        pending = [task.remote(*args) for args in calls]
        order, results = list(pending), {}
        with progress(len(pending), desc, "shard") as bar:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                results[ready[0]] = ray.get(ready[0])
                bar.update(1)
        return [results[ref] for ref in order]

    def call(self, fn, *args, num_cpus=1, num_gpus=0):
        import ray

        self.connect()
        return ray.get(ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(fn).remote(*args))

    def cpus(self):
        import ray

        self.connect()
        return int(ray.cluster_resources().get("CPU", 0))


class LocalFanOut(FanOut):
    def map(self, fn, calls, desc):
        with progress(len(calls), desc, "shard") as bar:
            results = []
            for args in calls:
                results.append(fn(*args))
                bar.update(1)
        return results

    def call(self, fn, *args, num_cpus=1, num_gpus=0):
        return fn(*args)

    def cpus(self):
        return os.cpu_count() or 1
