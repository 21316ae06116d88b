"""The global sample order: one counter decides what every rank and loader worker reads.

The training stream is the concatenation of epochs. Within epoch `e` the order
is a pure function of (seed, e, the shards' sample counts, partitions, block size):

1. the shards are shuffled (seeded by (seed, e)) and their samples laid end to
   end in that order;
2. that sequence is cut into `partitions` contiguous parts of equal size (+-1),
   and epoch position q belongs to part q mod P (the parts take turns);
3. each part's samples are permuted in blocks of `block` (seeded by the part and
   the block), so one class-sorted shard spreads over many batches.

Global batch `s` is stream positions [s*G, (s+1)*G). Rank r of W takes the
strided view s*G + r + W*t, so the set of samples in a global batch does not
depend on W (for any W that divides G), and a position never depends on the
number of ranks or loader workers. A batch may straddle an epoch boundary: the
stream is continuous, so every epoch covers every sample exactly once.

Why parts: when W divides P, rank r's positions fall in the parts p = r - eE
(mod W) only, so a rank (and, given whole parts, each of its loader workers)
reads only its own stretch of the shards: bytes read per reader stay near
corpus / readers. P is fixed by the config, never by the world size, so the
batches stay the same when a resumed run has fewer ranks (MosaicML Streaming's
"canonical nodes"). P = 1 is one part: every reader reads every shard.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

DIGEST_BITS = 40  # a float64 MLflow metric holds it exactly


class DataOrderError(ValueError):
    """The order cannot be built (no samples, a batch that does not split evenly)."""


class GlobalOrder:
    def __init__(self, shard_sizes: list[int], seed: int, block: int, partitions: int = 1):
        if not shard_sizes or sum(shard_sizes) == 0:
            raise DataOrderError("the shard manifest lists no samples")
        if block < 1:
            raise DataOrderError(f"shuffle block must be >= 1, got {block}")
        if partitions < 1:
            raise DataOrderError(f"partitions must be >= 1, got {partitions}")
        self.sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.seed, self.block, self.partitions = seed, block, partitions
        self.epoch_size = int(self.sizes.sum())
        base, extra = divmod(self.epoch_size, partitions)
        # Part p holds the epoch's sequence [part_starts[p], part_starts[p + 1]): the first
        # `extra` parts one sample more, so that position q of the epoch is part q mod P.
        self.part_sizes = base + (np.arange(partitions) < extra)
        self.part_starts = np.concatenate([[0], np.cumsum(self.part_sizes)])

    @functools.lru_cache(maxsize=4)
    def _shard_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Shards in this epoch's order, and where each starts in the epoch's sequence."""
        shard_order = np.random.default_rng([self.seed, epoch]).permutation(len(self.sizes))
        starts = np.concatenate([[0], np.cumsum(self.sizes[shard_order])[:-1]])
        return shard_order, starts

    @functools.lru_cache(maxsize=256)
    def _block_permutation(self, epoch: int, part: int, block: int) -> np.ndarray:
        length = min(self.block, int(self.part_sizes[part]) - block * self.block)  # a part's last block may be short
        # One part keeps the seeds of the order before parts existed: its stages stay cached.
        key = [self.seed, epoch, block] if self.partitions == 1 else [self.seed, epoch, part, block]
        return np.random.default_rng(key).permutation(length)

    def _rows(self) -> int:
        """Epoch positions per block row: every part's block b lies in one stretch of them."""
        return self.block * self.partitions

    def block_of(self, position: int) -> tuple[int, int]:
        """(epoch, block row) holding a stream position."""
        epoch, q = divmod(position, self.epoch_size)
        return epoch, q // self._rows()

    def block_span(self, epoch: int, block: int) -> tuple[int, int]:
        """Stream positions [start, stop) of one block row (block `block` of every part)."""
        start = epoch * self.epoch_size + block * self._rows()
        return start, min(start + self._rows(), (epoch + 1) * self.epoch_size)

    def part_of(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(epoch, part) of each stream position."""
        epoch, q = np.divmod(np.asarray(positions, dtype=np.int64), self.epoch_size)
        return epoch, q % self.partitions

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(epoch, shard, index in shard) of each stream position; shard indexes the manifest's list."""
        positions = np.asarray(positions, dtype=np.int64)
        epoch, q = np.divmod(positions, self.epoch_size)
        part, i = q % self.partitions, q // self.partitions  # the i-th sample of its part
        block, j = np.divmod(i, self.block)
        shard = np.empty_like(positions)
        index = np.empty_like(positions)
        groups = np.stack([epoch, part, block], axis=1)
        keys, inverse = np.unique(groups, axis=0, return_inverse=True)
        for g, (e, p, b) in enumerate(keys.tolist()):
            mask = inverse.reshape(-1) == g
            sequence = self.part_starts[p] + b * self.block + self._block_permutation(e, p, b)[j[mask]]
            shard_order, starts = self._shard_layout(e)
            k = np.searchsorted(starts, sequence, side="right") - 1
            shard[mask], index[mask] = shard_order[k], sequence - starts[k]
        return epoch, shard, index


@dataclass(frozen=True)
class BatchLayout:
    """How a global batch splits into ranks and micro-batches."""

    micro_batch: int
    grad_accum: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def micro_positions(self, rank: int, micro_index: int) -> np.ndarray:
        """Stream positions of a rank's `micro_index`-th micro-batch (step * grad_accum + micro)."""
        step, micro = divmod(micro_index, self.grad_accum)
        t = np.arange(micro * self.micro_batch, (micro + 1) * self.micro_batch)
        return step * self.global_batch + rank + self.world_size * t


def split_global_batch(global_batch: int, world_size: int, micro_batch: int) -> BatchLayout:
    """The layout that gives `world_size` ranks the same global batch: grad accumulation
    over micro batches of `micro_batch`, or one smaller micro batch when a rank's share is less."""
    if global_batch % world_size:
        raise DataOrderError(f"global batch {global_batch} does not split into {world_size} ranks")
    share = global_batch // world_size
    if share % micro_batch and share > micro_batch:
        raise DataOrderError(f"a rank's {share} samples of the global batch {global_batch} are not whole micro batches of {micro_batch}")
    micro = min(micro_batch, share)
    return BatchLayout(micro, share // micro, world_size)


def data_fingerprint(manifest: dict, seed: int, block: int, partitions: int = 1) -> str:
    """Names the data and its order: the shards (name, size, sha256), the seed, the block size
    and the parts (named only when more than one, so one-part fingerprints are as they were)."""
    shards = [(s["name"], s["samples"], s["sha256"]) for s in manifest["shards"]]
    order = {"seed": seed, "block": block, **({"partitions": partitions} if partitions != 1 else {})}
    payload = json.dumps({"shards": shards, **order}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def key_hash(key: str, bits: int = 64) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> (64 - bits)


def key_hashes(keys: Iterable[str]) -> np.ndarray:
    """`key_hash` (64 bits) of many keys, as one uint64 array."""
    return np.frombuffer(b"".join(hashlib.blake2b(key.encode(), digest_size=8).digest() for key in keys), "<u8")


def batch_digest(keys) -> int:
    """Digest of a set of sample keys. Digests of parts add up (mod 2**DIGEST_BITS) to the
    digest of the whole, so a global batch's digest is the same however it is split over
    ranks and micro-batches, and one all-reduce combines the ranks' parts."""
    return sum(key_hash(k, DIGEST_BITS) for k in keys) % (1 << DIGEST_BITS)
