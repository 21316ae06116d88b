"""Training batches from shards, deterministic in (seed, rank, step).

Each rank reads its own share of the shards into memory once and walks a
seeded permutation of it, epoch after epoch. The batch at a step depends only
on the step, so a resumed run sees exactly the batches an uninterrupted one
would. (Sized for data that fits a worker's memory; a streaming reader is the
seam for corpora that do not.)
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from pipeline.data.shards import ShardFormatError, iter_shards


def rank_shards(paths: list[str], rank: int, world: int) -> tuple[list[str], int, int]:
    """The shards this rank reads, and which slice of their samples it keeps.

    With at least one shard per rank, ranks read disjoint shards; otherwise all
    read everything and keep every world-th sample.
    """
    if len(paths) >= world:
        return paths[rank::world], 0, 1
    return paths, rank, world


class SampleTable:
    """Columns of equal length, one numpy array per field."""

    def __init__(self, columns: dict[str, np.ndarray]):
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns of unequal length: { {k: len(v) for k, v in columns.items()} }")
        self.columns = columns
        self.size = lengths.pop()

    def take(self, index: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[index] for k, v in self.columns.items()}


def load_table(paths: list[str], fields: dict[str, Callable[[Any], Any]], rank: int = 0, world: int = 1) -> SampleTable:
    """Read `fields` (extension -> converter) of the samples this rank owns."""
    mine, offset, stride = rank_shards(paths, rank, world)
    rows: dict[str, list] = {f: [] for f in fields}
    for n, sample in enumerate(iter_shards(mine)):
        if n % stride != offset:
            continue
        for field, convert in fields.items():
            if field not in sample:
                raise ShardFormatError(f"sample {sample['__key__']} has no '.{field}' field")
            rows[field].append(convert(sample[field]))
    if not rows or not next(iter(rows.values())):
        raise ShardFormatError(f"no samples for rank {rank} of {world} in {len(paths)} shards")
    columns = {}
    for field, values in rows.items():
        try:
            columns[field] = np.stack(values) if isinstance(values[0], np.ndarray) else np.asarray(values)
        except ValueError as e:
            raise ShardFormatError(f"'.{field}' arrays differ in shape across samples: {e}") from e
    return SampleTable(columns)


class BatchSchedule:
    """Batch `i` of a rank: a slice of a per-epoch permutation, seeded by (seed, rank, epoch)."""

    def __init__(self, table: SampleTable, batch_size: int, seed: int, rank: int):
        if table.size < batch_size:
            raise ValueError(f"only {table.size} samples on rank {rank}, fewer than one batch of {batch_size}")
        self.table, self.batch_size, self.seed, self.rank = table, batch_size, seed, rank
        self.batches_per_epoch = table.size // batch_size
        self._epoch, self._order = -1, np.arange(0)

    def epoch_of(self, i: int) -> int:
        return i // self.batches_per_epoch

    def batch(self, i: int) -> dict[str, np.ndarray]:
        epoch, j = divmod(i, self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, self.rank, epoch]).permutation(self.table.size)
        return self.table.take(self._order[j * self.batch_size : (j + 1) * self.batch_size])
