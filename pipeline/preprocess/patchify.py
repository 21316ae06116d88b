"""Images to ViT patch arrays: (num_patches, patch_size**2), normalised, raster order."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data.shards import ShardFormatError, ShardInfo, iter_shard, write_shard
from pipeline.models.patches import to_patches


def patchify(image: np.ndarray, patch_size: int, mean: float, std: float) -> np.ndarray:
    """(H, W) uint8 -> (H/p * W/p, p*p) float32, patches in row-major order."""
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 grayscale image, got shape {image.shape} dtype {image.dtype}")
    H, W = image.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image of {H}x{W} pixels is not a whole number of {p}x{p} patches")
    x = (image.astype(np.float32) / 255.0 - mean) / std
    return to_patches(torch.from_numpy(x), p).numpy()  # the one layout the models read


def patchify_shard(entry: dict, out_path: str, patch_size: int, mean: float, std: float) -> ShardInfo:
    """One image shard (a manifest entry, checked as read) -> patches; every non-image field
    (label `.cls`, target `.txt`, `.json` metadata) is kept alongside."""
    image_shard = entry["path"]

    def samples():
        for sample in iter_shard(image_shard, entry):
            if "png" not in sample:
                raise ShardFormatError(f"{image_shard}:{sample['__key__']} has no .png image")
            try:
                patches = patchify(sample.pop("png"), patch_size, mean, std)
            except ValueError as e:
                raise ShardFormatError(f"{image_shard}:{sample['__key__']}: {e}") from e
            yield {**sample, "npy": patches.astype(np.float16)}  # half the bytes, ample precision

    return write_shard(out_path, samples())
