"""GPT: a pre-LN causal decoder with learned positions and tied embeddings."""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers import Block, ModelShape, init_weights, numel
from .loss import cross_entropy


class GPT(nn.Module):
    def __init__(self, vocab_size: int, seq_len: int, cfg: ModelShape):
        super().__init__()
        self.vocab_size, self.seq_len, self.cfg = vocab_size, seq_len, cfg
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_head, cfg.dropout, causal=True) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.apply(init_weights)
        self.lm_head.weight = self.tok_emb.weight  # tied after init, so both see one tensor

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        T = idx.shape[1]
        if T > self.seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than the model's {self.seq_len}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def embedding_params(self) -> int:
        """Parameters in lookup tables; the tied output matrix counts as compute, not here."""
        return numel(self.pos_emb.weight)
