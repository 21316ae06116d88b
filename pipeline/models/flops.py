"""Training compute per sample (PaLM, appendix B): 6N + 12·L·T·d per token.

N counts the parameters a token's compute passes through: everything but the
lookup tables (position embeddings, class token). A tied output matrix is a
real matmul and stays in N. Sequence-dependent attention adds 12·L·T·d.
"""

from __future__ import annotations


def flops_per_token(n_params: int, n_layer: int, seq_len: int, d_model: int) -> float:
    return 6.0 * n_params + 12.0 * n_layer * seq_len * d_model


def gpt_flops_per_sequence(n_params: int, n_layer: int, seq_len: int, d_model: int) -> float:
    return flops_per_token(n_params, n_layer, seq_len, d_model) * seq_len


def vit_flops_per_image(n_params: int, n_layer: int, num_patches: int, d_model: int) -> float:
    seq = num_patches + 1  # class token
    return flops_per_token(n_params, n_layer, seq, d_model) * seq


def captioner_flops_per_sample(
    encoder_params: int, encoder_layers: int, encoder_d: int, cell_tokens: int, cells: int,
    decoder_params: int, decoder_layers: int, decoder_d: int, text_len: int,
) -> float:
    """Encoder on every cell, plus decoder tokens attending to themselves and all cell tokens."""
    encoder = flops_per_token(encoder_params, encoder_layers, cell_tokens, encoder_d) * cell_tokens * cells
    memory = cell_tokens * cells
    decoder = flops_per_token(decoder_params, decoder_layers, text_len + memory, decoder_d) * text_len
    return encoder + decoder
