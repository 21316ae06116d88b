"""Images and their patches, as torch tensors: the one place that knows the layout
(patches in raster order, each patch's pixels in raster order), as
`preprocess/patchify.py` writes it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_images(patches: torch.Tensor, rows: int, cols: int, p: int) -> torch.Tensor:
    """(..., rows*cols, p*p) patches -> (..., rows*p, cols*p) images."""
    lead = patches.shape[:-2]
    return patches.reshape(*lead, rows, cols, p, p).transpose(-3, -2).reshape(*lead, rows * p, cols * p)


def to_patches(images: torch.Tensor, p: int) -> torch.Tensor:
    """(..., H, W) images -> (..., H/p * W/p, p*p) patches."""
    *lead, H, W = images.shape
    return images.reshape(*lead, H // p, p, W // p, p).transpose(-3, -2).reshape(*lead, (H // p) * (W // p), p * p)


def shifted(images: torch.Tensor, shift: int) -> list[torch.Tensor]:
    """(..., H, W) images moved `shift` pixels right, left, down and up (four copies),
    the edge row or column repeated into the space left behind."""
    s = shift
    padded = F.pad(images.unsqueeze(-3), (s, s, s, s), mode="replicate").squeeze(-3)
    H, W = images.shape[-2:]
    return [padded[..., s + dy : s + dy + H, s + dx : s + dx + W] for dx, dy in ((-s, 0), (s, 0), (0, -s), (0, s))]
