"""Activation checkpointing: what a transformer block keeps for its backward pass.

- `none`: every activation is kept (fastest, most memory);
- `full`: a block keeps only its input; its whole forward runs again in the backward
  pass (about one extra forward of compute, activations of one block at a time);
- `selective`: a block keeps the outputs of its matmuls and of attention, and
  recomputes the cheap elementwise work between them (layer norms, GELU, dropout,
  residual adds): most of the memory those ops hold, for almost no extra FLOPs.

Both recompute modes give the same values as `none` (tests/test_switches.py).
"""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective")

_aten = torch.ops.aten
# The ops whose outputs `selective` keeps: matmuls and attention kernels.
KEPT_OPS = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed(forward, mode: str, *args):
    """`forward(*args)` under the recompute `mode` ("full" or "selective")."""
    if mode == "selective":
        return checkpoint(forward, *args, use_reentrant=False,
                          context_fn=partial(create_selective_checkpoint_contexts, _keep_matmuls))
    return checkpoint(forward, *args, use_reentrant=False)


def set_mode(model: torch.nn.Module, mode: str) -> None:
    """Every transformer block of `model` (`layers.Block`, which holds a `recompute`
    mode) recomputes by `mode`."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing must be one of {', '.join(MODES)}, got {mode!r}")
    for module in model.modules():
        if hasattr(module, "recompute"):
            module.recompute = mode
