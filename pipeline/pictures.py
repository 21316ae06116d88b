"""The captioner's pictures, each a PNG as bytes: test grids with the model's
writing under them (mistakes in red), the confusion matrix of single cells,
per-cell accuracy by grid shape, and where the decoder looks as it writes."""

from __future__ import annotations

import numpy as np

from pipeline.geometry import BLANK
from pipeline.scoring import ABSENT, aligned_cells
from pipeline.plotting import png, pyplot

CELL_LABELS = [*"0123456789", BLANK]  # a confusion matrix's classes: digits, then blank


def confusion(predicted: list[str], targets: list[str]) -> np.ndarray:
    """Counts (12, 12): rows the true cell (digits, blank, none: a cell the writing
    added), columns what was written (digits, blank, none or not a cell)."""
    index = {c: i for i, c in enumerate(CELL_LABELS)}
    other = len(CELL_LABELS)
    counts = np.zeros((other + 1, other + 1), dtype=np.int64)
    for pred, true in zip(predicted, targets):
        for t, p in aligned_cells(pred, true):
            counts[index.get(t, other), index.get(p, other)] += 1
    return counts


def confusion_png(counts: np.ndarray, title: str) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    rates = counts / np.maximum(1, counts.sum(1, keepdims=True))
    ax.imshow(np.log10(rates + 1e-4), cmap="Blues")
    for (i, j), n in np.ndenumerate(counts):
        if n:
            ax.text(j, i, str(n), ha="center", va="center", fontsize=7, color="white" if rates[i, j] > 0.5 else "black")
    names = [c if c != BLANK else "blank" for c in CELL_LABELS] + ["none"]
    ax.set_xticks(range(counts.shape[1]), names, rotation=45)
    ax.set_yticks(range(counts.shape[0]), names)
    ax.set_xlabel("written (none: no cell there, or not a cell)")
    ax.set_ylabel("true cell (none: a cell the writing added)")
    ax.set_title(title)
    return png(fig)


def samples_png(images: list[np.ndarray], predicted: list[str], targets: list[str], title: str) -> bytes:
    """Grids side by side, the model's writing under each: right cells black, wrong red,
    a missing cell as a red dot, and an extra cell or row in red after the rest."""
    plt = pyplot()
    n = len(images)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 4.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, pred, true in zip(axes.flat, images, predicted, targets):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        true_rows, pred_rows = true.split("\n"), pred.split("\n")
        size = max(6.0, 11.0 - len(true_rows[0]) * 0.5)
        for r in range(max(len(true_rows), len(pred_rows))):
            want = true_rows[r] if r < len(true_rows) else ""
            got = pred_rows[r] if r < len(pred_rows) else ""
            for c in range(max(len(want), len(got))):
                ch = got[c] if c < len(got) else ABSENT
                right = c < len(want) and ch == want[c]
                ax.text(c / max(len(want), len(got), 1), -0.06 - 0.07 * r, ch, transform=ax.transAxes,
                        fontsize=size, family="monospace", color="black" if right else "red", va="top")
    fig.suptitle(title)
    return png(fig)


def by_shape_png(accuracy: dict[str, float], title: str) -> bytes:
    """Per-cell accuracy of each rows x columns shape, as a heat map."""
    plt = pyplot()
    grid = np.full((10, 10), np.nan)
    for shape, acc in accuracy.items():
        r, c = (int(v) for v in shape.split("x"))
        grid[r - 1, c - 1] = acc
    fig, ax = plt.subplots(figsize=(6.0, 5.0))
    image = ax.imshow(grid, cmap="viridis", vmin=max(0.0, float(np.nanmin(grid)) - 0.01), vmax=1.0, origin="lower",
                      extent=(0.5, 10.5, 0.5, 10.5))
    for (r, c), acc in np.ndenumerate(grid):
        if not np.isnan(acc):
            ax.text(c + 1, r + 1, f"{100 * acc:.0f}", ha="center", va="center", fontsize=6, color="white")
    fig.colorbar(image, ax=ax, label="per-cell accuracy")
    ax.set_xlabel("columns")
    ax.set_ylabel("rows")
    ax.set_title(title)
    return png(fig)


def attention_png(image: np.ndarray, written: str, weights: np.ndarray, patch_size: int) -> bytes:
    """For each written cell, the decoder's cross-attention (last layer, heads
    averaged) over the image's patches: `weights` (steps, rows*g, cols*g)."""
    plt = pyplot()
    chars = [ch for ch in written if ch != "\n"][: len(weights)]
    n = len(chars)
    cols = min(8, n + 1)
    rows = (n + 1 + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(image, cmap="gray")
    axes.flat[0].set_title("image", fontsize=8)
    H, W = image.shape
    for ax, ch, w in zip(list(axes.flat)[1:], chars, weights):
        ax.imshow(image, cmap="gray")
        ax.imshow(np.kron(w, np.ones((patch_size, patch_size)))[:H, :W], cmap="inferno", alpha=0.6)
        ax.set_title(f"writes {ch!r}", fontsize=8)
    fig.suptitle("decoder cross-attention while writing each cell")
    return png(fig)
