"""The captioner: a pretrained ViT reads a grid of digits, a causal decoder
with cross-attention writes them out, row by row.

Grid images are made of 28x28 cells, so the encoder tiles the image into its
cells, runs the ViT on every cell (the resolution it was pretrained at, no
position interpolation needed) and tags each cell's tokens with a learned row
and column embedding. The decoder cross-attends to all cells' tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import TransformerConfig
from pipeline.models.layers import Block, init_weights
from pipeline.models.vit import ViT

# The written form of a grid: digits, '_' for a blank cell, '\n' between rows.
PAD, BOS, EOS = 0, 1, 2
VOCAB = ["<pad>", "<bos>", "<eos>", "\n", "_", *"0123456789"]
CHAR_TO_ID = {c: i for i, c in enumerate(VOCAB) if i > EOS}
MAX_GRID = 10
MAX_TEXT_LEN = MAX_GRID * (MAX_GRID + 1)  # 10 rows of 10 cells, newlines, EOS


def encode_text(text: str) -> list[int]:
    """BOS + characters + EOS."""
    try:
        return [BOS, *(CHAR_TO_ID[c] for c in text), EOS]
    except KeyError as e:
        raise ValueError(f"grid text may only hold digits, '_' and newlines, got {e.args[0]!r}") from None


def decode_ids(ids: list[int]) -> str:
    out = []
    for i in ids:
        if i == EOS:
            break
        if i > EOS:
            out.append(VOCAB[i])
    return "".join(out)


class Captioner(nn.Module):
    def __init__(self, encoder: ViT, cfg: TransformerConfig, patch_grid: int):
        super().__init__()
        self.cfg, self.patch_grid = cfg, patch_grid  # patch_grid: patches per cell side
        self.encoder = encoder
        d_enc = encoder.cfg.d_model
        self.row_emb = nn.Embedding(MAX_GRID, d_enc)
        self.col_emb = nn.Embedding(MAX_GRID, d_enc)
        self.memory_proj = nn.Linear(d_enc, cfg.d_model) if d_enc != cfg.d_model else nn.Identity()
        self.tok_emb = nn.Embedding(len(VOCAB), cfg.d_model)
        self.pos_emb = nn.Embedding(MAX_TEXT_LEN + 1, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(cfg.d_model, cfg.n_head, cfg.dropout, causal=True, cross=True) for _ in range(cfg.n_layer)
        )
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, len(VOCAB), bias=False)
        for module in (self.row_emb, self.col_emb, self.memory_proj, self.tok_emb, self.pos_emb, self.blocks, self.lm_head):
            module.apply(init_weights)
        self.lm_head.weight = self.tok_emb.weight

    def encode(self, patches: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """(B, rows*g*cols*g, patch_dim) raster-order patches -> (B, cells*(1+g*g), d) memory."""
        B, P, D = patches.shape
        g = self.patch_grid
        if P != rows * cols * g * g:
            raise ValueError(f"{P} patches do not tile a {rows}x{cols} grid of {g}x{g}-patch cells")
        cells = patches.view(B, rows, g, cols, g, D).permute(0, 1, 3, 2, 4, 5).reshape(B * rows * cols, g * g, D)
        tokens = self.encoder.encode(cells)  # (B*cells, 1+g*g, d_enc)
        r = torch.arange(rows, device=patches.device).repeat_interleave(cols)
        c = torch.arange(cols, device=patches.device).repeat(rows)
        where = (self.row_emb(r) + self.col_emb(c)).repeat(B, 1).unsqueeze(1)
        tokens = (tokens + where).view(B, rows * cols * tokens.shape[1], -1)
        return self.memory_proj(tokens)

    def decode(self, memory: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok_emb(ids) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x, context=memory)
        return self.lm_head(self.ln_f(x))

    def forward(self, patches: torch.Tensor, rows: int, cols: int, ids: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.decode(self.encode(patches, rows, cols), ids)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=PAD)
        return logits, loss

    @torch.no_grad()
    def generate(self, patches: torch.Tensor, rows: int, cols: int) -> list[str]:
        """Greedy decoding of a batch of grids of one shape."""
        memory = self.encode(patches, rows, cols)
        ids = torch.full((patches.shape[0], 1), BOS, dtype=torch.long, device=patches.device)
        max_len = rows * (cols + 1)  # every cell, a newline per row but the last, EOS
        done = torch.zeros(patches.shape[0], dtype=torch.bool, device=patches.device)
        for _ in range(max_len):
            next_id = self.decode(memory, ids)[:, -1].argmax(-1)
            next_id = torch.where(done, torch.full_like(next_id, PAD), next_id)
            ids = torch.cat([ids, next_id[:, None]], dim=1)
            done |= next_id == EOS
            if bool(done.all()):
                break
        return [decode_ids(row[1:].tolist()) for row in ids]

    def embedding_params(self) -> int:
        return self.pos_emb.weight.numel() + self.row_emb.weight.numel() + self.col_emb.weight.numel() + self.encoder.embedding_params()
