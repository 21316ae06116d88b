"""Scoring written grids against their targets, strictly: per digit, per cell, exact
match, shape errors, and accuracy by group (shape, number of rows). Cells are compared
over the union of the written and the true shape, so writing too much costs as much
as writing too little."""

from __future__ import annotations

from pipeline.geometry import BLANK

ABSENT = "·"  # the side of a cell pair that has no cell there: missing from the writing, or extra in it


def aligned_cells(predicted: str, target: str) -> list[tuple[str, str]]:
    """(true, written) for every cell of the union of both shapes, read at its row and
    column: a cell the writing lacks is (true, ABSENT), a cell it adds (ABSENT, written).
    Anything written that is not a cell (a stray token, `captioner.STRAY`) stays a cell
    of the writing, and is wrong wherever it stands."""
    pred_rows, true_rows = predicted.split("\n"), target.split("\n")
    cell = lambda rows, r, c: rows[r][c] if r < len(rows) and c < len(rows[r]) else ABSENT  # noqa: E731
    return [(cell(true_rows, r, c), cell(pred_rows, r, c))
            for r in range(max(len(pred_rows), len(true_rows)))
            for c in range(max(len(pred_rows[r]) if r < len(pred_rows) else 0,
                               len(true_rows[r]) if r < len(true_rows) else 0))]


def score_grids(predicted: list[str], target: list[str], prefix: str = "captioner_") -> dict[str, float]:
    """Strict scores of written grids: a wrong, a missing and an extra cell are each one
    error. Per-cell accuracy over the union of both shapes' cells; per-digit accuracy
    over the target's digit cells and every extra cell; blank accuracy over the target's
    blanks; exact match of the whole text; the shape-error rate (a wrong number of rows,
    or a row of the wrong length)."""
    cells = [pair for pred, true in zip(predicted, target) for pair in aligned_cells(pred, true)]
    digits = [got == want for want, got in cells if want != BLANK]  # an extra cell's `want` is ABSENT
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
    """Strict per-cell accuracy of each group of grids; `group` names a grid's group from
    its target rows, e.g. "3x5" by shape."""
    counts: dict[str, list[int]] = {}
    for pred, true in zip(predicted, target):
        tally = counts.setdefault(group(true.split("\n")), [0, 0])
        cells = aligned_cells(pred, true)
        tally[0] += sum(got == want for want, got in cells)
        tally[1] += len(cells)
    return {name: right / n for name, (right, n) in sorted(counts.items())}


def by_shape(rows: list[str]) -> str:
    return f"{len(rows)}x{len(rows[0])}"
