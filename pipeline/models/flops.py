"""Training compute per sample (PaLM, appendix B): 6N + 12·L·T·d per token.

N counts the matmul weights a token's compute passes through (`matmul_params`):
not the lookup tables (embeddings, positions, class token), nor biases and norms,
which are not matmuls. A tied output matrix is a real matmul and stays in N.
Sequence-dependent attention adds 12·L·T·d. `tests/test_units.py` holds every
model's count against torch's FlopCounterMode on a real training step.
"""

from __future__ import annotations

import torch.nn as nn

from .layers import numel


def matmul_params(module: nn.Module) -> int:
    """Weights of the matmuls a token passes through: every Linear's weight (a tied
    output matrix once, as a Linear). Biases and norms cost no matmul; lookup tables
    (embeddings, positions, class token) cost none at all."""
    return sum(numel(m.weight) for m in module.modules() if isinstance(m, nn.Linear))


def flops_per_token(n_params: int, n_layer: int, seq_len: int, d_model: int) -> float:
    return 6.0 * n_params + 12.0 * n_layer * seq_len * d_model


def gpt_flops_per_sequence(n_params: int, n_layer: int, seq_len: int, d_model: int) -> float:
    return flops_per_token(n_params, n_layer, seq_len, d_model) * seq_len


def vit_flops_per_image(n_params: int, head_params: int, n_layer: int, num_patches: int, d_model: int) -> float:
    """Every token through the encoder; the classifier head reads one vector per image."""
    seq = num_patches + 1  # class token
    return flops_per_token(n_params - head_params, n_layer, seq, d_model) * seq + 6.0 * head_params


def captioner_flops_per_sample(
    encoder_params: int, encoder_layers: int, encoder_d: int, cell_tokens: int, rows: int, cells: int, encoder_trained: bool,
    decoder_token_params: int, memory_params: int, decoder_layers: int, decoder_d: int, text_len: int,
) -> float:
    """What one training step runs for one grid:
    - the encoder on every cell; a frozen one (no gradients) runs its forward pass only,
      a third of forward + backward;
    - every decoder token through the decoder's own matmuls (`decoder_token_params`),
      attending to the text before it and to every memory token;
    - the parameters that read the memory (cross-attention keys and values, the memory
      projection) once per memory token, not per text token."""
    encoder = flops_per_token(encoder_params, encoder_layers, cell_tokens, encoder_d) * cell_tokens * cells
    if not encoder_trained:
        encoder /= 3
    memory = cells + rows  # a vector per cell, and an edge token per row
    decoder = flops_per_token(decoder_token_params, decoder_layers, text_len + memory, decoder_d) * text_len
    return encoder + decoder + 6.0 * memory_params * memory
