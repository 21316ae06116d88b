"""The training function every Ray Train worker runs: one code path for one CPU
process on a laptop and N GPUs on M nodes.

The loop body only steps the engine on the loader's micro-batches. Everything
else (metrics and MLflow, validation, checkpoint cadence, stop requests, the fault
drills) is a callback that looks at the run after each step. A restarted run resumes from
`ray.train.get_checkpoint()` (or `spec.resume_from`): engine state from
DeepSpeed, data position recomputed from the checkpoint's sample counter.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from pipeline import storage
from pipeline.data.loader import head_batches
from pipeline.data.order import DIGEST_BITS, batch_digest
from pipeline.data.shard_cache import ShardCache
from pipeline.data.shards import iter_shard, shard_entries
from pipeline.keys import Metric
from pipeline.kinds import IGNORE, KINDS, ModelKind
from pipeline.train import checkpoint as ckpt
from pipeline.train.data import TrainingData
from pipeline.train.engine import build_model, deepspeed_config, initialize
from pipeline.train.spec import TrainSpec


def _sum_across_ranks(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@dataclass
class Run:
    """What the callbacks may look at."""

    spec: TrainSpec
    kind: ModelKind
    engine: Any
    scheduler: Any
    data: TrainingData
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    sample_flops: float
    started_at: int  # the step this attempt began at: 0 for a fresh run, a checkpoint's step for a resumed one
    tracker: Any = None  # rank 0's MlflowTracker, when the stage has a run it can reach (logs in the background)
    metrics: dict[str, float] = field(default_factory=dict)  # latest logged values, reported with checkpoints
    stop_requested: bool = False  # set by StopWatcher: checkpoint now, then end the loop

    def progress(self, step: int) -> dict[str, float]:
        """The x axes every logged value shares: data seen and compute spent."""
        samples = step * self.data.layout.global_batch
        return {self.kind.unit: samples * self.kind.units_per_sample(self.spec.model), Metric.FLOPS: samples * self.sample_flops}


class InjectedFault(RuntimeError):
    """Raised by the `fail_at_step` drill."""


class FaultDrill:
    """In a run that did not resume, the last rank raises once at `fail_at_step`, or
    stops at `hang_at_step` until something kills it."""

    def after_step(self, run: Run, step: int, loss: torch.Tensor, digest: int) -> None:
        if run.started_at or run.rank != run.world - 1:
            return
        if step == run.spec.fail_at_step:
            raise InjectedFault(f"fault drill: rank {run.rank} fails at step {step}")
        if step == run.spec.hang_at_step:
            print(f"[fault drill] rank {run.rank} (pid {os.getpid()}) waits at step {step} to be killed", flush=True)
            time.sleep(3600)
            raise InjectedFault(f"fault drill: rank {run.rank} was not killed at step {step}")


class StopWatcher:
    """Every `log_every` steps, rank 0 looks for the driver's stop file and all ranks
    agree: on a stop, the Checkpointer saves this step and the loop ends (preemption).
    The check costs one small file lookup and one all-reduce per `log_every` steps."""

    def after_step(self, run: Run, step: int, loss: torch.Tensor, digest: int) -> None:
        spec = run.spec
        if not spec.stop_file or step % spec.train.log_every or step == spec.train.max_steps:
            return
        asked = float(run.rank == 0 and storage.exists(spec.stop_file))
        if _sum_across_ranks([asked], run.device)[0] > 0:
            run.stop_requested = True
            if run.rank == 0:
                print(f"[{spec.kind}] stop requested: checkpointing step {step} and stopping", flush=True)


class MetricsLogger:
    """Every `log_every` steps: mean loss over the window and ranks, throughput, MFU,
    and the digest of the step's global batch (what `pipeline batches` recomputes)."""

    def __init__(self, run: Run):
        self.window_loss = torch.zeros((), device=run.device)  # stays on device: .item() per step stalls a GPU
        self.window_steps, self.window_start = 0, time.perf_counter()

    def after_step(self, run: Run, step: int, loss: torch.Tensor, digest: int) -> None:
        train = run.spec.train
        self.window_loss += loss
        self.window_steps += 1
        if step % train.log_every and step != train.max_steps:
            return
        loss_sum, digest_sum = _sum_across_ranks([float(self.window_loss), float(digest)], run.device)
        elapsed = time.perf_counter() - self.window_start
        samples_per_s = self.window_steps * run.data.layout.global_batch / elapsed
        unit, each = run.kind.unit, run.kind.units_per_sample(run.spec.model)
        metrics = {
            Metric.LOSS: loss_sum / self.window_steps / run.world,
            Metric.LR: run.scheduler.get_last_lr()[0],
            **run.progress(step),
            Metric.per_second(unit): samples_per_s * each,
            Metric.MFU: samples_per_s * run.sample_flops / (train.peak_flops_per_worker * run.world),
            Metric.EPOCH: run.data.epoch_at(step),
            Metric.BATCH_DIGEST: float(int(digest_sum) % (1 << DIGEST_BITS)),
        }
        if run.device.type == "cuda":
            metrics[Metric.PEAK_GPU_MEMORY_GB] = torch.cuda.max_memory_allocated(run.device) / 2**30
        if not math.isfinite(metrics[Metric.LOSS]):
            raise FloatingPointError(f"[{run.spec.kind}] step {step}: training loss is {metrics[Metric.LOSS]} "
                                     f"(non-finite gradients were applied); resume from an earlier checkpoint "
                                     f"with a lower {run.kind.stage}.train.lr")
        run.metrics.update(metrics)
        if run.tracker:
            run.tracker.log_metrics_later(run.spec.mlflow_run_id, metrics, step)
        if run.rank == 0:
            print(f"[{run.spec.kind}] step {step}/{train.max_steps} loss {metrics[Metric.LOSS]:.4f} "
                  f"lr {metrics[Metric.LR]:.3g} {metrics[Metric.per_second(unit)]:.0f} {unit}/s "
                  f"mfu {metrics[Metric.MFU]:.1%}", flush=True)
        self.window_loss = torch.zeros((), device=run.device)
        self.window_steps, self.window_start = 0, time.perf_counter()


class Validator:
    """Every `eval_every` steps and at the end: loss and accuracy on the validation
    shards, on the same data and FLOPs axes as the training loss. Every rank
    evaluates an equal share (ZeRO-3 needs all ranks in every forward)."""

    def __init__(self, run: Run):
        spec = run.spec
        self.batches = []
        if spec.val_data and spec.train.eval_every:
            entries = shard_entries(spec.val_data, spec.skip_val_shards)
            self.batches = head_batches(entries, run.kind.fields, spec.train.eval_samples, run.rank, run.world,
                                        spec.train.micro_batch_size)

    @torch.no_grad()
    def after_step(self, run: Run, step: int, loss: torch.Tensor, digest: int) -> None:
        train = run.spec.train
        if not self.batches or not train.eval_every or (step % train.eval_every and step != train.max_steps):
            return
        run.engine.eval()
        loss_sum = correct = counted = 0.0
        for batch in self.batches:
            logits, batch_loss, targets = run.kind.forward(run.engine, batch, run.device, run.dtype)
            keep = targets != IGNORE
            n = float(keep.sum())
            loss_sum += float(batch_loss) * n
            correct += float(((logits.argmax(-1) == targets) & keep).sum())
            counted += n
        run.engine.train()
        loss_sum, correct, counted = _sum_across_ranks([loss_sum, correct, counted], run.device)
        metrics = {Metric.VAL_LOSS: loss_sum / counted, Metric.VAL_ACCURACY: correct / counted}
        run.metrics.update(metrics)
        if run.tracker:
            run.tracker.log_metrics_later(run.spec.mlflow_run_id, {**metrics, **run.progress(step)}, step)
        if run.rank == 0:
            print(f"[{run.spec.kind}] step {step} val_loss {metrics[Metric.VAL_LOSS]:.4f} "
                  f"val_accuracy {metrics[Metric.VAL_ACCURACY]:.4f}", flush=True)


class Checkpointer:
    """Every `checkpoint_every` steps and at the end: every rank saves its DeepSpeed
    shard, rank 0 the data counter, and all report them to Ray Train."""

    def after_step(self, run: Run, step: int, loss: torch.Tensor, digest: int) -> None:
        import ray.train

        train = run.spec.train
        final = step == train.max_steps
        due = train.checkpoint_every and step % train.checkpoint_every == 0
        if not (final or due or run.stop_requested):
            return
        with tempfile.TemporaryDirectory() as directory:
            ckpt.save_engine(run.engine, directory, run.data.state(step), run.rank)
            if final:
                ckpt.export_weights(run.engine, train.zero_stage, run.spec.weights_out, run.rank)
            report = {**run.metrics, "step": step, "started_at": run.started_at,
                      "stopped": float(run.stop_requested and not final)}
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _resume(engine, data: TrainingData, spec: TrainSpec) -> int:
    """The step a restored checkpoint continues from, or 0 for a fresh run."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and spec.resume_from:
        filesystem, path = storage.arrow_filesystem(spec.resume_from)
        checkpoint = ray.train.Checkpoint(path, filesystem)
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        step = data.check_resume(ckpt.read_data_state(directory))
        ckpt.load_engine(engine, directory)
    return step


def train_worker(loop_config: dict) -> None:
    import logging

    import ray.train

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    spec: TrainSpec = loop_config["spec"]
    train = spec.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    storage.name_requests(f"rank-{rank}")  # its loader workers, forked later, inherit it
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if train.use_gpu else torch.device("cpu")
    if train.use_gpu:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if train.precision == "bf16" else torch.float32

    kind = KINDS[spec.kind]
    ds_config = deepspeed_config(spec.deepspeed, train, world)
    model = build_model(kind, spec, ds_config)
    data = TrainingData.open(spec.train_data, train, world, spec.skip_shards)
    sample_flops = kind.flops_per_sample(spec, model, iter_shard(data.entries[0]["path"]))

    groups = kind.param_groups(spec, model)
    engine, _, scheduler = initialize(model, groups, train, ds_config)
    step = _resume(engine, data, spec)
    tracker = None
    if rank == 0 and spec.tracking_uri and spec.mlflow_run_id:
        from pipeline.tracking import MlflowTracker

        tracker = MlflowTracker(spec.tracking_uri)
    run = Run(spec, kind, engine, scheduler, data, rank, world, device, dtype, sample_flops, step, tracker)
    callbacks = [FaultDrill(), MetricsLogger(run), Validator(run), StopWatcher(), Checkpointer()]

    disk_cache = ShardCache(os.path.expanduser(spec.shard_cache_dir), spec.shard_cache_mb << 20) if spec.shard_cache_dir else None
    batches = iter(data.loader(rank, step, train.max_steps, kind.fields, kind.transform(spec), train, disk_cache))
    engine.train()
    while step < train.max_steps and not run.stop_requested:
        loss, digest = train_step(run, batches)
        step += 1
        for callback in callbacks:
            callback.after_step(run, step, loss, digest)
    if tracker:
        tracker.flush()


def train_step(run: Run, batches) -> tuple[torch.Tensor, int]:
    """One optimizer step over `grad_accum` micro-batches: (mean loss, still on the
    device, and the global batch's digest). Nothing here reads a value back from the
    device (tests/test_step_syncs.py counts)."""
    accum = run.spec.train.grad_accum
    loss_sum, digest = torch.zeros((), device=run.device), 0
    for _ in range(accum):
        batch = next(batches)
        _, loss, _ = run.kind.forward(run.engine, batch, run.device, run.dtype)
        run.engine.backward(loss)
        run.engine.step()
        loss_sum += loss.detach().float()
        digest += batch_digest(batch["__key__"])
    return loss_sum / accum, digest
