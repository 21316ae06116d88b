"""Speed switches keep the math: each gives the plain path's loss and gradients.

Chunked cross-entropy, activation checkpointing (full, selective), torch.compile and
fused AdamW, each against the plain path on the same model and batch, in fp32.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import TransformerConfig
from pipeline.models import recompute
from pipeline.models.gpt import GPT
from pipeline.models.loss import cross_entropy

VOCAB, SEQ = 512, 32


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(VOCAB, SEQ, TransformerConfig(n_layer=2, n_head=4, d_model=64))


def batch(seed: int = 1, rows: int = 4) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, SEQ + 1), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model: torch.nn.Module, seq: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    _, loss = model(seq[:, :-1], seq[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a, b, rtol: float) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=rtol * grads_a[name].abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


def saved_bytes(fn) -> tuple[int, int]:
    """(total bytes, largest tensor's bytes) that autograd saves for the backward pass of `fn()`."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes), max(sizes, default=0)


def test_chunked_cross_entropy_equals_torch_and_ignores_targets():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 1000, generator=g, dtype=torch.float64).float().requires_grad_()
    targets = torch.randint(0, 1000, (300,), generator=g)
    targets[::7] = -100
    reference = F.cross_entropy(logits, targets, ignore_index=-100)
    (want,) = torch.autograd.grad(reference, logits)
    ours = cross_entropy(logits, targets, chunk_rows=64)  # 5 chunks, the last one short
    (got,) = torch.autograd.grad(ours, logits)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    assert got[::7].abs().max() == 0  # ignored rows get no gradient


def test_chunked_cross_entropy_keeps_no_fp32_copy_of_bf16_logits():
    logits = torch.randn(256, 4096).bfloat16().requires_grad_()
    targets = torch.randint(0, 4096, (256,))
    fp32_copy = logits.numel() * 4
    _, largest_torch = saved_bytes(lambda: F.cross_entropy(logits.float(), targets))
    _, largest_ours = saved_bytes(lambda: cross_entropy(logits, targets, chunk_rows=64))
    assert largest_torch >= fp32_copy  # the plain path keeps an fp32 log-softmax of every logit
    assert largest_ours <= logits.numel() * 2  # ours keeps the bf16 logits themselves, nothing larger
    bf16_grad = torch.autograd.grad(cross_entropy(logits, targets, chunk_rows=64), logits)[0]
    assert bf16_grad.dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_same_loss_and_gradients_less_memory(mode):
    seq = batch()
    plain = tiny_gpt()
    recomputed = copy.deepcopy(plain)
    recompute.set_mode(recomputed, mode)
    assert_same(loss_and_grads(plain, seq), loss_and_grads(recomputed, seq), rtol=1e-6)
    kept_plain, _ = saved_bytes(lambda: plain(seq[:, :-1], seq[:, 1:]))
    kept, _ = saved_bytes(lambda: recomputed(seq[:, :-1], seq[:, 1:]))
    # Full keeps a block's input alone; selective its matmul and attention outputs.
    assert kept < {"full": 0.5, "selective": 0.8}[mode] * kept_plain, (kept, kept_plain)


def test_activation_checkpointing_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="activation checkpointing must be one of none, full, selective"):
        recompute.set_mode(tiny_gpt(), "some")


def test_compile_same_loss_and_gradients():
    seq = batch()
    plain = tiny_gpt()
    compiled = copy.deepcopy(plain)
    compiled.compile()  # in place, as DeepSpeed's engine.compile does: parameter names unchanged
    assert_same(loss_and_grads(plain, seq), loss_and_grads(compiled, seq), rtol=1e-5)
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in plain.named_parameters()]


def test_fused_adamw_same_weights_as_the_plain_update():
    plain = tiny_gpt()
    fused = copy.deepcopy(plain)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=f)
                  for m, f in ((plain, False), (fused, True))]
    for step in range(3):
        # The same gradients for both: the key biases' true gradient is zero (softmax ignores
        # a constant per query), and Adam would blow their rounding noise up to full steps.
        _, grads = loss_and_grads(plain, batch(seed=step))
        for name, p in fused.named_parameters():
            p.grad = grads[name].clone()
        for optimizer in optimizers:
            optimizer.step()
    for (name, a), (_, b) in zip(plain.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
