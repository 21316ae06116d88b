"""`pipeline predict`: write out the digits of grid images with a fine-tuned captioner.

Images follow the grid convention: grayscale PNG (or any format Pillow reads),
light digits on a dark background, 28x28-pixel cells, 1 to 10 rows and columns.
The image's size says its rows and columns; nothing else is given to the model.
An image that breaks the convention is refused with its name and what is wrong.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.geometry import CELL, PatchLayout
from pipeline.models.captioner import MAX_GRID
from pipeline.train.checkpoint import CheckpointError, find_trained


class ImageError(ValueError):
    """An image that does not follow the grid convention."""


def read_grid_image(path: str) -> np.ndarray:
    """(28R, 28C) uint8 pixels of a grid image, or an ImageError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            mode, (width, height) = image.mode, image.size
            pixels = np.asarray(image)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(f"{path}: not a readable image ({e})") from None
    if mode not in ("L", "1"):
        raise ImageError(f"{path}: a {mode} image; grids are grayscale (mode L), light digits on dark")
    for side, size in (("width", width), ("height", height)):
        if size == 0 or size % CELL:
            raise ImageError(f"{path}: {side} {size} px is not a whole number of {CELL}-pixel cells")
        if size // CELL > MAX_GRID:
            raise ImageError(f"{path}: {side} {size} px is {size // CELL} cells; at most {MAX_GRID} per side")
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    if float(pixels.mean()) > 127:
        raise ImageError(f"{path}: mostly light (mean {pixels.mean():.0f} of 255); grids are light digits on a dark background")
    return pixels


@dataclass
class Trained:
    model: Any
    layout: PatchLayout  # how its encoder cuts and normalises a cell


def load_captioner(directory: str) -> Trained:
    from pipeline.kinds import KINDS, load_trained, read_model_config

    if not storage.exists(directory):
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    config_path, weights_path = find_trained(directory)
    kind, _ = read_model_config(config_path)
    if kind is not KINDS["captioner"]:
        raise CheckpointError(f"{directory}: holds a {kind.name} model, not the captioner (the fine-tune stage's)")
    _, cfg, model = load_trained(config_path, weights_path)
    return Trained(model, cfg.encoder.patches)


def predict(trained: Trained, images: list[np.ndarray], batch_size: int = 64) -> list[list[str]]:
    """Each grid image's rows, as written by the model."""
    import torch

    from pipeline.preprocess.patchify import patchify

    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        layout = trained.layout
        patches = [torch.from_numpy(patchify(im, layout.patch_size, layout.mean, layout.std)) for im in batch]
        padded = torch.nn.utils.rnn.pad_sequence(patches, batch_first=True)
        shapes = torch.tensor([[im.shape[0] // CELL, im.shape[1] // CELL] for im in batch])
        out += [text.split("\n") for text in trained.model.generate(padded, shapes)]
    return out


def predict_command(checkpoint: str, paths: list[str], as_json: bool, batch_size: int) -> str:
    """Every image is checked before the model is loaded: a bad one fails fast, by name."""
    import json
    import sys

    if batch_size < 1:
        raise ImageError(f"--batch-size must be >= 1, got {batch_size}")
    images = [read_grid_image(p) for p in paths]
    trained = load_captioner(checkpoint)
    start = time.perf_counter()
    written = predict(trained, images, batch_size)
    seconds = time.perf_counter() - start
    print(f"predicted {len(written)} grids in {seconds:.2f}s ({len(written) / seconds:.1f} grids/s)", file=sys.stderr)
    if as_json:
        return "\n".join(json.dumps({"image": p, "rows": rows}) for p, rows in zip(paths, written))
    if len(paths) == 1:
        return "\n".join(written[0])
    return "\n\n".join(f"{p}:\n" + "\n".join(rows) for p, rows in zip(paths, written))
