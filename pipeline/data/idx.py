"""MNIST's own file format, IDX: a big-endian header (magic number, then one 32-bit
size per dimension) and the raw uint8 values. Image files are magic 2051 with three
dimensions (N, 28, 28), label files 2049 with one (N). Either may be gzipped.

Every check names the file: a wrong magic number, dimensions other than 28x28, a
length that does not match the header, labels outside 0-9, image and label files of
different counts.
"""

from __future__ import annotations

import functools
import gzip
import struct

import numpy as np

from pipeline import storage
from pipeline.geometry import CELL

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # 0x0803: uint8, 3 dimensions; 0x0801: uint8, 1 dimension


class IdxError(ValueError):
    """An IDX file that is not what MNIST's files are."""


def _read(path: str) -> bytes:
    try:
        raw = storage.read_bytes(path)
    except OSError as e:
        raise IdxError(f"{path}: cannot read ({e.strerror or e})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise IdxError(f"{path}: a damaged gzip file ({e})") from None
    return raw


def _parse(path: str, raw: bytes, magic: int, dims: int) -> np.ndarray:
    what = "image" if magic == IMAGES_MAGIC else "label"
    header = 4 + 4 * dims
    if len(raw) < header:
        raise IdxError(f"{path}: {len(raw)} bytes, shorter than an IDX {what} file's header")
    found = struct.unpack(">I", raw[:4])[0]
    if found != magic:
        raise IdxError(f"{path}: magic number {found}, expected {magic} (an IDX {what} file of uint8)")
    shape = struct.unpack(f">{dims}I", raw[4:header])
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise IdxError(f"{path}: {len(raw)} bytes, the header {shape} says {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


@functools.lru_cache(maxsize=2)
def read_images(path: str) -> np.ndarray:
    """(N, 28, 28) uint8 digits; kept for the process's later tasks on the same file."""
    images = _parse(path, _read(path), IMAGES_MAGIC, 3)
    if images.shape[1:] != (CELL, CELL):
        raise IdxError(f"{path}: images of {images.shape[2]}x{images.shape[1]} pixels; digits must be {CELL}x{CELL}")
    return images


def read_labels(path: str) -> np.ndarray:
    """(N,) int64 labels, each 0-9."""
    labels = _parse(path, _read(path), LABELS_MAGIC, 1).astype(np.int64)
    if labels.size and labels.max() > 9:
        raise IdxError(f"{path}: label {labels.max()} at position {int(labels.argmax())}; labels must be 0-9")
    return labels
