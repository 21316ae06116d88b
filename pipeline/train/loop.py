"""The training function every Ray Train worker runs: one code path for one CPU
process on a laptop and N GPUs on M nodes.

Rank 0 logs to MLflow every `log_every` steps. Every rank saves its DeepSpeed
shard and reports it with `ray.train.report`; a restarted run resumes from
`ray.train.get_checkpoint()` with model, optimizer, scheduler, RNG and data
position (derived from the step) restored.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch
import torch.distributed as dist

from pipeline.train import checkpoint as ckpt
from pipeline.train.data import BatchSchedule
from pipeline.train.engine import deepspeed_config, initialize
from pipeline.train.tasks import (
    TrainSpec,
    build_model,
    compute_loss,
    flops_per_sample,
    load_training_table,
    param_groups,
    units_per_sample,
)


def _mean_across_ranks(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return float(t.item())


class InjectedFault(RuntimeError):
    """Raised by the `fail_at_step` drill."""


def train_worker(loop_config: dict) -> None:
    import logging

    import ray.train

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    spec: TrainSpec = loop_config["spec"]
    train = spec.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if train.use_gpu else torch.device("cpu")
    if train.use_gpu:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if train.precision == "bf16" else torch.float32

    torch.manual_seed(train.seed)  # identical initial weights on every rank
    model = build_model(spec.kind, spec.model, spec.model_args, spec.encoder_model)
    if spec.init_encoder:
        ckpt.load_weights(model.encoder, spec.init_encoder)
    table = load_training_table(spec, rank, world)
    schedule = BatchSchedule(table, train.micro_batch_size, train.seed, rank)
    unit, units_each = units_per_sample(spec)
    sample_flops = flops_per_sample(spec, model, table)

    engine, _, scheduler = initialize(model, param_groups(spec, model), train, deepspeed_config(spec.deepspeed, train, world))
    gen = torch.Generator().manual_seed(train.seed * 1000 + rank)

    step = 0
    resume = ray.train.get_checkpoint()
    if resume is None and spec.resume_from:
        resume = ray.train.Checkpoint(spec.resume_from)
    if resume is not None:
        with resume.as_directory() as directory:
            state = ckpt.load_engine(engine, directory, rank)
        step = int(state["step"])
        gen.set_state(state["rng"])

    logger = None
    if rank == 0 and spec.mlflow_run_id:
        from pipeline.tracking import RunLogger

        logger = RunLogger(spec.tracking_uri, spec.mlflow_run_id)

    samples_per_step = train.micro_batch_size * train.grad_accum * world
    # The loss stays a device tensor until a log step: .item() every step would stall a GPU.
    window_loss, window_steps, window_start = torch.zeros((), device=device), 0, time.perf_counter()
    last_loss, last_metrics = float("nan"), {}
    while step < train.max_steps:
        engine.train()
        for micro in range(train.grad_accum):
            batch = schedule.batch(step * train.grad_accum + micro)
            loss = compute_loss(spec, engine, batch, device, dtype, gen)
            engine.backward(loss)
            engine.step()
            window_loss += loss.detach().float() / train.grad_accum
        step += 1
        window_steps += 1
        if step == spec.fail_at_step and resume is None and rank == world - 1:
            raise InjectedFault(f"fault drill: rank {rank} fails at step {step}")

        if step % train.log_every == 0 or step == train.max_steps:
            last_loss = _mean_across_ranks(float(window_loss) / window_steps, device)
            elapsed = time.perf_counter() - window_start
            samples_per_s = window_steps * samples_per_step / elapsed
            metrics = {
                "loss": last_loss,
                "lr": scheduler.get_last_lr()[0],
                unit: step * samples_per_step * units_each,
                "flops": step * samples_per_step * sample_flops,
                f"{unit}_per_s": samples_per_s * units_each,
                "mfu": samples_per_s * sample_flops / (train.peak_flops_per_worker * world),
                "epoch": schedule.epoch_of(step * train.grad_accum),
            }
            last_metrics = metrics
            if logger:
                logger.log_metrics(metrics, step)
            if rank == 0:
                print(f"[{spec.kind}] step {step}/{train.max_steps} loss {last_loss:.4f} "
                      f"{metrics[f'{unit}_per_s']:.0f} {unit}/s mfu {metrics['mfu']:.1%}", flush=True)
            window_loss, window_steps, window_start = torch.zeros((), device=device), 0, time.perf_counter()

        final = step == train.max_steps
        if final or (train.checkpoint_every and step % train.checkpoint_every == 0):
            with tempfile.TemporaryDirectory() as directory:
                ckpt.save_engine(engine, directory, step, gen, rank)
                if final:
                    ckpt.export_weights(engine, train.zero_stage, spec.weights_out, rank)
                report = {**last_metrics, "step": step, "loss": last_loss}
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(directory))
