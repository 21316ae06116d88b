"""`pipeline compose`: a grid image of chosen text, drawn from one split's digit shards.

The picture a person hands to `pipeline predict` to see the captioner read something
they chose: row by row, a digit or `_` (blank) per cell, each digit cell a different
real digit of that class from the split (the split's digits in shard order; `--skip N`
starts each class N digits in). The image follows the grid convention `predict` reads.
"""

from __future__ import annotations

import os

import numpy as np

from pipeline import storage
from pipeline.data.shards import encode_png
from pipeline.data.sources import compose_grid, load_digit_shards
from pipeline.geometry import BLANK
from pipeline.models.captioner import MAX_GRID


class ComposeError(ValueError):
    """Text that no grid image can show, or a split without enough digits for it."""


def check_request(rows: list[str], skip: int = 0) -> None:
    if skip < 0:
        raise ComposeError(f"--skip {skip}: the digits to skip of each class is a count, >= 0")
    if not rows or len(rows) > MAX_GRID:
        raise ComposeError(f"{len(rows)} rows; a grid has 1 to {MAX_GRID}")
    for n, row in enumerate(rows, 1):
        if not 1 <= len(row) <= MAX_GRID:
            raise ComposeError(f"row {n} {row!r} has {len(row)} cells; a row has 1 to {MAX_GRID}")
        if len(row) != len(rows[0]):
            raise ComposeError(f"row {n} {row!r} has {len(row)} cells, row 1 has {len(rows[0])}; a grid is a rectangle")
        wrong = sorted(set(row) - set("0123456789" + BLANK))
        if wrong:
            raise ComposeError(f"row {n} {row!r}: {wrong[0]!r} is not a digit or {BLANK!r}")


def compose(images: np.ndarray, labels: np.ndarray, rows: list[str], skip: int = 0) -> tuple[np.ndarray, list[int]]:
    """(28R, 28C) uint8 pixels showing `rows`, and the index into `images` of each
    digit cell, row-major. No digit is used twice."""
    check_request(rows, skip)
    by_class = {d: np.flatnonzero(labels == d) for d in range(10)}
    taken = {d: skip for d in range(10)}
    blank = np.array([[char == BLANK for char in row] for row in rows])
    index = np.zeros(blank.shape, dtype=np.int64)
    for (r, c), char in np.ndenumerate(np.array([list(row) for row in rows])):
        if char == BLANK:
            continue
        d = int(char)
        if taken[d] >= len(by_class[d]):
            raise ComposeError(f"the split holds {len(by_class[d])} digits of class {d}; "
                               f"this grid needs {taken[d] + 1 - skip} from digit {skip} on")
        index[r, c] = by_class[d][taken[d]]
        taken[d] += 1
    return compose_grid(images[index], blank), [int(i) for i in index[~blank]]


def compose_command(digits_dir: str, rows: list[str], out: str, skip: int = 0) -> str:
    check_request(rows, skip)  # before reading any shard
    if os.path.exists(out):
        raise ComposeError(f"{out} exists; compose writes a new image")
    images, labels, _ = load_digit_shards(digits_dir)
    picture, used = compose(images, labels, rows, skip)
    storage.write_bytes_atomic(out, encode_png(picture))
    return f"{out}: a {len(rows)}x{len(rows[0])} grid of {len(used)} digits from {digits_dir}"
