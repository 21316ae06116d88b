"""DeepSpeed: the ZeRO config a run uses, and `deepspeed.initialize` around a model."""

from __future__ import annotations

import copy
import json
import math
from importlib import resources
from typing import Any

import torch

from pipeline.config import ConfigError, TrainConfig
from pipeline.models import recompute

# Shipped inside the package (an installed pipeline trains without a checkout).
ZERO_CONFIGS = resources.files("pipeline.train") / "zero_configs"


def load_zero_config(stage: int, directory=ZERO_CONFIGS) -> dict[str, Any]:
    """The ZeRO JSON of `stage` (`zero_configs/zero{stage}.json`), checked to say that stage."""
    path = directory / f"zero{stage}.json"
    if not path.is_file():
        raise ConfigError(f"train.zero_stage={stage}: no DeepSpeed config at {path}")
    config = json.loads(path.read_text())
    found = config.get("zero_optimization", {}).get("stage", 0)
    if found != stage:
        raise ConfigError(f"{path} sets zero_optimization.stage={found}, expected {stage}")
    return config


def deepspeed_config(base: dict[str, Any], train: TrainConfig, world_size: int) -> dict[str, Any]:
    """The ZeRO JSON plus what the run's config decides: batch sizes, precision, clipping."""
    config = copy.deepcopy(base)
    config.update(
        train_micro_batch_size_per_gpu=train.micro_batch_size,
        gradient_accumulation_steps=train.grad_accum,
        train_batch_size=train.micro_batch_size * train.grad_accum * world_size,
        gradient_clipping=train.grad_clip,
        # No per-parameter inf/NaN scan before each step: that is fp16's loss-scaling
        # guard (bf16 has fp32's exponent range), and it costs a kernel trio per
        # parameter plus a host sync (measured on an H200: over a thousand small kernel
        # launches a step for GPT-124M, bench/RESULTS.md). Without it a non-finite
        # gradient is applied, not skipped; the trainer stops at the next logging step
        # whose loss is not finite (loop.MetricsLogger).
        bf16={"enabled": train.precision == "bf16", "check_grad_overflow": False},
        # DeepSpeed's own throughput timer synchronises the device at every forward and
        # step, and its forward hook breaks torch.compile's graph; the trainer measures
        # throughput itself, once per logging window.
        timers={"throughput": {"enabled": False}},
        steps_per_print=10**9,
    )
    if train.offload_optimizer:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": train.use_gpu}
        config["zero_force_ds_cpu_optimizer"] = False  # we bring our own torch AdamW
    return config


def lr_lambda(train: TrainConfig):
    """Linear warmup, then cosine decay to min_lr; a multiplier of each group's lr."""
    floor = train.min_lr / train.lr

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        progress = min(1.0, (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _skip_cpu_shm_op() -> None:
    """DeepSpeed compiles a shared-memory all-reduce op on every CPU init (~50 s cold).

    It serves only `inference_all_reduce`; training collectives go through
    torch.distributed (gloo). Returning None is DeepSpeed's own fallback when
    the op is unavailable.
    """
    import importlib

    # `import deepspeed.comm.torch as m` would bind the torch package itself:
    # deepspeed.comm re-exports a name `torch`.
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    ds_torch.build_shm_op = lambda: None


def init_distributed(use_gpu: bool) -> None:
    """DeepSpeed's communication over this process's torch.distributed group (made
    here from the RANK/WORLD_SIZE/MASTER_* environment if there is none yet)."""
    import deepspeed

    if not use_gpu:
        _skip_cpu_shm_op()
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")


def build_model(kind, spec, ds_config: dict[str, Any]) -> torch.nn.Module:
    """The kind's model with its initial weights, identical on every rank.

    Under ZeRO-3 a fresh model is built partitioned (`deepspeed.zero.Init`): each
    module's parameters are cut into per-rank slices as soon as the module exists, so
    no rank ever holds the whole model (`layers.init_weights` gathers one module's
    tensors at a time to initialise them). A model that starts from saved weights is
    built whole, then loaded.
    """
    train = spec.train
    torch.manual_seed(train.seed)
    partitioned = train.zero_stage == 3 and not spec.start
    if partitioned:
        import deepspeed

        init_distributed(train.use_gpu)  # zero.Init reads the world size from DeepSpeed's view
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = kind.build(spec.model)
    else:
        model = kind.build(spec.model)
        kind.initialise(model, spec.start)
    recompute.set_mode(model, train.activation_checkpointing)
    return model


def initialize(model: torch.nn.Module, groups: list[dict], train: TrainConfig, ds_config: dict[str, Any]):
    import deepspeed

    init_distributed(train.use_gpu)
    # fused: one kernel for the whole update (CPU and GPU), and its step counter stays
    # on the device (the unfused one reads it back to the host every step)
    optimizer = torch.optim.AdamW(groups, lr=train.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    if train.compile:
        engine.compile()  # DeepSpeed's wrapper of torch.compile (inductor), aware of its own hooks
    return engine, optimizer, scheduler
