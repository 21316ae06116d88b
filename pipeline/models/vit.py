"""ViT: patch embedding, class token, learned positions, a pre-LN encoder."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Block, ModelShape, init_weights
from .patches import to_images, to_patches


class ConvStem(nn.Module):
    """Two 3x3 convolutions over the whole 28x28 image before it is cut into patches,
    so that each patch token also sees the pixels around its patch (a hybrid ViT's
    stem): on a few thousand digits the plain linear projection learns slowly."""

    def __init__(self, patch_size: int, channels: int, d_model: int):
        super().__init__()
        self.p, self.c = patch_size, channels
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.proj = nn.Linear(channels * patch_size * patch_size, d_model)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        B, P, _ = patches.shape
        p, g = self.p, int(round(P**0.5))
        features = F.gelu(self.conv2(F.gelu(self.conv1(to_images(patches, g, g, p).unsqueeze(1)))))
        tokens = to_patches(features, p).permute(0, 2, 1, 3).reshape(B, P, self.c * p * p)  # channels within a patch
        return self.proj(tokens)

    def training_flops(self, pixels: int, patches: int, trained: bool) -> float:
        """FLOPs of the stem on one image: forward, and with `trained` backward too (2x
        forward; the first convolution's input, the image, needs no gradient)."""
        conv1, conv2 = (2.0 * pixels * 9 * c.in_channels * c.out_channels for c in (self.conv1, self.conv2))
        proj = 2.0 * patches * self.proj.weight.numel()
        return (2 * conv1 + 3 * (conv2 + proj)) if trained else conv1 + conv2 + proj


class PatchEmbed(nn.Module):
    """Project flattened patches (linearly, or through a conv stem), prepend the class
    token, add positions.

    The class token and positions live here, not on the ViT, so that under
    ZeRO-3 they are gathered by this module's own forward wherever it is called.
    """

    def __init__(self, num_patches: int, patch_dim: int, d_model: int, stem_channels: int = 0):
        super().__init__()
        patch_size = int(round(patch_dim**0.5))
        self.proj = ConvStem(patch_size, stem_channels, d_model) if stem_channels else nn.Linear(patch_dim, d_model)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos_emb = nn.Parameter(torch.randn(1, num_patches + 1, d_model) * 0.02)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.proj(patches)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_emb[:, : x.shape[1]]


class ViT(nn.Module):
    def __init__(self, num_patches: int, patch_dim: int, num_classes: int, cfg: ModelShape, stem_channels: int = 0):
        super().__init__()
        self.num_patches, self.patch_dim, self.num_classes, self.cfg = num_patches, patch_dim, num_classes, cfg
        self.embed = PatchEmbed(num_patches, patch_dim, cfg.d_model, stem_channels)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_head, cfg.dropout, causal=False) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, num_classes)
        self.apply(init_weights)

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, num_patches, patch_dim) -> (B, 1 + num_patches, d_model), class token first."""
        x = self.drop(self.embed(patches))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, patches: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.head(self.encode(patches)[:, 0])
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return logits, loss

    def embedding_params(self) -> int:
        return self.embed.pos_emb.numel() + self.embed.cls_token.numel()

    def stem_flops(self, trained: bool) -> tuple[float, int]:
        """(FLOPs per image of a conv stem, its matmul weights, which the per-token count
        must leave out: the stem projects the patches, not the class token); (0, 0)
        without one."""
        stem = self.embed.proj
        if not isinstance(stem, ConvStem):
            return 0.0, 0
        return stem.training_flops(self.num_patches * self.patch_dim, self.num_patches, trained), stem.proj.weight.numel()
