"""Which loader worker of a rank reads which samples, and what that costs in reads.

The loader and `pipeline batches --io` both plan from here, so the reads printed
are the reads training makes. A reader is one (rank, loader worker).

When the ranks divide the global order's parts and each rank has at least as
many parts as loader workers, each worker owns whole parts (a contiguous run of
the rank's parts) and reads only their shards. Otherwise the workers take the
rank's micro-batches in turn, and each reads every shard its rank touches.
Of each shard it needs, a reader fetches the byte range from its first to its
last needed sample and checks only those samples, each against its sha256 in the
shard's sample index; a shard written without an index is fetched whole and
checked against the manifest.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from pipeline.data.order import BatchLayout, GlobalOrder
from pipeline.data.shards import read_sample_index


def owns_whole_parts(order: GlobalOrder, world: int, workers: int) -> bool:
    return order.partitions % world == 0 and order.partitions // world >= max(workers, 1)


def step_positions(layout: BatchLayout, rank: int, step: int) -> np.ndarray:
    """A rank's stream positions in one global step, micro-batch after micro-batch."""
    return np.concatenate([layout.micro_positions(rank, step * layout.grad_accum + a) for a in range(layout.grad_accum)])


def worker_of(order: GlobalOrder, layout: BatchLayout, rank: int, workers: int, positions: np.ndarray) -> np.ndarray:
    """The loader worker (0 .. workers-1) of this rank that reads each of its positions."""
    workers = max(workers, 1)
    if owns_whole_parts(order, layout.world_size, workers):
        own = order.partitions // layout.world_size  # the rank's parts: r' + W*u, u < own
        _, part = order.part_of(positions)
        return (part // layout.world_size) * workers // own
    step, offset = np.divmod(positions, layout.global_batch)
    micro = (offset - rank) // layout.world_size // layout.micro_batch
    return (step * layout.grad_accum + micro) % workers


def shard_reads(order: GlobalOrder, positions: np.ndarray) -> dict[int, dict[int, int]]:
    """shard -> {index in shard: stream position}: what one read of these positions fetches."""
    _, shard_ids, indices = order.locate(positions)
    wanted: dict[int, dict[int, int]] = defaultdict(dict)
    for position, shard, index in zip(positions.tolist(), shard_ids.tolist(), indices.tolist()):
        wanted[shard][index] = position
    return wanted


def uses_index(entry: dict) -> bool:
    """Whether a reader reads the shard's sample index (once): wherever it has one, so that
    it fetches, checks and parses only the span and the samples it uses."""
    return bool(entry.get("index_sha256"))


def shard_read(entry: dict, indices, index: dict[str, list] | None) -> tuple[tuple[int, int], int]:
    """What a reader fetches of one shard for the wanted sample `indices`: the samples
    (first, last) and their bytes. One byte range from the first to the last wanted sample
    where the shard's sample `index` allows (each wanted sample then checked against its
    own sha256 in the index), else the whole shard (checked against the manifest)."""
    if index is None:
        return (0, entry["samples"] - 1), entry["bytes"]
    first, last = min(indices), max(indices)
    return (first, last), index["offsets"][last + 1] - index["offsets"][first]


def reader_io(order: GlobalOrder, layout: BatchLayout, entries: list[dict], rank: int, worker: int, workers: int,
              epoch: int, indexes: dict[int, dict] | None = None) -> dict[str, int]:
    """Shards opened, bytes and read requests of one reader over one epoch, as the loader
    reads: block row by block row, each needed shard whole or as one byte range per row
    (its sample index read first, once). `indexes` caches the indexes between calls."""
    indexes = {} if indexes is None else indexes
    start, stop = epoch * order.epoch_size, (epoch + 1) * order.epoch_size
    first = start + (rank - start) % layout.world_size  # the rank's first position in the epoch
    mine = np.arange(first, stop, layout.world_size, dtype=np.int64)
    mine = mine[worker_of(order, layout, rank, workers, mine) == worker]
    shards, indexed, nbytes, requests = set(), set(), 0, 0
    row = (mine - start) // (order.block * order.partitions)
    for r in np.unique(row):
        for shard, wanted in shard_reads(order, mine[row == r]).items():
            entry, index = entries[shard], None
            if uses_index(entry):
                if shard not in indexed:  # the shard's index, read once
                    indexed.add(shard)
                    nbytes, requests = nbytes + entry["index_bytes"], requests + 1
                if shard not in indexes:
                    indexes[shard] = read_sample_index(entry)
                index = indexes[shard]
            nbytes += shard_read(entry, wanted, index)[1]
            shards.add(shard)
            requests += 1
    return {"rank": rank, "worker": worker, "shards": len(shards), "bytes": nbytes, "requests": requests}
