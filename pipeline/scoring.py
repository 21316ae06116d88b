"""Scoring written grids against their targets: per digit, per cell, exact match,
shape errors, and accuracy by group (shape, number of rows)."""

from __future__ import annotations

from pipeline.geometry import BLANK

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
