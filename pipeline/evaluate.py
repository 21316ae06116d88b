"""Held-out metrics: GPT validation loss, perplexity and the unigram baseline;
ViT test accuracy; captioner per-digit accuracy and whole-grid exact match."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import EvaluateConfig
from pipeline.data.shards import shard_paths
from pipeline.data.sources import BLANK
from pipeline.train.checkpoint import load_trained
from pipeline.train.data import load_table

EXAMPLES = 16  # test grids written out for a person to read, mistakes first


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats) of the empirical token distribution: the loss of the best
    model that ignores context."""
    counts = np.bincount(tokens.ravel())
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@torch.no_grad()
def evaluate_gpt(trained: dict[str, Any], tokens_val: str, cfg: EvaluateConfig) -> dict[str, float]:
    model = load_trained(trained["model_config"], trained["weights"])
    seqs = load_table(shard_paths(tokens_val), {"npy": lambda a: a.astype(np.int64)}).columns["npy"][: cfg.max_val_sequences]
    total, count = 0.0, 0
    for s in _batches(len(seqs), cfg.batch_size):
        batch = torch.from_numpy(seqs[s])
        logits, _ = model(batch[:, :-1])
        total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"))
        count += batch[:, 1:].numel()
    loss = total / count
    return {
        "gpt_val_loss": loss,
        "gpt_val_ppl": math.exp(loss),
        "gpt_unigram_entropy": unigram_entropy(seqs[:, 1:]),
        "gpt_val_tokens": float(count),
    }


@torch.no_grad()
def evaluate_vit(trained: dict[str, Any], patches_test: str, cfg: EvaluateConfig) -> dict[str, float]:
    model = load_trained(trained["model_config"], trained["weights"])
    table = load_table(shard_paths(patches_test), {"npy": lambda a: a.astype(np.float32), "cls": int})
    x, y = table.columns["npy"], table.columns["cls"]
    correct = 0
    for s in _batches(len(y), cfg.batch_size):
        logits, _ = model(torch.from_numpy(x[s]))
        correct += int((logits.argmax(-1).numpy() == y[s]).sum())
    return {"vit_test_accuracy": correct / len(y), "vit_test_images": float(len(y))}


def score_grids(predicted: list[str], target: list[str]) -> dict[str, float]:
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
    scores = {
        "captioner_per_digit_accuracy": digits_right / max(1, digits),
        "captioner_exact_match": exact / max(1, len(target)),
    }
    if blanks:
        scores["captioner_blank_accuracy"] = blanks_right / blanks
    return scores


@torch.no_grad()
def evaluate_captioner(trained: dict[str, Any], grids_test: str, cfg: EvaluateConfig) -> tuple[dict[str, float], list[dict]]:
    """Metrics, and a few written-out test grids (mistakes first) for a person to read."""
    model = load_trained(trained["model_config"], trained["weights"])
    fields = {"__key__": str, "npy": lambda a: a.astype(np.float32), "txt": str, "json": lambda m: (m["rows"], m["cols"])}
    table = load_table(shard_paths(grids_test), fields)
    x, texts, shapes = table.columns["npy"], list(table.columns["txt"]), table.columns["json"]
    predicted: list[str] = []
    for s in _batches(len(texts), cfg.batch_size):
        rows, cols = (int(v) for v in shapes[s.start])
        predicted += model.generate(torch.from_numpy(x[s]), rows, cols)
    keys = table.columns["__key__"]
    wrong_first = sorted(range(len(texts)), key=lambda i: predicted[i] == texts[i])[:EXAMPLES]
    examples = [{"key": str(keys[i]), "target": texts[i], "predicted": predicted[i]} for i in wrong_first]
    return {**score_grids(predicted, texts), "captioner_test_grids": float(len(texts))}, examples
