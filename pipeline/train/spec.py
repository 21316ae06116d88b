"""What a training run's workers are given: plain data, resolved by the driver, sent once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from pipeline.config import TrainConfig


@dataclass
class TrainSpec:
    kind: str  # a name in `pipeline.kinds.KINDS`
    model: Any  # that kind's typed model config
    # The stage's config section: its `train`, and the kind's training options
    # (augmentation, learning-rate scales), with the config's own defaults.
    section: Any
    train_data: str  # directory of the training shards' manifest
    deepspeed: dict[str, Any]
    weights_out: str  # where rank 0 writes the final safetensors
    val_data: Optional[str] = None  # directory of the validation shards' manifest
    # Saved weights the model starts from, by part (see ModelKind.starting_weights).
    start: dict[str, str] = field(default_factory=dict)
    tracking_uri: Optional[str] = None
    mlflow_run_id: Optional[str] = None
    resume_from: Optional[str] = None  # a reported checkpoint to start from (Ray's own restore wins)
    # Fault drills, for the last rank of a run that did not resume (0: never): raise
    # once at `fail_at_step`; or stop at `hang_at_step` and wait to be killed, so a
    # test can SIGKILL a real worker process mid-run.
    fail_at_step: int = 0
    hang_at_step: int = 0
    # The driver creates this file to ask for a checkpoint and a clean stop (preemption).
    stop_file: Optional[str] = None
    # Shards found bad and skipped (data.on_bad_shard: skip), by name within their directory.
    skip_shards: tuple[str, ...] = ()
    skip_val_shards: tuple[str, ...] = ()
    # The node-local copy of shards held in a bucket (data.cache_dir, data.cache_mb); None: none.
    shard_cache_dir: Optional[str] = None
    shard_cache_mb: int = 0

    @property
    def train(self) -> TrainConfig:
        return self.section.train
