"""Held-out metrics: GPT validation loss, perplexity and the unigram baseline;
ViT test accuracy; captioner per-digit accuracy and whole-grid exact match.

`evaluate_all` is what the evaluate stage runs as a Ray task (on a GPU when
`evaluate.use_gpu` is set): the driver only schedules it."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import EvaluateConfig
from pipeline.data.loader import head_batches
from pipeline.data.shards import read_manifest, shard_entries
from pipeline.data.sources import BLANK
from pipeline.train.checkpoint import load_trained

EXAMPLES = 16  # test grids written out for a person to read, mistakes first


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


def score_grids(predicted: list[str], target: list[str], split: str = "test") -> dict[str, float]:
    """Per-digit accuracy over the target's digit cells, blank-cell accuracy, and
    exact match of the whole written grid. A missing or extra cell counts wrong."""
    digits = digits_right = blanks = blanks_right = exact = 0
    for pred, true in zip(predicted, target):
        exact += pred == true
        pred_rows = pred.split("\n")
        for r, row in enumerate(true.split("\n")):
            for c, ch in enumerate(row):
                got = pred_rows[r][c] if r < len(pred_rows) and c < len(pred_rows[r]) else None
                if ch == BLANK:
                    blanks += 1
                    blanks_right += got == ch
                else:
                    digits += 1
                    digits_right += got == ch
    prefix = "captioner_" if split == "test" else f"captioner_{split}_"
    scores = {
        f"{prefix}per_digit_accuracy": digits_right / max(1, digits),
        f"{prefix}exact_match": exact / max(1, len(target)),
    }
    if blanks:
        scores[f"{prefix}blank_accuracy"] = blanks_right / blanks
    return scores


@torch.no_grad()
def evaluate_captioner(trained: dict[str, Any], grids: str, cfg: EvaluateConfig, split: str = "test") -> tuple[dict[str, float], list[dict]]:
    """Metrics, and a few written-out grids (mistakes first) for a person to read."""
    model, device = _load(trained, cfg)
    fields = {"npy": lambda a: a.astype(np.float32), "txt": str, "json": lambda m: (m["rows"], m["cols"])}
    keys: list[str] = []
    texts: list[str] = []
    predicted: list[str] = []
    for batch in _batches(grids, fields, cfg.batch_size):
        rows, cols = (int(v) for v in batch["json"][0])
        predicted += model.generate(batch["npy"].to(device), rows, cols)
        keys += batch["__key__"]
        texts += [str(t) for t in batch["txt"]]
    wrong_first = sorted(range(len(texts)), key=lambda i: predicted[i] == texts[i])[:EXAMPLES]
    examples = [{"key": keys[i], "target": texts[i], "predicted": predicted[i]} for i in wrong_first]
    count_key = "captioner_test_grids" if split == "test" else f"captioner_{split}_grids"
    return {**score_grids(predicted, texts, split), count_key: float(len(texts))}, examples


def evaluate_all(inputs: dict[str, dict[str, Any]], cfg: EvaluateConfig) -> tuple[dict[str, float], list[dict]]:
    """Every model on its held-out data (`inputs`: the upstream stages' outputs):
    metrics, and the captioner's written-out test grids."""
    patches = inputs["patchify"]
    captioner_test, examples = evaluate_captioner(inputs["finetune"], patches["grids_test"], cfg)
    captioner_val, _ = evaluate_captioner(inputs["finetune"], patches["grids_val"], cfg, "val")
    metrics = {
        **evaluate_gpt(inputs["pretrain_gpt"], inputs["tokenize"]["tokens_val"], cfg),
        **evaluate_vit(inputs["pretrain_vit"], patches["mnist_val"], cfg, "val"),
        **evaluate_vit(inputs["pretrain_vit"], patches["mnist_test"], cfg),
        **captioner_val,
        **captioner_test,
    }
    return metrics, examples
