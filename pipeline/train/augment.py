"""Random affine distortion of every 28x28 cell of a batch: rotation, scale, shear
and shift, as handwriting varies. A single digit is one cell; a grid's cells are
each distorted on their own, inside their own 28x28 square.

A cell's distortion is drawn from a generator keyed by (seed, epoch, sample key)
alone, so it is the same whichever rank or loader worker reads the sample, and a
resumed run redraws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import AugmentConfig
from pipeline.models.patches import to_images, to_patches

CELL = 28


class KeyedAffine:
    def __init__(self, cfg: AugmentConfig, seed: int, patch_size: int, background: float):
        self.cfg, self.seed, self.p, self.background = cfg, seed, patch_size, background

    def draws(self, key: str, epoch: int, cells: int) -> np.ndarray:
        """(cells, 5) uniform draws in [-1, 1): rotation, shear, scale, dx, dy."""
        from pipeline.data.order import key_hash

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
