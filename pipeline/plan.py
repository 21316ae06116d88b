"""`pipeline plan`: what a config's GPT needs on N nodes of G GPUs, before renting them.

Model state per GPU follows the ZeRO paper (Rajbhandari et al. 2020, section 3):
with mixed-precision Adam a model of Ψ parameters holds 2Ψ bytes of bf16
weights, 2Ψ of bf16 gradients and KΨ = 12Ψ of optimizer state (fp32 master
weights, momentum, variance); in fp32 training, 4Ψ + 4Ψ + 8Ψ. Stage 1 divides the
optimizer state by the data-parallel degree, stage 2 the gradients too, stage 3
the weights too. Activations follow Korthikanti et al. 2022 (eq. 1) without
recomputation: 34·s·b·h bytes per layer for 16-bit activations, leaving out the
5·a·s²·b attention-score term since scaled_dot_product_attention keeps no scores,
plus the logits. Compute per token is the pipeline's own 6N + 12·L·T·d.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pipeline.config import ConfigError, RunConfig
from pipeline.models.flops import flops_per_token

# Bytes per parameter of (weights, gradients, optimizer state): mixed-precision Adam keeps
# fp32 master weights, momentum and variance (12); fp32 Adam only momentum and variance (8).
STATE_BYTES = {"bf16": (2, 2, 12), "fp32": (4, 4, 8)}
TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: compute-optimal data is about 20 tokens per parameter
GiB = 1024 ** 3


@dataclass
class Plan:
    nodes: int
    gpus_per_node: int
    zero_stage: int
    precision: str
    params_total: int
    params_non_embedding: int
    weights_gib: float  # per GPU, from here on unless said otherwise
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    total_gib: float
    gpu_memory_gib: float
    fits: bool
    mfu: float
    tokens_per_s: float
    compute_optimal_tokens: float
    days_to_compute_optimal: float
    checkpoint_gib: float  # DeepSpeed checkpoint, all ranks together
    weights_file_gib: float  # the exported safetensors
    min_shards: int


def model_state_bytes(params: int, zero_stage: int, precision: str, data_parallel: int, offload_optimizer: bool) -> dict[str, float]:
    """Bytes per GPU of weights, gradients and optimizer state (the ZeRO paper's accounting)."""
    weights, grads, optim = STATE_BYTES[precision]
    shard = {"weights": zero_stage >= 3, "gradients": zero_stage >= 2, "optimizer": zero_stage >= 1}
    out = {}
    for name, per_param in (("weights", weights), ("gradients", grads), ("optimizer", optim)):
        out[name] = params * per_param / (data_parallel if shard[name] else 1)
    if offload_optimizer:
        out["optimizer"] = 0.0  # held in CPU memory
    return out


def activation_bytes(n_layer: int, seq_len: int, micro_batch: int, d_model: int, vocab: int, precision: str) -> float:
    width = 2 if precision == "bf16" else 4
    per_layer = 34 * seq_len * micro_batch * d_model * width / 2  # the paper's 34 assumes 2-byte values
    logits = seq_len * micro_batch * vocab * (width + 4)  # the logits, and their fp32 copy for the loss
    return n_layer * per_layer + logits


def plan(config: RunConfig, nodes: int, gpus_per_node: int, mfu: float, gpu_memory_gib: float) -> Plan:
    import torch

    from pipeline.keys import Param
    from pipeline.kinds.base import param_counts
    from pipeline.kinds.gpt import KIND, GPTModelConfig

    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {gpus_per_node}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu}")
    model, train, tok = config.pretrain_gpt.model, config.pretrain_gpt.train, config.tokenize
    with torch.device("meta"):  # shapes only: a 7B model costs nothing here
        counts = param_counts(KIND.build(GPTModelConfig(tok.vocab_size, tok.seq_len, model)))
    total, non_embedding = counts[Param.PARAMS_TOTAL], counts[Param.PARAMS_NON_EMBEDDING]
    world = nodes * gpus_per_node
    state = model_state_bytes(total, train.zero_stage, train.precision, world, train.offload_optimizer)
    activations = activation_bytes(model.n_layer, tok.seq_len, train.micro_batch_size, model.d_model, tok.vocab_size,
                                   train.precision)
    per_gpu = sum(state.values()) + activations
    tokens_per_s = mfu * train.peak_flops_per_worker * world / flops_per_token(non_embedding, model.n_layer, tok.seq_len, model.d_model)
    optimal_tokens = TOKENS_PER_PARAM * total
    weight_bytes, _, optimizer_bytes = STATE_BYTES[train.precision]
    weights_file = total * weight_bytes
    checkpoint = total * (weight_bytes + optimizer_bytes)  # DeepSpeed saves weights and optimizer state
    return Plan(
        nodes=nodes, gpus_per_node=gpus_per_node, zero_stage=train.zero_stage, precision=train.precision,
        params_total=total, params_non_embedding=non_embedding,
        weights_gib=state["weights"] / GiB, gradients_gib=state["gradients"] / GiB, optimizer_gib=state["optimizer"] / GiB,
        activations_gib=activations / GiB, total_gib=per_gpu / GiB, gpu_memory_gib=gpu_memory_gib,
        fits=per_gpu / GiB <= gpu_memory_gib, mfu=mfu, tokens_per_s=tokens_per_s,
        compute_optimal_tokens=float(optimal_tokens), days_to_compute_optimal=optimal_tokens / tokens_per_s / 86400,
        checkpoint_gib=checkpoint / GiB, weights_file_gib=weights_file / GiB,
        min_shards=world * max(1, train.loader_workers),
    )


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def format_plan(p: Plan) -> str:
    rows = [
        ("cluster", f"{p.nodes} node(s) x {p.gpus_per_node} GPU(s) = {p.nodes * p.gpus_per_node} data-parallel ranks"),
        ("parameters", f"{_count(p.params_total)} total, {_count(p.params_non_embedding)} non-embedding"),
        ("ZeRO stage / precision", f"{p.zero_stage} / {p.precision}"),
        ("per GPU: weights", f"{p.weights_gib:.2f} GiB"),
        ("per GPU: gradients", f"{p.gradients_gib:.2f} GiB"),
        ("per GPU: optimizer state", f"{p.optimizer_gib:.2f} GiB"),
        ("per GPU: activations (est.)", f"{p.activations_gib:.2f} GiB (micro-batch, no recomputation)"),
        ("per GPU: total", f"{p.total_gib:.2f} GiB of {p.gpu_memory_gib:.0f} GiB: {'fits' if p.fits else 'DOES NOT FIT'}"),
        ("throughput", f"{_count(p.tokens_per_s)} tokens/s at {p.mfu:.0%} MFU"),
        ("compute-optimal data", f"{_count(p.compute_optimal_tokens)} tokens ({TOKENS_PER_PARAM} per parameter)"),
        ("time to it", f"{p.days_to_compute_optimal:.3g} days" if p.days_to_compute_optimal >= 1
         else f"{p.days_to_compute_optimal * 24:.3g} hours"),
        ("checkpoint", f"{p.checkpoint_gib:.2f} GiB (DeepSpeed, all ranks); {p.weights_file_gib:.2f} GiB safetensors"),
        ("fewest shards", f"{p.min_shards} (one per loader worker per rank)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def as_dict(p: Plan) -> dict[str, Any]:
    return asdict(p)
