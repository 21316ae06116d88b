"""A training run's view of its data: the shards, their global order, how a global
batch splits over this run's ranks, and the counter a checkpoint keeps.

Resuming recomputes every position from (samples consumed, global batch); the
data fingerprint makes sure the counter still means the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from pipeline.config import TrainConfig
from pipeline.data import shards
from pipeline.data.loader import ShardStream, make_loader
from pipeline.data.order import BatchLayout, GlobalOrder, data_fingerprint
from pipeline.data.shard_cache import ShardCache


class ResumeMismatchError(ValueError):
    """A checkpoint's data counter cannot be continued by this run."""


@dataclass
class TrainingData:
    entries: list[dict]
    order: GlobalOrder
    layout: BatchLayout
    fingerprint: str

    @classmethod
    def open(cls, directory: str, train: TrainConfig, world_size: int, skip: tuple[str, ...] = ()) -> "TrainingData":
        """The manifest's shards, less those named in `skip` (found bad before training)."""
        manifest = shards.read_manifest(directory)
        manifest = {**manifest, "shards": [s for s in manifest["shards"] if s["name"] not in skip]}
        entries = shards.shard_entries(directory, skip)
        if not entries:
            raise shards.ShardFormatError(f"{directory}: every shard is bad, nothing to train on")
        order = GlobalOrder([e["samples"] for e in entries], train.seed, train.shuffle_block, train.data_partitions)
        layout = BatchLayout(train.micro_batch_size, train.grad_accum, world_size)
        return cls(entries, order, layout, data_fingerprint(manifest, train.seed, train.shuffle_block, train.data_partitions))

    def stream(self, rank: int, first_step: int, stop_step: int, fields, transform=None, cache_mb: int = 0,
               disk_cache: Optional[ShardCache] = None) -> ShardStream:
        return ShardStream(self.entries, self.order, self.layout, rank, first_step, stop_step, fields, transform,
                           cache_bytes=cache_mb << 20, disk_cache=disk_cache)

    def loader(self, rank: int, first_step: int, stop_step: int, fields, transform, train: TrainConfig,
               disk_cache: Optional[ShardCache] = None):
        stream = self.stream(rank, first_step, stop_step, fields, transform, train.loader_cache_mb, disk_cache)
        return make_loader(stream, train.loader_workers, train.prefetch, pin_memory=train.use_gpu)

    def epoch_at(self, step: int) -> int:
        return step * self.layout.global_batch // self.order.epoch_size

    def state(self, step: int) -> dict[str, Any]:
        """What a checkpoint records about the data: a counter and what it counts over."""
        consumed = step * self.layout.global_batch
        return {
            "step": step,
            "samples_consumed": consumed,
            "epoch": consumed // self.order.epoch_size,
            "data_fingerprint": self.fingerprint,
            "global_batch": self.layout.global_batch,
            "world_size": self.layout.world_size,
        }

    def check_resume(self, state: dict[str, Any]) -> int:
        """The step to resume at, or an error naming what differs."""
        if state["data_fingerprint"] != self.fingerprint:
            raise ResumeMismatchError(
                f"resume refused: data fingerprint differs (checkpoint {state['data_fingerprint']}, this run "
                f"{self.fingerprint}): the shards, the seed, the shuffle block or the data partitions changed"
            )
        if state["global_batch"] != self.layout.global_batch:
            raise ResumeMismatchError(
                f"resume refused: global batch differs (checkpoint {state['global_batch']}, this run "
                f"{self.layout.global_batch} = micro_batch_size x grad_accum x num_workers)"
            )
        return state["samples_consumed"] // self.layout.global_batch
