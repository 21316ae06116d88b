"""ViT: patch embedding, class token, learned positions, a pre-LN encoder."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import TransformerConfig
from pipeline.models.layers import Block, init_weights


class PatchEmbed(nn.Module):
    """Project flattened patches, prepend the class token, add positions.

    The class token and positions live here, not on the ViT, so that under
    ZeRO-3 they are gathered by this module's own forward wherever it is called.
    """

    def __init__(self, num_patches: int, patch_dim: int, d_model: int):
        super().__init__()
        self.proj = nn.Linear(patch_dim, d_model)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos_emb = nn.Parameter(torch.randn(1, num_patches + 1, d_model) * 0.02)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.proj(patches)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_emb[:, : x.shape[1]]


class ViT(nn.Module):
    def __init__(self, num_patches: int, patch_dim: int, num_classes: int, cfg: TransformerConfig):
        super().__init__()
        self.num_patches, self.patch_dim, self.num_classes, self.cfg = num_patches, patch_dim, num_classes, cfg
        self.embed = PatchEmbed(num_patches, patch_dim, cfg.d_model)
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
