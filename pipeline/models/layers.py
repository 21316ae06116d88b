"""Transformer building blocks shared by the GPT, the ViT and the captioner."""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from .recompute import checkpointed


class ModelShape(Protocol):
    """What a model reads of its config (`pipeline.config.TransformerConfig` in the pipeline)."""

    n_layer: int
    n_head: int
    d_model: int
    dropout: float


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None.

    `mask` (B, S) marks the context positions that may be attended to (padding is
    False); `bias` (B, heads, T, S) is added to the attention scores. `cache`, a dict
    owned by the caller, makes decoding incremental: self-attention appends this call's
    keys and values to it; cross-attention computes the context's keys and values once
    and reuses them.
    """

    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, heads, T, head_dim)"""
        B, T, C = t.shape
        return t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(source).split(source.shape[-1], dim=2)
        return self.heads(k), self.heads(v)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, causal: bool = False,
                mask: torch.Tensor | None = None, cache: dict | None = None, bias: torch.Tensor | None = None,
                weights: list | None = None) -> torch.Tensor:
        """With `weights` (a list), the attention weights (B, heads, T, S) are appended to it."""
        B, T, C = x.shape
        q = self.heads(self.q(x))
        if context is not None and cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            k, v = self.keys_values(x if context is None else context)
            if cache is not None and context is None and "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            if cache is not None:
                cache["k"], cache["v"] = k, v
        attn_mask = None if mask is None else mask[:, None, None, :]
        if bias is not None:  # added to the scores; a masked position stays out
            attn_mask = bias if attn_mask is None else bias.masked_fill(~attn_mask, float("-inf"))
        # With a cache, the new queries come after every cached key: causal only among themselves.
        is_causal = causal and attn_mask is None and (cache is None or k.shape[2] == T)
        if causal and not is_causal and T > 1:
            attn_mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
        if weights is not None:
            y = self._attend_with_weights(q, k, v, attn_mask, is_causal, weights)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                               dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


    @staticmethod
    def _attend_with_weights(q, k, v, attn_mask, is_causal: bool, weights: list) -> torch.Tensor:
        """What scaled_dot_product_attention computes (without dropout), keeping the weights."""
        scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        if is_causal:
            attn_mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
        w = torch.softmax(scores, dim=-1)
        weights.append(w)
        return w @ v


class MLP(nn.Module):
    def __init__(self, d_model: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.out(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block; with `cross=True` it also attends to a context."""

    def __init__(self, d_model: int, n_head: int, dropout: float, causal: bool, cross: bool = False):
        super().__init__()
        self.causal = causal
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_head, dropout)
        self.ln_cross = nn.LayerNorm(d_model) if cross else None
        self.cross_attn = Attention(d_model, n_head, dropout) if cross else None
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, dropout)
        self.recompute = "none"  # activation checkpointing (see recompute.py): set by the trainer

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                cache: dict | None = None, context_bias: torch.Tensor | None = None,
                cross_weights: list | None = None) -> torch.Tensor:
        """`cache`: {"self": {}, "cross": {}} for incremental decoding (see Attention);
        `cross_weights`: a list the cross-attention weights are appended to."""
        if self.recompute != "none" and self.training and torch.is_grad_enabled():
            return checkpointed(self._forward, self.recompute, x, context, context_mask, cache, context_bias,
                                cross_weights)
        return self._forward(x, context, context_mask, cache, context_bias, cross_weights)

    def _forward(self, x, context, context_mask, cache, context_bias, cross_weights) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=self.causal, cache=None if cache is None else cache["self"])
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.ln_cross(x), context=context, mask=context_mask,
                                    cache=None if cache is None else cache["cross"], bias=context_bias,
                                    weights=cross_weights)
        return x + self.mlp(self.ln_2(x))


def init_weights(module: nn.Module) -> None:
    """GPT-2 style initialisation."""
    if not isinstance(module, (nn.Linear, nn.Embedding)):
        return
    with whole(list(module.parameters(recurse=False))):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def whole(params: list[nn.Parameter]):
    """A context in which `params` hold their whole tensors. Under ZeRO-3's partitioned
    construction (`deepspeed.zero.Init`) each rank holds a slice: the slices are gathered,
    rank 0's writes are kept and sent to every rank, and the slices are cut again."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


def full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's shape, also of one ZeRO-3 holds partitioned (whose own tensor is empty)."""
    return getattr(p, "ds_shape", p.shape)


def numel(p: torch.Tensor) -> int:
    return full_shape(p).numel()


def count_params(module: nn.Module) -> int:
    return sum(numel(p) for p in module.parameters())
