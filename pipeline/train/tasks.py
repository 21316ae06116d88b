"""What differs between training the GPT, the ViT and the captioner: the model,
the columns a batch holds, the loss, and the compute a sample costs.

The engine loop (`train/loop.py`) is the same for all three.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import itertools
from typing import Any, Iterator, Optional

import numpy as np
import torch

from pipeline.config import AugmentConfig, TrainConfig, TransformerConfig
from pipeline.models import flops
from pipeline.models.captioner import MAX_TEXT_LEN, PAD, Captioner, encode_text
from pipeline.models.gpt import GPT
from pipeline.models.layers import count_params
from pipeline.models.vit import ViT
from pipeline.models.patches import to_images, to_patches
from pipeline.train.augment import KeyedAffine

CELL = 28


@dataclass
class TrainSpec:
    """Everything a worker needs, resolved by the driver (plain data, sent once)."""

    kind: str  # "gpt" | "vit" | "captioner"
    train_data: str  # directory of the training shards' manifest
    model: TransformerConfig
    train: TrainConfig
    deepspeed: dict[str, Any]
    weights_out: str  # where rank 0 writes the final safetensors
    val_data: Optional[str] = None  # directory of the validation shards' manifest
    model_args: dict[str, Any] = field(default_factory=dict)
    init_encoder: Optional[str] = None  # safetensors of a pretrained ViT (captioner)
    init_decoder: Optional[str] = None  # safetensors of a text-only GPT of the decoder's shape (captioner)
    encoder_model: Optional[TransformerConfig] = None
    encoder_lr_scale: float = 1.0
    max_shift: int = 0
    augment: Optional[AugmentConfig] = None  # affine distortion of each cell (replaces max_shift)
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


def build_model(kind: str, model: TransformerConfig, args: dict[str, Any], encoder_model: Optional[TransformerConfig] = None) -> torch.nn.Module:
    """The model of a spec; also used to rebuild a trained one from its saved config."""
    if kind == "gpt":
        return GPT(args["vocab_size"], args["seq_len"], model)
    if kind == "vit":
        return ViT(args["num_patches"], args["patch_dim"], args["num_classes"], model, args.get("stem_channels", 0),
                   args.get("pool", "cls"))
    if kind == "captioner":
        g = CELL // args["patch_size"]
        encoder = ViT(g * g, args["patch_size"] ** 2, 10, encoder_model, args.get("stem_channels", 0),
                      args.get("pool", "cls"))
        return Captioner(encoder, model, patch_grid=g, head_logits=args.get("head_logits", False),
                         head_shift=args.get("head_shift", 0))
    raise ValueError(f"unknown model kind {kind!r}")


def param_counts(model: torch.nn.Module) -> dict[str, int]:
    total = count_params(model)
    return {"params_total": total, "params_non_embedding": total - model.embedding_params()}


# --------------------------------------------------------------------------- per-kind descriptions


def _as_float32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32)


def _padded_text_ids(text: str) -> np.ndarray:
    ids = encode_text(text)
    return np.asarray(ids + [PAD] * (MAX_TEXT_LEN + 2 - len(ids)), dtype=np.int64)


def _grid_shape(meta: dict) -> np.ndarray:
    return np.asarray([meta["rows"], meta["cols"]], dtype=np.int64)


class KeyedShift:
    """Shift each 28x28 image of a batch (as patches) by up to `max_shift` pixels, filling
    with background.

    A sample's shift is a hash of (seed, epoch, sample key) alone, so it is the same
    whichever rank or loader worker reads the sample, and a resumed run redraws it.
    """

    def __init__(self, seed: int, patch_size: int, max_shift: int, background: float):
        self.seed, self.p, self.m, self.background = seed, patch_size, max_shift, background

    def offsets(self, keys: list[str], epochs: np.ndarray) -> np.ndarray:
        from pipeline.data.order import key_hash

        span = 2 * self.m + 1
        h = np.array([key_hash(f"{self.seed}:{e}:{k}") for k, e in zip(keys, epochs)], dtype=np.uint64)
        return np.stack([h % span, (h // span) % span], axis=1).astype(np.int64)  # (dx, dy) per sample

    def __call__(self, batch: dict[str, Any], epochs: np.ndarray) -> dict[str, Any]:
        patches = batch["npy"]
        B, P, _ = patches.shape
        p, m = self.p, self.m
        g = int(round(P**0.5))
        size = g * p
        images = to_images(patches, g, g, p)
        padded = torch.nn.functional.pad(images, (m,) * 4, value=self.background)
        shifted = torch.empty_like(images)
        offsets = torch.from_numpy(self.offsets(batch["__key__"], epochs))
        for dx in range(2 * m + 1):
            for dy in range(2 * m + 1):
                rows = ((offsets[:, 0] == dx) & (offsets[:, 1] == dy)).nonzero().flatten()
                shifted[rows] = padded[rows, dy : dy + size, dx : dx + size]
        out = to_patches(shifted, p)
        return {**batch, "npy": out.contiguous()}


class Task:
    """What one model kind reads from a shard, how it computes its loss, and what a sample costs."""

    unit = "images"  # what a run counts: tokens or images
    fields: dict[str, Any] = {}

    def units_per_sample(self, spec: TrainSpec) -> float:
        return 1.0

    def transform(self, spec: TrainSpec):
        return None

    def forward(self, model, batch: dict[str, Any], device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, loss, targets); targets equal to IGNORE do not count for accuracy."""
        raise NotImplementedError

    def flops_per_sample(self, spec: TrainSpec, model: torch.nn.Module, samples: Iterator[dict[str, Any]]) -> float:
        """Training FLOPs of one sample; `samples`: the first shard's, decoded."""
        raise NotImplementedError


IGNORE = -100


class GPTTask(Task):
    unit = "tokens"
    fields = {"npy": np.asarray}  # token ids stay uint16 until they reach the device

    def units_per_sample(self, spec):
        return float(spec.model_args["seq_len"])

    def forward(self, model, batch, device, dtype):
        seq = batch["npy"].to(device, non_blocking=True).long()
        logits, loss = model(seq[:, :-1], seq[:, 1:])
        return logits, loss, seq[:, 1:]

    def flops_per_sample(self, spec, model, samples):
        m = spec.model
        return flops.gpt_flops_per_sequence(flops.matmul_params(model), m.n_layer,
                                            spec.model_args["seq_len"], m.d_model)


class ViTTask(Task):
    fields = {"npy": _as_float32, "cls": int}

    def transform(self, spec):
        a = spec.model_args
        if spec.augment and spec.augment.active():
            return KeyedAffine(spec.augment, spec.train.seed, a["patch_size"], float(a["background"]))
        if not spec.max_shift:
            return None
        return KeyedShift(spec.train.seed, a["patch_size"], spec.max_shift, float(a["background"]))

    def forward(self, model, batch, device, dtype):
        labels = batch["cls"].to(device, non_blocking=True)
        logits, loss = model(batch["npy"].to(device, dtype, non_blocking=True), labels)
        return logits, loss, labels

    def flops_per_sample(self, spec, model, samples):
        m = spec.model
        stem, stem_params = model.stem_flops(trained=True)
        return stem + flops.vit_flops_per_image(flops.matmul_params(model) - stem_params, flops.matmul_params(model.head),
                                                m.n_layer, spec.model_args["num_patches"], m.d_model)


class CaptionerTask(Task):
    fields = {"npy": _as_float32, "txt": _padded_text_ids, "json": _grid_shape}

    def transform(self, spec):
        if not (spec.augment and spec.augment.active()):
            return None
        a = spec.model_args
        return KeyedAffine(spec.augment, spec.train.seed, a["patch_size"], float(a["background"]))

    def forward(self, model, batch, device, dtype):
        ids = batch["txt"].to(device, non_blocking=True)
        length = int((ids != PAD).sum(1).max())
        ids = ids[:, :length]
        shapes = batch["json"].to(device)
        logits, loss = model(batch["npy"].to(device, dtype, non_blocking=True), shapes, ids[:, :-1], ids[:, 1:])
        targets = ids[:, 1:].masked_fill(ids[:, 1:] == PAD, IGNORE)
        return logits, loss, targets

    def flops_per_sample(self, spec, model, samples):
        """The mean over the first shard's grids (up to 256): grids of mixed shapes cost
        what their cells and text cost."""
        m = spec.model
        enc = model.encoder
        trained = spec.encoder_lr_scale > 0
        stem, stem_params = enc.stem_flops(trained)
        head_params = flops.matmul_params(enc.head)
        enc_params = flops.matmul_params(enc) - head_params - stem_params  # the head reads class tokens only
        per_cell = stem + ((6.0 if trained else 2.0) * head_params if model.head_logits else 0.0)
        memory_params = flops.matmul_params(model.memory_proj) + sum(flops.matmul_params(b.cross_attn.kv) for b in model.blocks)
        decoder_params = flops.matmul_params(model) - flops.matmul_params(enc)
        costs = []
        for sample in itertools.islice(samples, 256):
            cells = sample["json"]["rows"] * sample["json"]["cols"]
            text_len = len(encode_text(sample["txt"])) - 1  # predicted positions
            costs.append(flops.captioner_flops_per_sample(
                enc_params, enc.cfg.n_layer, enc.cfg.d_model, enc.num_patches + 1, sample["json"]["rows"], cells,
                trained,
                decoder_params - memory_params, memory_params, m.n_layer, m.d_model, text_len,
            ) + per_cell * cells)
        return sum(costs) / len(costs)


TASKS: dict[str, Task] = {"gpt": GPTTask(), "vit": ViTTask(), "captioner": CaptionerTask()}


def units_per_sample(spec: TrainSpec) -> tuple[str, float]:
    """The unit of data a run counts (tokens or images) and how many a sample holds."""
    task = TASKS[spec.kind]
    return task.unit, task.units_per_sample(spec)


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
