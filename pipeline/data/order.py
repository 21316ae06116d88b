"""The global sample order: one counter decides what every rank and loader worker reads.

The training stream is the concatenation of epochs. Within epoch `e` the order
is a pure function of (seed, e, the shards' sample counts, block size):

1. the shards are shuffled (seeded by (seed, e));
2. their samples, laid end to end in that order, are cut into blocks of
   `block` samples, and each block is permuted (seeded by (seed, e, block)).

A block spans many shards, so one class-sorted shard spreads over many batches,
while a reader needs only one block at a time: memory follows the block size,
not the corpus size.

Global batch `s` is stream positions [s*G, (s+1)*G). Rank r of W takes the
strided view s*G + r + W*t, so the set of samples in a global batch does not
depend on W (for any W that divides G), and a position never depends on the
number of ranks or loader workers. A batch may straddle an epoch boundary: the
stream is continuous, so every epoch covers every sample exactly once.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass

import numpy as np

DIGEST_BITS = 40  # a float64 MLflow metric holds it exactly


class DataOrderError(ValueError):
    """The order cannot be built (no samples, a batch that does not split evenly)."""


class GlobalOrder:
    def __init__(self, shard_sizes: list[int], seed: int, block: int):
        if not shard_sizes or sum(shard_sizes) == 0:
            raise DataOrderError("the shard manifest lists no samples")
        if block < 1:
            raise DataOrderError(f"shuffle block must be >= 1, got {block}")
        self.sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.seed, self.block = seed, block
        self.epoch_size = int(self.sizes.sum())

    @functools.lru_cache(maxsize=4)
    def _shard_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Shards in this epoch's order, and where each starts in the epoch's stream."""
        shard_order = np.random.default_rng([self.seed, epoch]).permutation(len(self.sizes))
        starts = np.concatenate([[0], np.cumsum(self.sizes[shard_order])[:-1]])
        return shard_order, starts

    def _block_length(self, block: int) -> int:
        return min(self.block, self.epoch_size - block * self.block)  # an epoch's last block may be short

    @functools.lru_cache(maxsize=4)
    def _block_permutation(self, epoch: int, block: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, block]).permutation(self._block_length(block))

    def block_of(self, position: int) -> tuple[int, int]:
        """(epoch, block) holding a stream position."""
        epoch, p = divmod(position, self.epoch_size)
        return epoch, p // self.block

    def block_span(self, epoch: int, block: int) -> tuple[int, int]:
        """Stream positions [start, stop) of one block."""
        start = epoch * self.epoch_size + block * self.block
        return start, start + self._block_length(block)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(epoch, shard, index in shard) of each stream position; shard indexes the manifest's list."""
        positions = np.asarray(positions, dtype=np.int64)
        epoch, p = np.divmod(positions, self.epoch_size)
        block, j = np.divmod(p, self.block)
        shard = np.empty_like(positions)
        index = np.empty_like(positions)
        for e, b in {(int(e), int(b)) for e, b in zip(epoch, block)}:
            mask = (epoch == e) & (block == b)
            q = b * self.block + self._block_permutation(e, b)[j[mask]]
            shard_order, starts = self._shard_layout(e)
            k = np.searchsorted(starts, q, side="right") - 1
            shard[mask], index[mask] = shard_order[k], q - starts[k]
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


def data_fingerprint(manifest: dict, seed: int, block: int) -> str:
    """Names the data and its order: the shards (name, size, sha256), the seed and the block size."""
    shards = [(s["name"], s["samples"], s["sha256"]) for s in manifest["shards"]]
    payload = json.dumps({"shards": shards, "seed": seed, "block": block}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def key_hash(key: str, bits: int = 64) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> (64 - bits)


def batch_digest(keys) -> int:
    """Digest of a set of sample keys. Digests of parts add up (mod 2**DIGEST_BITS) to the
    digest of the whole, so a global batch's digest is the same however it is split over
    ranks and micro-batches, and one all-reduce combines the ranks' parts."""
    return sum(key_hash(k, DIGEST_BITS) for k in keys) % (1 << DIGEST_BITS)
