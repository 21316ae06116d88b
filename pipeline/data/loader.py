"""Streaming training batches from WebDataset shards, in the global order.

`ShardStream` yields one rank's micro-batches, already collated, starting at
any micro-batch index: a resumed run recomputes where it is from a counter, not
from iterator state. Under a torch DataLoader with K workers, worker w builds
micro-batches w, w+K, w+2K, ...; the DataLoader collects them round-robin, so
they come out in order whatever K is.

A worker reads one block of the global order at a time: it streams the
block's shards through (hashing every byte against the manifest), decodes only
the samples its micro-batches need, and keeps them until they are batched.
Memory is bounded by the block size, never by the corpus.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.order import BatchLayout, GlobalOrder
from pipeline.data.shards import ShardFormatError, decode_field, iter_raw_shard, refuse_extension

# extension -> converter of the decoded value to a numpy array or scalar
Fields = dict[str, Callable[[Any], Any]]
# (batch, epoch of each sample) -> batch: augmentation, keyed by each sample's key and epoch only
Transform = Callable[[dict[str, Any], np.ndarray], dict[str, Any]]


def collate(samples: list[dict[str, Any]], fields: Fields) -> dict[str, Any]:
    """Stack each numeric field into one tensor (dtype kept: token ids stay uint16);
    keys and text stay lists. Arrays whose first dimension differs (the patches of
    grids of different shapes) are zero-padded to the longest."""
    batch: dict[str, Any] = {"__key__": [s["__key__"] for s in samples]}
    for field in fields:
        values = [np.asarray(s[field]) for s in samples]
        if values[0].dtype.kind not in "biuf":
            batch[field] = [s[field] for s in samples]
            continue
        longest = max(len(v) for v in values) if values[0].ndim else 0
        if any(v.ndim and len(v) != longest for v in values):
            values = [np.concatenate([v, np.zeros((longest - len(v), *v.shape[1:]), v.dtype)]) for v in values]
        batch[field] = torch.from_numpy(np.stack(values))
    return batch


def decode_fields(raw: dict[str, Any], fields: Fields, where: str) -> dict[str, Any]:
    """The sample's `fields`, decoded; a member outside the allow-list is refused by name
    even when training would not read it (a shard that carries a `.pickle` is not ours)."""
    for ext in raw:
        if ext != "__key__":
            refuse_extension(ext, f"{where}:{raw['__key__']}")
    sample = {"__key__": raw["__key__"]}
    for field, convert in fields.items():
        if field not in raw:
            raise ShardFormatError(f"{where}:{raw['__key__']} has no '.{field}' member")
        sample[field] = convert(decode_field(field, raw[field], f"{where}:{raw['__key__']}"))
    return sample


class ShardStream(IterableDataset):
    """Rank `rank`'s micro-batches `first_micro` .. `stop_micro - 1` (index = step * grad_accum + micro)."""

    def __init__(self, entries: list[dict], order: GlobalOrder, layout: BatchLayout, rank: int,
                 first_micro: int, stop_micro: int, fields: Fields, transform: Optional[Transform] = None,
                 cache_bytes: int = 0):
        self.entries, self.order, self.layout, self.rank = entries, order, layout, rank
        self.first_micro, self.stop_micro = first_micro, stop_micro
        self.fields, self.transform = fields, transform
        # A training set that fits the cache (decoded arrays may take ~2x the tar bytes:
        # float16 patches become float32) is decoded once per worker and reused every
        # epoch. A larger one is streamed block by block, never cached.
        self.cache_all = 2 * sum(e["bytes"] for e in entries) <= cache_bytes
        self._cache: dict[int, dict[int, dict[str, Any]]] = {}  # shard -> {index: sample}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = range(self.first_micro + worker, self.stop_micro, workers)
        ready: dict[int, dict[str, Any]] = {}  # stream position -> decoded sample
        loaded_to = None  # every block before this stream position has been read
        for n, micro in enumerate(mine):
            positions = self.layout.micro_positions(self.rank, micro)
            if loaded_to is None:
                loaded_to = self.order.block_span(*self.order.block_of(int(positions[0])))[0]
            while positions.max() >= loaded_to:
                start, stop = self.order.block_span(*self.order.block_of(loaded_to))
                ready.update(self._read(self._needed(mine[n:], start, stop)))
                loaded_to = stop
            batch = collate([ready.pop(int(p)) for p in positions], self.fields)
            yield self.transform(batch, positions // self.order.epoch_size) if self.transform else batch

    def _needed(self, micros: range, start: int, stop: int) -> np.ndarray:
        """The positions in [start, stop) that these micro-batches (in increasing order) read."""
        out = [np.zeros(0, dtype=np.int64)]
        for micro in micros:
            positions = self.layout.micro_positions(self.rank, micro)
            if positions[0] >= stop:
                break
            out.append(positions[(positions >= start) & (positions < stop)])
        return np.concatenate(out)

    def _read(self, positions: np.ndarray) -> dict[int, dict[str, Any]]:
        """Decode the samples at these stream positions, shard by shard."""
        _, shard_ids, indices = self.order.locate(positions)
        wanted: dict[int, dict[int, int]] = defaultdict(dict)  # shard -> {index in shard: position}
        for position, shard, index in zip(positions, shard_ids, indices):
            wanted[int(shard)][int(index)] = int(position)
        out: dict[int, dict[str, Any]] = {}
        for shard in sorted(wanted):
            samples = self._decoded(shard, None if self.cache_all else set(wanted[shard]))
            for index, position in wanted[shard].items():
                out[position] = samples[index]
        return out

    def _decoded(self, shard: int, only: Optional[set[int]]) -> dict[int, dict[str, Any]]:
        """Samples of one shard by index (all of them, or those in `only`), read whole and
        verified before any is returned."""
        if shard in self._cache:
            return self._cache[shard]
        entry = self.entries[shard]
        decoded, count = {}, 0
        for count, raw in enumerate(iter_raw_shard(entry["path"], entry), start=1):
            if only is None or count - 1 in only:
                decoded[count - 1] = decode_fields(raw, self.fields, entry["path"])
        if count != entry["samples"]:
            raise ShardFormatError(f"{entry['path']} holds {count} samples, its manifest entry says {entry['samples']}")
        if self.cache_all:
            self._cache[shard] = decoded
        return decoded


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def make_loader(stream: ShardStream, workers: int, prefetch: int, pin_memory: bool) -> DataLoader:
    return DataLoader(
        stream,
        batch_size=None,  # the stream yields collated micro-batches: batching in the worker is 3-6x faster
        collate_fn=_as_is,  # already tensors; torch's default_convert would walk every key string
        num_workers=workers,
        prefetch_factor=prefetch if workers else None,
        pin_memory=pin_memory,
        multiprocessing_context="fork" if workers else None,
    )


def head_batches(entries: list[dict], fields: Fields, limit: int, rank: int, world: int, batch_size: int) -> list[dict[str, Any]]:
    """Rank `rank`'s strided share of the first `limit` samples (rounded down to a multiple of
    `world`, so every rank runs the same number of forward passes), in batches: for validation."""
    samples: list[dict[str, Any]] = []
    for entry in entries:
        if len(samples) >= limit:
            break
        for raw in iter_raw_shard(entry["path"], entry):  # read to its end, so its checksum is checked
            if len(samples) < limit:
                samples.append(raw)
    usable = (len(samples) // world) * world
    if usable == 0:
        raise ShardFormatError(f"validation data holds {len(samples)} samples, fewer than {world} ranks")
    mine = [decode_fields(raw, fields, "validation") for raw in samples[rank:usable:world]]
    return [collate(mine[i : i + batch_size], fields) for i in range(0, len(mine), batch_size)]
