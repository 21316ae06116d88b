"""The two training augmentations of images as patches: a random shift by whole
pixels (`KeyedShift`, single digits), and a random affine distortion of every
28x28 cell (`KeyedAffine`): rotation, scale, shear and shift, as handwriting
varies. A single digit is one cell; a grid's cells are each distorted on their
own, inside their own 28x28 square.

What a sample gets is drawn from (seed, epoch, sample key) alone, so it is the
same whichever rank or loader worker reads the sample, and a resumed run redraws
exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import AugmentConfig
from pipeline.data.order import key_hash, key_hashes
from pipeline.geometry import CELL
from pipeline.models.patches import to_images, to_patches


class KeyedShift:
    """Shift each 28x28 image of a batch (as patches) by up to `max_shift` pixels either
    way, filling with background."""

    def __init__(self, seed: int, patch_size: int, max_shift: int, background: float):
        self.seed, self.p, self.m, self.background = seed, patch_size, max_shift, background

    def offsets(self, keys: list[str], epochs: np.ndarray) -> np.ndarray:
        span = 2 * self.m + 1
        h = key_hashes(f"{self.seed}:{e}:{k}" for k, e in zip(keys, np.asarray(epochs).tolist()))
        return np.stack([h % span, (h // span) % span], axis=1).astype(np.int64)  # (dx, dy) per sample

    def __call__(self, batch: dict[str, Any], epochs: np.ndarray) -> dict[str, Any]:
        patches = batch["npy"]
        flat = patches.reshape(len(patches), -1)
        # One gather in the patch layout, from the pixels and one background value after them.
        source = torch.cat([flat, flat.new_full((len(flat), 1), self.background)], dim=1)
        dx, dy = self.offsets(batch["__key__"], epochs).T
        g = int(round(patches.shape[1] ** 0.5))
        pixels = _shift_sources(g, self.p, self.m)[torch.from_numpy(dy * (2 * self.m + 1) + dx)]
        return {**batch, "npy": source.gather(1, pixels).reshape(patches.shape)}


@functools.lru_cache(maxsize=16)
def _shift_sources(g: int, p: int, m: int) -> torch.Tensor:
    """For each shift (dx, dy) in [0, 2m]^2, row dy * (2m + 1) + dx: where each pixel of the
    shifted image, in the (g x g patches of p x p) layout, comes from: the pixel (y + dy - m,
    x + dx - m) of the image, in the same layout, or the background (index g*g*p*p) outside it."""
    size = g * p
    image_of = to_patches(torch.arange(size * size).reshape(size, size), p).flatten()  # layout -> image index
    layout_of = torch.argsort(image_of)  # image index -> layout
    y, x = image_of // size, image_of % size
    rows = []
    for dy in range(2 * m + 1):
        for dx in range(2 * m + 1):
            sy, sx = y + dy - m, x + dx - m
            inside = (sy >= 0) & (sy < size) & (sx >= 0) & (sx < size)
            rows.append(torch.where(inside, layout_of[(sy.clamp(0, size - 1) * size + sx.clamp(0, size - 1))], size * size))
    return torch.stack(rows)


class KeyedAffine:
    """Distort every cell of a batch of single digits or grids (as patches)."""

    def __init__(self, cfg: AugmentConfig, seed: int, patch_size: int, background: float):
        self.cfg, self.seed, self.p, self.background = cfg, seed, patch_size, background

    def draws(self, key: str, epoch: int, cells: int) -> np.ndarray:
        """(cells, 5) uniform draws in [-1, 1): rotation, shear, scale, dx, dy."""
        rng = np.random.default_rng(key_hash(f"{self.seed}:{epoch}:{key}"))
        return rng.uniform(-1.0, 1.0, size=(cells, 5))

    def matrices(self, draws: np.ndarray) -> torch.Tensor:
        """The (N, 2, 3) maps from output to input coordinates that affine_grid takes."""
        c = self.cfg
        rot, shear = draws[:, 0] * math.radians(c.rotate), draws[:, 1] * math.radians(c.shear)
        scale = 1.0 + draws[:, 2] * c.scale
        m = np.zeros((len(draws), 2, 3))
        m[:, 0, 0] = np.cos(rot) / scale
        m[:, 0, 1] = (-np.sin(rot) + np.tan(shear) * np.cos(rot)) / scale
        m[:, 1, 0] = np.sin(rot) / scale
        m[:, 1, 1] = np.cos(rot) / scale
        m[:, :, 2] = draws[:, 3:] * c.shift / (CELL / 2)  # pixels -> [-1, 1] coordinates
        return torch.from_numpy(m).float()

    def distort(self, cells: torch.Tensor, draws: np.ndarray) -> torch.Tensor:
        """(N, 28, 28) normalised cells, distorted; what moves in from outside is background."""
        x = (cells - self.background).unsqueeze(1)
        grid = F.affine_grid(self.matrices(draws).to(x.device), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, align_corners=False).squeeze(1) + self.background

    def __call__(self, batch: dict[str, Any], epochs: np.ndarray) -> dict[str, Any]:
        patches = batch["npy"]
        shapes = batch["json"].tolist() if "json" in batch else [(1, 1)] * len(patches)
        g = CELL // self.p
        cells, draws = [], []
        for sample, (rows, cols), key, epoch in zip(patches, shapes, batch["__key__"], epochs):
            image = to_images(sample[: rows * cols * g * g], rows * g, cols * g, self.p)
            cells.append(to_patches(image, CELL).view(rows * cols, CELL, CELL))  # a cell is a 28-pixel patch
            draws.append(self.draws(key, int(epoch), rows * cols))
        distorted = self.distort(torch.cat(cells), np.concatenate(draws)).split([len(c) for c in cells])
        out = patches.clone()
        for i, (d, (rows, cols)) in enumerate(zip(distorted, shapes)):
            image = to_images(d.reshape(rows * cols, CELL * CELL), rows, cols, CELL)
            out[i, : rows * cols * g * g] = to_patches(image, self.p)
        return {**batch, "npy": out}
