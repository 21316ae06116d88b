"""Driver side of training: a Ray Train `TorchTrainer` around `train_worker`."""

from __future__ import annotations

from typing import Any

from pipeline import storage
from pipeline.train.loop import train_worker
from pipeline.train.tasks import TrainSpec


def fit(spec: TrainSpec, run_dir: str) -> dict[str, Any]:
    """Train under Ray; return the checkpoint path and the last reported metrics."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    train = spec.train
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu),
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        run_config=RunConfig(
            name="ray",
            storage_path=storage.absolute(run_dir),
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training under {run_dir} finished without reporting a checkpoint")
    kept = sorted((metrics.get("step", -1), ckpt.path) for ckpt, metrics in result.best_checkpoints or [])
    return {
        "checkpoint": result.checkpoint.path,
        "metrics": dict(result.metrics or {}),
        "checkpoints_by_step": {step: path for step, path in kept},
    }
