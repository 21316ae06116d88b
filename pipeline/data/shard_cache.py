"""A node-local disk copy of remote training shards (`data.cache_dir`).

Every reader of a node that needs a shard held in a bucket reads it from one local
copy: the first to ask downloads the whole shard (checked against the manifest's
size and sha256) while the others wait on a per-shard lock, and later epochs and
resumed runs read the disk, not the bucket. Copies are named by their sha256, so a
changed shard is a different file and never served stale, and a directory may be
shared by runs of any stage. A copy is written to a temporary name and renamed
(`storage.write_atomic`), so no reader sees half of one.

Bounded: after each download the least recently used copies are removed until the
directory holds at most `max_bytes` (a reader that already opened a removed copy
keeps reading it; one that had not reads the bucket again). Verified on use: what is
read from a copy goes through the same checks as a read from the bucket (the whole
shard's sha256, or each used sample's against the shard's index), and a copy that
fails them is removed and the shard read from the bucket.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Iterator, Optional

from pipeline import storage
from pipeline.data import shards

SUFFIX = ".tar"


class ShardCache:
    def __init__(self, directory: str, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes

    def copy_of(self, entry: dict) -> Optional[str]:
        """The path of a verified local copy of the shard, downloaded if no reader of this
        node has; None for a shard larger than the whole cache (read from the bucket)."""
        if entry["bytes"] > self.max_bytes:
            return None
        path = self._path(entry)
        if not os.path.exists(path):
            os.makedirs(self.directory, exist_ok=True)
            with _exclusive(f"{path}.lock"):
                if not os.path.exists(path):
                    storage.write_bytes_atomic(path, shards.fetch_shard(entry))  # checked: size and sha256
                    self._evict(keep=path)
                    return path
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile by another reader's eviction
            os.utime(path)  # recently used: evicted last
        return path

    def drop(self, entry: dict) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._path(entry))

    def held_bytes(self) -> int:
        return sum(size for _, size, _ in self._copies())

    def _path(self, entry: dict) -> str:
        return os.path.join(self.directory, entry["sha256"] + SUFFIX)

    def _copies(self) -> list[tuple[float, int, str]]:
        """(last used, bytes, path) of every complete copy."""
        found = []
        for name in os.listdir(self.directory):
            if name.endswith(SUFFIX):
                path = os.path.join(self.directory, name)
                with contextlib.suppress(FileNotFoundError):
                    stat = os.stat(path)
                    found.append((stat.st_mtime, stat.st_size, path))
        return found

    def _evict(self, keep: str) -> None:
        copies = sorted(self._copies())
        held = sum(size for _, size, _ in copies)
        for _, size, path in copies:
            if held <= self.max_bytes:
                return
            if path != keep:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                held -= size


@contextlib.contextmanager
def _exclusive(lock_path: str) -> Iterator[None]:
    """Held by one process of the node at a time (readers are processes: flock, not a thread lock)."""
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
