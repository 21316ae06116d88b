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

from pipeline.config import EvaluateConfig
from pipeline.data.loader import head_batches
from pipeline.data.shards import read_manifest, shard_entries
from pipeline import storage
from pipeline.data.sources import BLANK, CELL, grid_output
from pipeline.models.captioner import FIRST_CELL, encode_text
from pipeline.preprocess.patchify import patchify
from pipeline.train.checkpoint import load_trained

EXAMPLES = 16  # test grids written out for a person to read, mistakes first
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


def _load(trained: dict[str, Any], cfg: EvaluateConfig) -> tuple[torch.nn.Module, torch.device]:
    """A training stage's final model, on the device evaluation runs on."""
    device = torch.device("cuda") if cfg.use_gpu else torch.device("cpu")
    torch.set_num_threads(cfg.num_cpus)  # Ray starts a worker at one thread, whatever the task asked
    return load_trained(trained["model_config"], trained["weights"]).to(device), device


@torch.no_grad()
def evaluate_gpt(trained: dict[str, Any], tokens_val: str, cfg: EvaluateConfig) -> dict[str, float]:
    model, device = _load(trained, cfg)
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
    model, device = _load(trained, cfg)
    correct = count = 0
    for batch in _batches(patches, {"npy": lambda a: a.astype(np.float32), "cls": int}, cfg.batch_size):
        logits, _ = model(batch["npy"].to(device))
        correct += int((logits.argmax(-1).cpu() == batch["cls"]).sum())
        count += len(batch["cls"])
    return {f"vit_{split}_accuracy": correct / count, f"vit_{split}_images": float(count)}


def _metric_prefix(grid_set: str, split: str) -> str:
    """`captioner_` for the training grid set's test split; the set's name and any other
    split are spelled out: `captioner_val_`, `captioner_2x2_`, `captioner_2x2_val_`."""
    parts = ["captioner"] + ([grid_set] if grid_set != "grids" else []) + ([split] if split != "test" else [])
    return "_".join(parts) + "_"


MISSING = "·"  # a cell the prediction does not have


def aligned_cells(predicted: str, target: str) -> list[tuple[str, str]]:
    """(true, written) for every cell of the target, read at its row and column; a
    cell the prediction lacks is MISSING."""
    pred_rows = predicted.split("\n")
    return [(ch, pred_rows[r][c] if r < len(pred_rows) and c < len(pred_rows[r]) else MISSING)
            for r, row in enumerate(target.split("\n")) for c, ch in enumerate(row)]


def score_grids(predicted: list[str], target: list[str], prefix: str = "captioner_") -> dict[str, float]:
    """Per-digit accuracy over the target's digit cells, per-cell accuracy (blanks too),
    blank accuracy, exact match of the whole written grid, and the shape-error rate (a
    wrong number of rows or a row of the wrong length). A missing or extra cell counts wrong."""
    cells = [pair for pred, true in zip(predicted, target) for pair in aligned_cells(pred, true)]
    digits = [got == want for want, got in cells if want != BLANK]
    blanks = [got == want for want, got in cells if want == BLANK]
    shape = lambda text: [len(row) for row in text.split("\n")]  # noqa: E731
    scores = {
        f"{prefix}per_digit_accuracy": sum(digits) / max(1, len(digits)),
        f"{prefix}per_cell_accuracy": (sum(digits) + sum(blanks)) / max(1, len(cells)),
        f"{prefix}exact_match": sum(p == t for p, t in zip(predicted, target)) / max(1, len(target)),
        f"{prefix}shape_error_rate": sum(shape(p) != shape(t) for p, t in zip(predicted, target)) / max(1, len(target)),
    }
    if blanks:
        scores[f"{prefix}blank_accuracy"] = sum(blanks) / len(blanks)
    return scores


def accuracy_by(predicted: list[str], target: list[str], group) -> dict[str, float]:
    """Per-cell accuracy of each group of grids; `group` names a grid's group from its
    target rows, e.g. "3x5" by shape."""
    counts: dict[str, list[int]] = {}
    for pred, true in zip(predicted, target):
        tally = counts.setdefault(group(true.split("\n")), [0, 0])
        cells = aligned_cells(pred, true)
        tally[0] += sum(got == want for want, got in cells)
        tally[1] += len(cells)
    return {name: right / n for name, (right, n) in sorted(counts.items())}


def by_shape(rows: list[str]) -> str:
    return f"{len(rows)}x{len(rows[0])}"


@torch.no_grad()
def read_grids(model, device, grids: str, cfg: EvaluateConfig) -> dict[str, list]:
    """Every grid of a split written out by the model: keys, targets, predictions."""
    fields = {"npy": lambda a: a.astype(np.float32), "txt": str, "json": lambda m: (m["rows"], m["cols"])}
    out: dict[str, list] = {"keys": [], "targets": [], "predicted": []}
    for batch in _batches(grids, fields, cfg.batch_size):
        shapes = torch.tensor([[int(r), int(c)] for r, c in batch["json"]], device=device)
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
    block = model.blocks[-1].cross_attn
    seen = {}
    hook = block.register_forward_hook(lambda mod, args, kwargs, out: seen.update(x=args[0], **kwargs), with_kwargs=True)
    try:
        ids = torch.tensor([encode_text(written)], device=patches.device)
        model(patches, shapes, ids[:, :-1])
    finally:
        hook.remove()
    q = block.heads(block.q(seen["x"]))
    k, _ = block.keys_values(seen["context"])
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5 + seen["bias"]  # the cell-under-cursor bonus
    w = torch.softmax(scores, dim=-1).mean(1)[0]  # (T, memory)
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


def captioner_pictures(inputs: dict[str, dict[str, Any]], model, device, read: dict[str, Any]) -> dict[str, bytes]:
    """The test grids' pictures: samples (mistakes first), the confusion of cells, accuracy
    by shape (ragged grids), and one grid's cross-attention."""
    from pipeline import pictures

    raw = inputs["shard"]["grids_test"]
    shown = read["order"][:8]
    keys = [read["keys"][i] for i in shown]
    out = {
        "samples.png": pictures.samples_png(_grid_images(raw, keys), [read["predicted"][i] for i in shown],
                                            [read["targets"][i] for i in shown], "test grids (mistakes first, in red)"),
        "confusion.png": pictures.confusion_png(pictures.confusion(read["predicted"], read["targets"]),
                                                "test cells: true against written"),
    }
    if len(read["by_size"]) > 1:
        out["accuracy_by_shape.png"] = pictures.by_shape_png(read["by_size"], "test per-cell accuracy by grid shape")
    # a grid of 2-4 rows and columns, written right, for a readable attention map
    shapes = [(t.count("\n") + 1, len(t.split("\n")[0])) for t in read["targets"]]
    pick = next((i for i, (r, c) in enumerate(shapes) if 2 <= r <= 4 and 2 <= c <= 4
                 and read["predicted"][i] == read["targets"][i]), 0)
    (image,) = _grid_images(raw, [read["keys"][pick]])
    args = storage.read_json(inputs["finetune"]["model_config"])["model_args"]
    patches = torch.from_numpy(patchify(image, args["patch_size"], args["mean"], args["std"]))[None].to(device)
    shape = torch.tensor([[image.shape[0] // CELL, image.shape[1] // CELL]], device=device)
    weights = cross_attention(model, patches, shape, read["predicted"][pick])
    out["attention.png"] = pictures.attention_png(image, read["predicted"][pick], weights, args["patch_size"])
    return out


def evaluate_images(inputs: dict[str, dict[str, Any]], cfg: EvaluateConfig, grid_sets: list[str],
                    out_dir: str) -> tuple[dict[str, float], list[dict]]:
    """The ViT on single digits and the captioner on every grid set's validation and
    test grids; the test pictures are written to `out_dir`. Returns metrics and the
    written-out test grids of the training grid set (mistakes first)."""
    patches = inputs["patchify"]
    metrics = {
        **evaluate_vit(inputs["pretrain_vit"], patches["mnist_val"], cfg, "val"),
        **evaluate_vit(inputs["pretrain_vit"], patches["mnist_test"], cfg),
    }
    captioner, device = _load(inputs["finetune"], cfg)
    main = None
    for grid_set in grid_sets:
        for split in ("val", "test"):
            directory = patches[grid_output(grid_set, split)]
            scores, read = evaluate_captioner(captioner, device, directory, cfg, grid_set, split)
            metrics.update(scores)
            if grid_set == "grids" and split == "test":
                main = read
    for name, data in captioner_pictures(inputs, captioner, device, main).items():
        storage.write_bytes_atomic(storage.join(out_dir, name), data)
    examples = [{"key": main["keys"][i], "target": main["targets"][i], "predicted": main["predicted"][i]}
                for i in main["order"][:EXAMPLES]]
    return metrics, examples
