"""Driver side of training: a Ray Train `TorchTrainer` around `train_worker`.

A run directory that already holds checkpoints (a stage run again after a crash,
a preemption or the loss of a node) continues from the newest one (`continue_run`).
Before workers start, a resume is checked against this run's data (fingerprint,
global batch), so a mismatch fails in seconds with a clear line.
A checkpoint written at another world size is first converted to DeepSpeed's
universal format (in a Ray task, not on the driver), which any world size loads; one
in a bucket is downloaded for the conversion, and the conversion uploaded beside the run.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from pipeline import storage
from pipeline.train import checkpoint as ckpt
from pipeline.train import preemption
from pipeline.train.data import TrainingData
from pipeline.train.loop import train_worker
from pipeline.train.spec import TrainSpec


# Ray Train's print patch sends a worker's print both to its stdout and, through the
# logging module, to its stderr: the driver showed every training line twice.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def _to_universal(source: str, target: str) -> str:
    """DeepSpeed's ds_to_universal, with every torch.load forced to weights_only=True; a
    checkpoint in a bucket is downloaded first and its conversion uploaded beside the run."""
    import argparse
    import contextlib
    import io
    import shutil
    import tempfile

    from deepspeed.checkpoint import ds_to_universal

    with storage.local_copy(source) as local_source, tempfile.TemporaryDirectory(prefix="universal-") as tmp:
        local_target = storage.absolute(target) if storage.is_local(target) else os.path.join(tmp, "universal")
        args = argparse.Namespace(input_folder=os.path.join(local_source, ckpt.TAG),
                                  output_folder=os.path.join(local_target, ckpt.TAG), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        with ckpt.weights_only_torch_load(), contextlib.redirect_stdout(io.StringIO()):  # it narrates every parameter
            ds_to_universal.main(args)
        shutil.copy(os.path.join(local_source, ckpt.DATA_STATE), os.path.join(local_target, ckpt.DATA_STATE))
        if local_target != target:
            storage.upload_tree(local_target, target)
    return target


def prepare_resume(spec: TrainSpec, run_dir: str) -> TrainSpec:
    """Refuse a checkpoint this run cannot continue; convert one from another world size."""
    import ray

    state = ckpt.read_data_state(spec.resume_from)
    TrainingData.open(spec.train_data, spec.train, spec.train.num_workers, spec.skip_shards).check_resume(state)
    if state["world_size"] == spec.train.num_workers:
        return spec
    target = storage.join(storage.absolute(run_dir), f"universal-from-world-size-{state['world_size']}-step-{state['step']}")
    ray.get(ray.remote(num_cpus=1)(_to_universal).remote(spec.resume_from, target))
    deepspeed = {**spec.deepspeed, "checkpoint": {"load_universal": True}}
    return dataclasses.replace(spec, resume_from=target, deepspeed=deepspeed)


def _trainer_class():
    """Ray Train's `TorchTrainer`, less the Ray Data helper it starts for every run.

    Ray Train 2.60 starts a `DatasetManager` actor per run whether or not the run passes Ray
    Datasets: one more process that imports Ray Data (pandas, pyarrow). The pipeline's loader
    reads its shards itself and passes none; without that actor a 2-step fit of the resume
    tests' small ViT took ~21 s instead of ~26 s here (2026-11-28). Should a Ray release move
    the (private) callback, the stock trainer is used unchanged."""
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    except ImportError:
        return TorchTrainer

    class TorchTrainerWithoutRayData(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return TorchTrainerWithoutRayData


RAY_RUN = "ray"  # Ray Train's run name inside a run directory, for a run's first world size


# Ray Train's record, per run name, of the checkpoints it registered: those every rank
# finished uploading (a rank's upload cut short leaves a folder Ray never registered).
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def newest_checkpoint(run_dir: str) -> Optional[tuple[str, dict]]:
    """The latest complete checkpoint any earlier attempt of this run reported (under
    every Ray run name in `run_dir`), with its data state; None before the first."""
    states = {}  # checkpoint directory -> its data state, for those still there
    for snapshot in storage.glob(storage.join(storage.absolute(run_dir), "*", RAY_SNAPSHOT)):
        run = snapshot[: -len(RAY_SNAPSHOT) - 1]
        for result in storage.read_json(snapshot).get("checkpoint_results", []):
            directory = storage.join(run, result["checkpoint_dir_name"])
            if storage.exists(storage.join(directory, ckpt.DATA_STATE)):
                states[directory] = ckpt.read_data_state(directory)
    if not states:
        return None
    newest = max(states, key=lambda directory: (states[directory]["step"], directory))
    return newest, states[newest]


def continue_run(spec: TrainSpec, run_dir: str) -> tuple[TrainSpec, str]:
    """The spec and Ray run name that continue whatever this run directory holds.

    Ray restores a run of the same name by itself, at the world size it was saved at.
    When the newest checkpoint was written at another world size (the cluster lost or
    gained nodes and the stage was run again with another `num_workers`, which leaves
    its fingerprint unchanged), the run continues under a new name from that
    checkpoint, converted to DeepSpeed's universal format by `prepare_resume`.
    """
    if spec.resume_from:
        return prepare_resume(spec, run_dir), RAY_RUN
    newest = newest_checkpoint(run_dir)
    if newest is None:
        return spec, RAY_RUN
    directory, state = newest
    if state["world_size"] == spec.train.num_workers:
        return spec, storage.relative(storage.absolute(run_dir), directory).split("/")[0]
    print(f"continuing from step {state['step']} ({directory}), saved at world size {state['world_size']}, "
          f"on {spec.train.num_workers} workers", flush=True)
    name = f"{RAY_RUN}-{spec.train.num_workers}-workers-from-step-{state['step']}"
    return prepare_resume(dataclasses.replace(spec, resume_from=directory), run_dir), name


def fit(spec: TrainSpec, run_dir: str) -> dict[str, Any]:
    """Train under Ray, continuing from what `run_dir` holds (`continue_run`); return the
    checkpoint path and the last reported metrics."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    spec, ray_run = continue_run(spec, run_dir)
    train = spec.train
    run_dir = storage.absolute(run_dir)
    spec = dataclasses.replace(spec, stop_file=storage.join(run_dir, preemption.STOP_FILE))
    filesystem, storage_path = storage.arrow_filesystem(run_dir)
    trainer = _trainer_class()(
        train_worker,
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu),
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        run_config=RunConfig(
            name=ray_run,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": WORKER_ENV},
        ),
    )
    with preemption.stop_on_sigterm(spec.stop_file):
        result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.metrics and result.metrics.get("stopped"):
        raise preemption.Preempted(int(result.metrics["step"]), run_dir)
    if result.checkpoint is None:
        raise RuntimeError(f"training under {run_dir} finished without reporting a checkpoint")

    def url(checkpoint) -> str:  # Ray names it inside `filesystem`; the pipeline by URL
        return storage.join(run_dir, storage.relative(storage_path, checkpoint.path))

    kept = sorted((metrics.get("step", -1), url(c)) for c, metrics in result.best_checkpoints or [])
    return {
        "checkpoint": url(result.checkpoint),
        "metrics": dict(result.metrics or {}),
        "checkpoints_by_step": {step: path for step, path in kept},
    }
