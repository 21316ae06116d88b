"""What differs between training the GPT, the ViT and the captioner: the model,
the columns a batch holds, the loss, and the compute a sample costs.

The engine loop (`train/loop.py`) is the same for all three.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from pipeline.config import TrainConfig, TransformerConfig
from pipeline.models import flops
from pipeline.models.captioner import MAX_TEXT_LEN, PAD, Captioner, encode_text
from pipeline.models.gpt import GPT
from pipeline.models.layers import count_params
from pipeline.models.vit import ViT
from pipeline.train.data import SampleTable, load_table

CELL = 28


@dataclass
class TrainSpec:
    """Everything a worker needs, resolved by the driver (plain data, sent once)."""

    kind: str  # "gpt" | "vit" | "captioner"
    train_shards: list[str]
    model: TransformerConfig
    train: TrainConfig
    deepspeed: dict[str, Any]
    weights_out: str  # where rank 0 writes the final safetensors
    model_args: dict[str, Any] = field(default_factory=dict)
    init_encoder: Optional[str] = None  # safetensors of a pretrained ViT (captioner)
    encoder_model: Optional[TransformerConfig] = None
    encoder_lr_scale: float = 1.0
    max_shift: int = 0
    tracking_uri: Optional[str] = None
    mlflow_run_id: Optional[str] = None
    resume_from: Optional[str] = None  # a reported checkpoint to start from (Ray's own restore wins)
    # Fault drill: the last rank raises once at this step of a run that did not
    # resume, so Ray's restart-from-checkpoint path can be exercised (0: never).
    fail_at_step: int = 0


def build_model(kind: str, model: TransformerConfig, args: dict[str, Any], encoder_model: Optional[TransformerConfig] = None) -> torch.nn.Module:
    """The model of a spec; also used to rebuild a trained one from its saved config."""
    if kind == "gpt":
        return GPT(args["vocab_size"], args["seq_len"], model)
    if kind == "vit":
        return ViT(args["num_patches"], args["patch_dim"], args["num_classes"], model)
    if kind == "captioner":
        g = CELL // args["patch_size"]
        encoder = ViT(g * g, args["patch_size"] ** 2, 10, encoder_model)
        return Captioner(encoder, model, patch_grid=g)
    raise ValueError(f"unknown model kind {kind!r}")


def param_counts(model: torch.nn.Module) -> dict[str, int]:
    total = count_params(model)
    return {"params_total": total, "params_non_embedding": total - model.embedding_params()}


# --------------------------------------------------------------------------- batches


def load_training_table(spec: TrainSpec, rank: int, world: int) -> SampleTable:
    if spec.kind == "gpt":
        fields = {"npy": lambda a: a.astype(np.int64)}
    elif spec.kind == "vit":
        fields = {"npy": lambda a: a.astype(np.float32), "cls": int}
    else:
        fields = {"npy": lambda a: a.astype(np.float32), "txt": _padded_text_ids, "json": lambda m: (m["rows"], m["cols"])}
    return load_table(spec.train_shards, fields, rank, world)


def _padded_text_ids(text: str) -> np.ndarray:
    ids = encode_text(text)
    return np.asarray(ids + [PAD] * (MAX_TEXT_LEN + 2 - len(ids)), dtype=np.int64)


def random_shift(patches: torch.Tensor, patch_size: int, max_shift: int, background: float, gen: torch.Generator) -> torch.Tensor:
    """Shift each 28x28 image by up to `max_shift` pixels, filling with background."""
    B, P, _ = patches.shape
    g = int(round(P**0.5))
    p = patch_size
    images = patches.view(B, g, g, p, p).permute(0, 1, 3, 2, 4).reshape(B, g * p, g * p)
    padded = torch.nn.functional.pad(images, (max_shift,) * 4, value=background)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, B), generator=gen)
    size = g * p
    shifted = torch.stack([padded[b, dy[b] : dy[b] + size, dx[b] : dx[b] + size] for b in range(B)])
    return shifted.view(B, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(B, P, p * p)


def compute_loss(spec: TrainSpec, engine, batch: dict[str, np.ndarray], device, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if spec.kind == "gpt":
        seq = torch.from_numpy(batch["npy"]).to(device)
        _, loss = engine(seq[:, :-1], seq[:, 1:])
        return loss
    if spec.kind == "vit":
        patches = torch.from_numpy(batch["npy"])
        if spec.max_shift:
            background = float(spec.model_args["background"])
            patches = random_shift(patches, spec.model_args["patch_size"], spec.max_shift, background, gen)
        _, loss = engine(patches.to(device, dtype), torch.from_numpy(batch["cls"]).to(device))
        return loss
    rows, cols = (int(v) for v in batch["json"][0])
    ids = torch.from_numpy(batch["txt"]).to(device)
    length = int((ids != PAD).sum(1).max())
    ids = ids[:, :length]
    _, loss = engine(torch.from_numpy(batch["npy"]).to(device, dtype), rows, cols, ids[:, :-1], ids[:, 1:])
    return loss


def units_per_sample(spec: TrainSpec) -> tuple[str, float]:
    """The unit of data a run counts (tokens or images) and how many a sample holds."""
    if spec.kind == "gpt":
        return "tokens", float(spec.model_args["seq_len"])
    return "images", 1.0


def flops_per_sample(spec: TrainSpec, model: torch.nn.Module, table: SampleTable) -> float:
    counts = param_counts(model)
    m = spec.model
    if spec.kind == "gpt":
        return flops.gpt_flops_per_sequence(counts["params_non_embedding"], m.n_layer, spec.model_args["seq_len"], m.d_model)
    if spec.kind == "vit":
        return flops.vit_flops_per_image(counts["params_non_embedding"], m.n_layer, spec.model_args["num_patches"], m.d_model)
    enc = model.encoder
    enc_params = param_counts(enc)["params_non_embedding"]
    rows, cols = (int(v) for v in table.columns["json"][0])
    text_len = float((table.columns["txt"] != PAD).sum(1).mean()) - 1
    return flops.captioner_flops_per_sample(
        enc_params, enc.cfg.n_layer, enc.cfg.d_model, enc.num_patches + 1, rows * cols,
        counts["params_non_embedding"] - enc_params, m.n_layer, m.d_model, int(round(text_len)),
    )


def param_groups(spec: TrainSpec, model: torch.nn.Module) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms and embeddings' 1-D params;
    the captioner's pretrained encoder at a scaled learning rate."""
    groups: dict[tuple[bool, bool], list] = {}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_encoder = spec.kind == "captioner" and name.startswith("encoder.")
        groups.setdefault((p.dim() >= 2, is_encoder), []).append(p)
    out = []
    for (decay, is_encoder), params in sorted(groups.items()):
        scale = spec.encoder_lr_scale if is_encoder else 1.0
        if scale == 0:
            for p in params:
                p.requires_grad_(False)
            continue
        out.append({"params": params, "weight_decay": spec.train.weight_decay if decay else 0.0, "lr": spec.train.lr * scale})
    return out
