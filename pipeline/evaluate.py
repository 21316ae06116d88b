"""Held-out metrics: GPT validation loss, perplexity and the unigram baseline;
ViT accuracy; the captioner's per-digit and per-cell accuracy, whole-grid exact
match, shape errors and accuracy by grid shape, with pictures.

`evaluate_gpt` and `evaluate_images` are what the two evaluation stages run as
Ray tasks (on a GPU when `evaluate.use_gpu` is set): the driver only schedules."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import pictures, storage
from pipeline.config import EvaluateConfig
from pipeline.data.loader import head_batches
from pipeline.data.shards import read_manifest, shard_entries
from pipeline.data.sources import ImageSet, grid_output
from pipeline.geometry import CELL
from pipeline.kinds import KINDS, load_trained
from pipeline.models.captioner import FIRST_CELL, encode_text
from pipeline.preprocess.patchify import patchify
from pipeline.scoring import accuracy_by, by_shape, score_grids

EXAMPLES = 16  # grids of the last split read, written out for a person to read, mistakes first
PICTURES = ("samples.png", "confusion.png", "accuracy_by_shape.png", "attention.png")


def _batches(directory: str, fields: dict, batch_size: int, limit: int | None = None) -> list[dict]:
    """Every sample of a split (or the first `limit`), in batches, each shard checked as read."""
    total = limit or int(read_manifest(directory)["total_samples"])
    return head_batches(shard_entries(directory), fields, total, 0, 1, batch_size)


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats) of the empirical token distribution: the loss of the best
    model that ignores context."""
    counts = np.bincount(tokens.ravel())
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _load(trained: dict[str, Any], cfg: EvaluateConfig) -> tuple[torch.nn.Module, Any, torch.device]:
    """A training stage's final model and its model config, on the device evaluation runs on."""
    device = torch.device("cuda") if cfg.use_gpu else torch.device("cpu")
    torch.set_num_threads(cfg.num_cpus)  # Ray starts a worker at one thread, whatever the task asked
    _, model_config, model = load_trained(trained["model_config"], trained["weights"])
    return model.to(device), model_config, device


@torch.no_grad()
def evaluate_gpt(trained: dict[str, Any], tokens_val: str, cfg: EvaluateConfig) -> dict[str, float]:
    model, _, device = _load(trained, cfg)
    batches = [b["npy"].long().to(device) for b in _batches(tokens_val, {"npy": np.asarray}, cfg.batch_size, cfg.max_val_sequences)]
    total, count = 0.0, 0
    for batch in batches:
        logits, _ = model(batch[:, :-1])
        total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"))
        count += batch[:, 1:].numel()
    loss = total / count
    return {
        "gpt_val_loss": loss,
        "gpt_val_ppl": math.exp(loss),
        "gpt_unigram_entropy": unigram_entropy(torch.cat(batches)[:, 1:].cpu().numpy()),
        "gpt_val_tokens": float(count),
    }


@torch.no_grad()
def evaluate_vit(trained: dict[str, Any], patches: str, cfg: EvaluateConfig, split: str = "test") -> dict[str, float]:
    model, _, device = _load(trained, cfg)
    correct = count = 0
    for batch in _batches(patches, KINDS["vit"].fields, cfg.batch_size):
        logits, _ = model(batch["npy"].to(device))
        correct += int((logits.argmax(-1).cpu() == batch["cls"]).sum())
        count += len(batch["cls"])
    return {f"vit_{split}_accuracy": correct / count, f"vit_{split}_images": float(count)}


def _metric_prefix(grid_set: str, split: str) -> str:
    """`captioner_` for the training grid set's test split; the set's name and any other
    split are spelled out: `captioner_val_`, `captioner_2x2_`, `captioner_2x2_val_`."""
    parts = ["captioner"] + ([grid_set] if grid_set != "grids" else []) + ([split] if split != "test" else [])
    return "_".join(parts) + "_"


@torch.no_grad()
def read_grids(model, device, grids: str, cfg: EvaluateConfig) -> dict[str, list]:
    """Every grid of a split written out by the model: keys, targets, predictions."""
    fields = {**KINDS["captioner"].fields, "txt": str}  # the written grid as text, not as padded ids
    out: dict[str, list] = {"keys": [], "targets": [], "predicted": []}
    for batch in _batches(grids, fields, cfg.batch_size):
        shapes = batch["json"].to(device)  # (B, 2): rows, cols
        out["predicted"] += model.generate(batch["npy"].to(device), shapes)
        out["keys"] += batch["__key__"]
        out["targets"] += [str(t) for t in batch["txt"]]
    return out


def evaluate_captioner(model, device, grids: str, cfg: EvaluateConfig, grid_set: str = "grids",
                       split: str = "test") -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics of one grid set's split, and what the pictures and the report need:
    the written grids (mistakes first) and the accuracy of each grid shape."""
    read = read_grids(model, device, grids, cfg)
    prefix = _metric_prefix(grid_set, split)
    texts, predicted = read["targets"], read["predicted"]
    metrics = {**score_grids(predicted, texts, prefix), f"{prefix}grids": float(len(texts))}
    by_size = accuracy_by(predicted, texts, by_shape)
    if len(by_size) > 1:  # ragged grids: per-cell accuracy by number of rows
        by_rows = accuracy_by(predicted, texts, lambda rows: f"{len(rows):02d}")
        metrics.update({f"{prefix}cell_accuracy_rows{int(r)}": acc for r, acc in by_rows.items()})
    wrong_first = sorted(range(len(texts)), key=lambda i: predicted[i] == texts[i])
    return metrics, {**read, "order": wrong_first, "by_size": by_size}


@torch.no_grad()
def cross_attention(model, patches: torch.Tensor, shapes: torch.Tensor, written: str) -> np.ndarray:
    """The last decoder block's cross-attention (heads averaged) over the grid's cells while
    it writes each cell of `written`, laid over the image's patches: (cells written,
    rows*g, cols*g)."""
    ids = torch.tensor([encode_text(written)], device=patches.device)
    w = model.cross_attention(patches, shapes, ids[:, :-1])[-1, 0].mean(0)  # (T, memory)
    writes_cell = ids[0, 1:] >= FIRST_CELL  # query t writes ids[t + 1]
    rows, cols = (int(v) for v in shapes[0])
    g = model.patch_grid
    per_cell = w[writes_cell, : rows * cols].reshape(-1, rows, cols)  # the cells; the row edges after them
    return np.kron(per_cell.cpu().numpy(), np.ones((1, g, g)))  # each cell's weight over its patches


def _grid_images(directory: str, keys: list[str]) -> list[np.ndarray]:
    """The raw grid images with these keys, from the shard stage's shards."""
    from pipeline.data.shards import iter_verified

    wanted = set(keys)
    found = {s["__key__"]: s["png"] for s in iter_verified(directory) if s["__key__"] in wanted}
    return [found[k] for k in keys]


def captioner_pictures(inputs: dict[str, dict[str, Any]], model, layout, device, read: dict[str, Any],
                       split: str) -> dict[str, bytes]:
    """Pictures of the training grid set's `split`: samples (mistakes first), the confusion
    of cells, accuracy by shape (ragged grids), and one grid's cross-attention. `layout`:
    the captioner's patch layout (`geometry.PatchLayout`)."""
    raw = inputs["shard"][grid_output("grids", split)]
    shown = read["order"][:8]
    keys = [read["keys"][i] for i in shown]
    out = {
        "samples.png": pictures.samples_png(_grid_images(raw, keys), [read["predicted"][i] for i in shown],
                                            [read["targets"][i] for i in shown], f"{split} grids (mistakes first, in red)"),
        "confusion.png": pictures.confusion_png(pictures.confusion(read["predicted"], read["targets"]),
                                                f"{split} cells: true against written"),
    }
    if len(read["by_size"]) > 1:
        out["accuracy_by_shape.png"] = pictures.by_shape_png(read["by_size"], f"{split} per-cell accuracy by grid shape")
    # a grid of 2-4 rows and columns, written right, for a readable attention map
    shapes = [(t.count("\n") + 1, len(t.split("\n")[0])) for t in read["targets"]]
    pick = next((i for i, (r, c) in enumerate(shapes) if 2 <= r <= 4 and 2 <= c <= 4
                 and read["predicted"][i] == read["targets"][i]), 0)
    (image,) = _grid_images(raw, [read["keys"][pick]])
    patches = torch.from_numpy(patchify(image, layout.patch_size, layout.mean, layout.std))[None].to(device)
    shape = torch.tensor([[image.shape[0] // CELL, image.shape[1] // CELL]], device=device)
    weights = cross_attention(model, patches, shape, read["predicted"][pick])
    out["attention.png"] = pictures.attention_png(image, read["predicted"][pick], weights, layout.patch_size)
    return out


def evaluate_images(inputs: dict[str, dict[str, Any]], cfg: EvaluateConfig, grid_sets: list[str],
                    out_dir: str) -> tuple[dict[str, float], list[dict]]:
    """The ViT on single digits and the captioner on every grid set's validation grids,
    and test grids when `cfg.test`; the pictures of the last split read (test, or
    validation while settings are chosen) are written to `out_dir`. Returns metrics and
    that split's written-out grids of the training grid set (mistakes first)."""
    patches = inputs["patchify"]
    splits = ("val", "test") if cfg.test else ("val",)
    metrics: dict[str, float] = {}
    for split in splits:
        metrics.update(evaluate_vit(inputs["pretrain_vit"], patches[ImageSet(split).output], cfg, split))
    captioner, captioner_config, device = _load(inputs["finetune"], cfg)
    main = None
    for grid_set in grid_sets:
        for split in splits:
            directory = patches[grid_output(grid_set, split)]
            scores, read = evaluate_captioner(captioner, device, directory, cfg, grid_set, split)
            metrics.update(scores)
            if grid_set == "grids" and split == splits[-1]:
                main = read
    shown = captioner_pictures(inputs, captioner, captioner_config.encoder.patches, device, main, splits[-1])
    for name, data in shown.items():
        storage.write_bytes_atomic(storage.join(out_dir, name), data)
    examples = [{"key": main["keys"][i], "target": main["targets"][i], "predicted": main["predicted"][i]}
                for i in main["order"][:EXAMPLES]]
    return metrics, examples
