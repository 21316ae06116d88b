"""Streaming training batches from WebDataset shards, in the global order.

`ShardStream` serves one rank's steps, starting at any step: a resumed run
recomputes where it is from a counter, not from iterator state. Under a torch
DataLoader with K workers, every worker yields one part per step: the samples of
that step it reads (`readers.worker_of`: whole parts of the global order when
there are enough, else whole micro-batches in turn), collated and augmented.
The DataLoader collects parts round-robin, so each step's K parts arrive
together; `MicroBatches` puts the step's samples back in stream order and cuts
the micro-batches, which are therefore the same whatever K is.

A worker reads one block row of the global order at a time: it fetches, shard by
shard, the shards holding its samples in that row (one byte range from its first
to its last sample, each of its samples checked against the shard's index; a shard
without an index whole, checked against the manifest), decodes only those samples
(as whole columns where every sample has the same fixed-size members), and keeps
them until they are batched; from
remote storage a background thread fetches the next row meanwhile. Memory is
bounded by two rows' samples, never by the corpus.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import storage
from pipeline.data import readers
from pipeline.data.order import BatchLayout, GlobalOrder
from pipeline.data.shard_cache import ShardCache
from pipeline.data.shards import (ALLOWED_EXTENSIONS, ShardFormatError, decode_column, decode_field, fetch_samples,
                                  fetch_shard, iter_raw_shard, parse_columns, parse_samples, read_sample_index,
                                  refuse_extension)

# Bookkeeping of a worker's part, not passed on in micro-batches: the stream positions of its
# samples, the unpadded lengths of padded fields, and the reads made for it, (shard, bytes) each.
POSITION, LENGTHS, READ = "__position__", "__lengths__", "__read__"
_ALLOWED_KEYS = {"__key__", *ALLOWED_EXTENSIONS}

# extension -> converter of the decoded value to a numpy array or scalar. A `.npy` field's
# converter also takes the stacked arrays of many samples (`decode_columns`).
Fields = dict[str, Callable[[Any], Any]]
# (batch, epoch of each sample) -> batch: augmentation, keyed by each sample's key and epoch only
Transform = Callable[[dict[str, Any], np.ndarray], dict[str, Any]]


def collate(samples: list[dict[str, Any]], fields: Fields, keep_lengths: bool = False) -> dict[str, Any]:
    """Stack each numeric field into one tensor (dtype kept: token ids stay uint16);
    keys and text stay lists. Arrays whose first dimension differs (the patches of
    grids of different shapes) are zero-padded to the longest (with `keep_lengths`,
    their lengths are kept under `__lengths__`)."""
    batch: dict[str, Any] = {"__key__": [s["__key__"] for s in samples]}
    for field in fields:
        values = [np.asarray(s[field]) for s in samples]
        if values[0].dtype.kind not in "biuf":
            batch[field] = [s[field] for s in samples]
            continue
        longest = max(len(v) for v in values) if values[0].ndim else 0
        if any(v.ndim and len(v) != longest for v in values):
            if keep_lengths:
                batch.setdefault(LENGTHS, {})[field] = torch.tensor([len(v) for v in values])
            values = [np.concatenate([v, np.zeros((longest - len(v), *v.shape[1:]), v.dtype)]) for v in values]
        batch[field] = torch.from_numpy(np.array(values))  # np.stack, for equal shapes, 2-30x faster here
    return batch


def decode_fields(raw: dict[str, Any], fields: Fields, where: str) -> dict[str, Any]:
    """The sample's `fields`, decoded; a member outside the allow-list is refused by name
    even when training would not read it (a shard that carries a `.pickle` is not ours)."""
    for ext in raw.keys() - _ALLOWED_KEYS:
        refuse_extension(ext, f"{where}:{raw['__key__']}")
    sample = {"__key__": raw["__key__"]}
    for field, convert in fields.items():
        if field not in raw:
            raise ShardFormatError(f"{where}:{raw['__key__']} has no '.{field}' member")
        sample[field] = convert(decode_field(field, raw[field], f"{where}:{raw['__key__']}"))
    return sample


class ShardStream(IterableDataset):
    """Rank `rank`'s steps `first_step` .. `stop_step - 1`, as parts: one per step and loader worker."""

    def __init__(self, entries: list[dict], order: GlobalOrder, layout: BatchLayout, rank: int,
                 first_step: int, stop_step: int, fields: Fields, transform: Optional[Transform] = None,
                 cache_bytes: int = 0, disk_cache: Optional[ShardCache] = None):
        self.entries, self.order, self.layout, self.rank = entries, order, layout, rank
        self.disk_cache = None if storage.is_local(entries[0]["path"]) else disk_cache  # for shards in a bucket
        self.first_step, self.stop_step = first_step, stop_step
        self.fields, self.transform = fields, transform
        # A training set that fits the cache (decoded arrays may take ~2x the tar bytes:
        # float16 patches become float32) is decoded once per worker and reused every
        # epoch. A larger one is streamed block by block, never cached.
        self.cache_all = 2 * sum(e["bytes"] for e in entries) <= cache_bytes
        self._cache: dict[int, dict[int, dict[str, Any]]] = {}  # shard -> {index: sample}
        self._indexes: dict[int, dict[str, list]] = {}  # shard -> its sample index, read once

    def _mine(self, step: int, worker: int, workers: int) -> np.ndarray:
        positions = readers.step_positions(self.layout, self.rank, step)
        return positions[readers.worker_of(self.order, self.layout, self.rank, workers, positions) == worker]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rows = self._rows(worker, workers)
        ready: dict[int, dict[str, Any]] = {}  # stream position -> decoded sample
        read: list[tuple[int, int]] = []  # (shard, bytes) per read request since the last part
        loaded_to = 0  # every block row before this stream position has been read
        for step in range(self.first_step, self.stop_step):
            positions = self._mine(step, worker, workers)
            while len(positions) and positions.max() >= loaded_to:
                loaded_to, samples, reads = next(rows)
                ready.update(samples)
                read += reads
            part = {POSITION: positions, READ: read}
            if len(positions):
                batch = collate([ready.pop(int(p)) for p in positions], self.fields, keep_lengths=True)
                part.update(self.transform(batch, positions // self.order.epoch_size) if self.transform else batch)
            yield _as_numpy(part) if info else part
            read = []

    def _rows(self, worker: int, workers: int) -> Iterator[tuple[int, dict[int, dict[str, Any]], list[tuple[int, int]]]]:
        """This worker's samples block row after block row, from the first step's row on:
        (where the row ends, its samples by position, the reads). From remote storage the
        next row is fetched in a background thread while this one is decoded and used."""
        batch, end = self.layout.global_batch, self.stop_step * self.layout.global_batch

        def row_at(start: int) -> tuple[int, dict[int, dict[int, int]]]:
            """Where the row starting here ends, and what this worker reads of it."""
            stop = self.order.block_span(*self.order.block_of(start))[1]
            first_step = max(start // batch, self.first_step)
            return stop, readers.shard_reads(self.order, self._needed(first_step, worker, workers, start, stop))

        def fetched_row(start: int):
            stop, wanted = row_at(start)
            return stop, wanted, self._fetch(wanted)

        start = self.order.block_span(*self.order.block_of(self.first_step * batch))[0]
        if storage.is_local(self.entries[0]["path"]):
            # Read at CPU speed: shard by shard, fetched and decoded, so that only one shard's
            # bytes are held; a thread would only contend for the GIL (measured: the streamed
            # ViT loader ~30% slower here).
            while True:
                stop, wanted = row_at(start)
                samples, reads = {}, []
                for shard in sorted(wanted):
                    fetched, shard_reads = self._fetch({shard: wanted[shard]})
                    samples.update(self._decode({shard: wanted[shard]}, fetched))
                    reads += shard_reads
                yield stop, samples, reads
                if stop >= end:
                    return
                start = stop
        # Remote reads wait on the network: the next row is fetched while this one is used.
        with ThreadPoolExecutor(1) as background:
            row = background.submit(fetched_row, start)
            while True:
                stop, wanted, (fetched, reads) = row.result()
                if stop < end:
                    row = background.submit(fetched_row, stop)
                yield stop, self._decode(wanted, fetched), reads
                if stop >= end:
                    return

    def _needed(self, step: int, worker: int, workers: int, start: int, stop: int) -> np.ndarray:
        """This worker's positions in [start, stop), from `step` on."""
        out = [np.zeros(0, dtype=np.int64)]
        for s in range(step, self.stop_step):
            if s * self.layout.global_batch >= stop:
                break
            positions = self._mine(s, worker, workers)
            out.append(positions[(positions >= start) & (positions < stop)])
        return np.concatenate(out)

    def _fetch(self, wanted: dict[int, dict[int, int]]) -> tuple[dict[int, tuple[int, bytes]], list[tuple[int, int]]]:
        """The verified bytes holding the wanted samples (shard -> {index: position}): per shard
        not cached, (the first sample fetched, the bytes), read as `readers.shard_read` says,
        whole or as one byte range; and the read requests, (shard, bytes) each. I/O and
        hashing only, so that it can run in a background thread."""
        fetched, reads = {}, []
        for shard, indices in wanted.items():
            if shard in self._cache:
                continue
            entry, index = self.entries[shard], None
            if not self.cache_all and readers.uses_index(entry):
                if shard not in self._indexes:
                    self._indexes[shard] = read_sample_index(entry)
                    reads.append((shard, entry["index_bytes"]))
                index = self._indexes[shard]
            (first, last), nbytes = readers.shard_read(entry, indices, index)
            fetched[shard] = (first, self._read(entry, index, first, last, sorted(indices)))
            reads.append((shard, nbytes))
        return fetched, reads

    def _read(self, entry: dict, index: Optional[dict], first: int, last: int, check: list[int]) -> bytes:
        """The verified bytes of samples `first` .. `last` (the whole shard without an index),
        from the node's disk copy when there is one."""
        def read(e: dict) -> bytes:
            return fetch_shard(e) if index is None else fetch_samples(e, index, first, last, check)

        local = self.disk_cache.copy_of(entry) if self.disk_cache else None
        if local is None:
            return read(entry)
        try:
            return read({**entry, "path": local})
        except (OSError, ShardFormatError):  # evicted by another reader since, or damaged on this disk
            self.disk_cache.drop(entry)
            return read(entry)

    def _decode(self, wanted: dict[int, dict[int, int]], fetched: dict[int, tuple[int, bytes]]) -> dict[int, dict[str, Any]]:
        """The wanted samples by stream position, decoded from the fetched bytes (or the cache):
        only those samples, cut out by the shard's index where it has one (the tar members of
        the others are never parsed), else every sample of the shard."""
        out: dict[int, dict[str, Any]] = {}
        for shard, indices in sorted(wanted.items()):
            entry = self.entries[shard]
            if shard in self._cache:
                decoded = self._cache[shard]
            elif shard in self._indexes:
                first, data = fetched[shard]
                decoded = self._decode_indexed(entry, self._indexes[shard]["offsets"], first, data, sorted(indices))
            else:
                raws = parse_samples(fetched[shard][1], entry["path"], entry["samples"])
                keep = range(entry["samples"]) if self.cache_all else indices
                decoded = {i: decode_fields(raws[i], self.fields, entry["path"]) for i in keep}
                if self.cache_all:
                    self._cache[shard] = decoded
            for index, position in indices.items():
                out[position] = decoded[index]
        return out

    def _decode_indexed(self, entry: dict, offsets: list[int], first: int, data: bytes, keep: list[int]) -> dict[int, dict[str, Any]]:
        """Samples `keep` of a shard, cut out of its fetched bytes (from sample `first` on) by
        its index: as columns where every sample has the same fixed-size members, else
        sample by sample."""
        starts = np.asarray(offsets, np.int64) - offsets[first]
        at, ends = starts[keep], starts[np.asarray(keep) + 1]
        try:
            columns = decode_columns(data, at, ends, self.fields)
        except ShardFormatError as e:
            raise ShardFormatError(f"{entry['path']} is not a readable tar shard: {e}") from e
        if columns is not None:
            keys, values = columns
            return {i: {"__key__": key, **{field: column[row] for field, column in values.items()}}
                    for row, (i, key) in enumerate(zip(keep, keys))}
        view = memoryview(data)
        cut = b"".join(view[a:b] for a, b in zip(at.tolist(), ends.tolist()))
        raws = parse_samples(cut, entry["path"], len(keep), part=True)
        return {i: decode_fields(raw, self.fields, entry["path"]) for i, raw in zip(keep, raws)}


def decode_columns(data: bytes, starts: np.ndarray, ends: np.ndarray, fields: Fields) -> Optional[tuple[list[str], dict[str, Any]]]:
    """The samples at `starts` .. `ends` of `data`, their `fields` decoded as whole columns
    (`shards.parse_columns`): keys, and per field one array, a row per sample. None
    where the samples are not uniform, or a field is not a `.npy` array or a `.cls` label."""
    parsed = parse_columns(data, starts, ends)
    if parsed is None:
        return None
    keys, members = parsed
    values = {}
    for field, convert in fields.items():
        column = decode_column(field, members[field]) if field in members else None
        if column is None or field == "cls" and convert is not int:
            return None
        values[field] = column if field == "cls" else convert(column)
    return keys, values


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


# A part leaves its DataLoader worker as numpy arrays, copied by value through the pipe:
# a tensor would be moved to a shared-memory segment of its own and its file descriptor
# sent, per tensor and part, which made the streamed ViT loader ~1.4x slower (measured).
def _as_numpy(part: dict[str, Any]) -> dict[str, Any]:
    return {k: _as_numpy(v) if k == LENGTHS else v.numpy() if isinstance(v, torch.Tensor) else v for k, v in part.items()}


def _as_tensors(part: dict[str, Any]) -> dict[str, Any]:
    return {k: _as_tensors(v) if k == LENGTHS else torch.from_numpy(v) if isinstance(v, np.ndarray) and k != POSITION
            else v for k, v in part.items()}


def _exit_with_parent(worker_id: int) -> None:
    """A loader worker exits as soon as the training process is gone (SIGKILL, OOM).

    Parts cross the pipe by value, so the pipe is often full. torch's worker notices a dead
    parent and leaves its loop, but then, exiting, waits to flush its queue into that pipe,
    whose read end its siblings still hold: forever. The rank's process would never be
    seen gone, and Ray would never restart it (tests/test_faults.py's SIGKILL drill)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _joined(parts: list[dict[str, Any]], field: str) -> tuple[Any, Optional[torch.Tensor]]:
    """One field of a step's parts, joined row after row, and each row's length where the
    field was padded (None where no row needs trimming)."""
    values = [p[field] for p in parts]
    if not isinstance(values[0], torch.Tensor):
        return sum(values, []), None
    if len(values) == 1:
        return values[0], parts[0].get(LENGTHS, {}).get(field)
    if values[0].dim() < 2 or len({v.shape[1] for v in values}) == 1 and not any(field in p.get(LENGTHS, {}) for p in parts):
        return torch.cat(values), None
    longest = max(v.shape[1] for v in values)
    lengths = torch.cat([p.get(LENGTHS, {}).get(field, torch.full((len(v),), v.shape[1])) for p, v in zip(parts, values)])
    padded = [torch.nn.functional.pad(v, (0, 0) * (v.dim() - 2) + (0, longest - v.shape[1])) for v in values]
    return torch.cat(padded), lengths


def assemble(parts: list[dict[str, Any]], layout: BatchLayout, rank: int, step: int,
             pin_memory: bool = False) -> Iterator[dict[str, Any]]:
    """A step's micro-batches from its parts, in stream order: each as `collate` would make it."""
    parts = [p for p in parts if len(p[POSITION])]
    positions = np.concatenate([p[POSITION] for p in parts])
    by_position = np.argsort(positions, kind="stable")
    joined = {field: _joined(parts, field) for field in parts[0] if field not in (POSITION, LENGTHS, READ)}
    for micro in range(layout.grad_accum):
        wanted = layout.micro_positions(rank, step * layout.grad_accum + micro)
        rows = by_position[np.searchsorted(positions, wanted, sorter=by_position)]
        whole = len(rows) == len(positions) and bool((rows == np.arange(len(rows))).all())  # the part as it came
        batch: dict[str, Any] = {}
        for field, (values, lengths) in joined.items():
            if not isinstance(values, torch.Tensor):
                batch[field] = values if whole else [values[r] for r in rows]
                continue
            picked = values if whole else values[torch.from_numpy(rows)]
            if lengths is not None:
                picked = picked[:, : int(lengths[torch.from_numpy(rows)].max())].contiguous()
            batch[field] = picked.pin_memory() if pin_memory else picked
        yield batch


class MicroBatches:
    """A rank's micro-batches, in order, from a loader of a `ShardStream`'s parts. `reads[w]`
    lists worker w's read requests so far: (shard, bytes), a shard's index included."""

    def __init__(self, stream: ShardStream, loader: Any, workers: int, pin_memory: bool):
        self.stream, self.loader, self.workers, self.pin_memory = stream, loader, max(workers, 1), pin_memory
        self.reads: list[list[int]] = [[] for _ in range(self.workers)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        parts = iter(self.loader)
        s = self.stream
        for step in range(s.first_step, s.stop_step):
            step_parts = [_as_tensors(next(parts)) for _ in range(self.workers)]
            for worker, part in enumerate(step_parts):
                self.reads[worker] += part[READ]
            yield from assemble(step_parts, s.layout, s.rank, step, self.pin_memory)


def make_loader(stream: ShardStream, workers: int, prefetch: int, pin_memory: bool) -> MicroBatches:
    loader = DataLoader(
        stream,
        batch_size=None,  # the stream yields collated parts: batching in the worker is 3-6x faster
        collate_fn=_as_is,  # already tensors; torch's default_convert would walk every key string
        num_workers=workers,
        prefetch_factor=prefetch if workers else None,
        multiprocessing_context="fork" if workers else None,
        worker_init_fn=_exit_with_parent,
    )
    return MicroBatches(stream, loader, workers, pin_memory)  # pinned as assembled


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
