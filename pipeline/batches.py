"""`pipeline batches`: which samples each global step of a training stage reads.

It runs the loader's own code (`ShardStream`) with no fields to decode, so the
keys it prints are the ones training read, and the digests match the
`batch_digest` metric training logs. Steps are numbered as in the training
logs: step 1 is the first update. Under `data.on_bad_shard: skip` it checks the
shards as the training stage does and leaves out the same bad ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Any, Optional

from pipeline.config import ConfigError, RunConfig
from pipeline.data import readers, shards
from pipeline.data.loader import make_loader
from pipeline.data.order import DataOrderError, batch_digest, split_global_batch
from pipeline.train.data import TrainingData

def parse_steps(text: str) -> range:
    try:
        first, stop = (int(v) for v in text.split(":"))
    except ValueError:
        raise ConfigError(f"--steps must look like A:B (steps A to B-1), got {text!r}") from None
    if not 1 <= first < stop:
        raise ConfigError(f"--steps {text}: steps start at 1 (the first update) and A must be less than B")
    return range(first, stop)


def _training_data(config: RunConfig, stage: str, world_size: Optional[int], workdir: Optional[str]):
    """The stage's training data as a run of `world_size` ranks opens it (the data stages
    it depends on run or come from cache), and the loader workers per rank."""
    from pipeline.kinds import by_stage
    from pipeline.runner import run_pipeline

    trained = by_stage()
    if stage not in trained:
        raise ConfigError(f"--stage must be one of {', '.join(trained)}, got {stage!r}")
    kind = trained[stage]
    train = kind.section(config).train
    world = world_size or train.num_workers
    try:
        layout = split_global_batch(train.global_batch, world, train.micro_batch_size)
    except DataOrderError as e:
        raise ConfigError(f"--world-size {world}: {e}") from None

    with contextlib.redirect_stdout(sys.stderr):  # stage progress must not mix with the answer
        summary = run_pipeline(config, list(kind.deps), workdir)
    outputs = {name: s["outputs"] for name, s in summary["stages"].items()}
    train = dataclasses.replace(train, micro_batch_size=layout.micro_batch, grad_accum=layout.grad_accum)
    train_dir, _ = kind.shards(outputs)
    return TrainingData.open(train_dir, train, world, _skipped_shards(config, train_dir)), train.loader_workers


def describe(config: RunConfig, stage: str, steps: range, world_size: Optional[int], workdir: Optional[str]) -> list[dict[str, Any]]:
    data, _ = _training_data(config, stage, world_size, workdir)
    layout, world = data.layout, data.layout.world_size
    ranks = []
    for rank in range(world):
        micro_batches = iter(make_loader(data.stream(rank, steps.start - 1, steps.stop - 1, fields={}), 0, 0, False))
        ranks.append([sum((next(micro_batches)["__key__"] for _ in range(layout.grad_accum)), []) for _ in steps])
    return [
        {
            "step": step,
            "epoch": data.epoch_at(step - 1),
            "ranks": [ranks[r][i] for r in range(world)],
            "digest": batch_digest(key for r in range(world) for key in ranks[r][i]),
        }
        for i, step in enumerate(steps)
    ]


def reads(config: RunConfig, stage: str, world_size: Optional[int], workdir: Optional[str], epoch: int = 0) -> list[dict[str, int]]:
    """Per reader (rank x loader worker): shards, bytes and read requests of one epoch, as
    the loader plans them (cache off)."""
    data, workers = _training_data(config, stage, world_size, workdir)
    indexes: dict[int, dict] = {}  # each shard's sample index, read once for all readers
    return [readers.reader_io(data.order, data.layout, data.entries, rank, worker, workers, epoch, indexes)
            for rank in range(data.layout.world_size) for worker in range(max(workers, 1))]


def _skipped_shards(config: RunConfig, directory: str) -> tuple[str, ...]:
    """The shards training skips under `data.on_bad_shard: skip`: the same check, in this process."""
    if config.data.on_bad_shard != "skip":
        return ()
    bad = shards.bad_shards(directory)
    for name, why in sorted(bad.items()):
        print(f"[data] skipping bad training shard {name}: {why}", file=sys.stderr, flush=True)
    return tuple(sorted(bad))


def format_text(batches: list[dict[str, Any]]) -> str:
    lines = []
    for b in batches:
        lines.append(f"step {b['step']}  epoch {b['epoch']}  digest {b['digest']}")
        for rank, keys in enumerate(b["ranks"]):
            lines.append(f"  rank {rank}: {' '.join(keys)}")
    return "\n".join(lines)
