"""The grid and patch geometry every stage agrees on.

A digit is one 28x28-pixel cell; a grid image is rows x cols cells. A cell is cut
into square patches of `patch_size` pixels, patches in raster order and each
patch's pixels in raster order (`models/patches.py` holds that layout for
tensors; the model files cannot import this module, as they ship on their own in
an exported folder).
"""

from __future__ import annotations

from dataclasses import dataclass

CELL = 28  # pixels per side of a grid cell: one MNIST digit
NUM_CLASSES = 10  # digits
BLANK = "_"  # a blank cell in a grid's written form


@dataclass(frozen=True)
class PatchLayout:
    """How a cell is cut into patches, and how pixels (0-255) are normalised."""

    patch_size: int = 7
    mean: float = 0.1307  # MNIST pixel statistics
    std: float = 0.3081

    @property
    def per_side(self) -> int:
        """Patches along one side of a cell."""
        return CELL // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patches in one cell."""
        return self.per_side**2

    @property
    def patch_dim(self) -> int:
        """Pixels in one patch."""
        return self.patch_size**2

    @property
    def background(self) -> float:
        """A black pixel, normalised: what augmentations fill with."""
        return -self.mean / self.std
