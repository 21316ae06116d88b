"""`pipeline plan`: what a config's GPT needs on N nodes of G GPUs, before renting them:
memory, the bytes each optimizer step moves between GPUs, the MFU that leaves, time
and money to compute-optimal data, and the layout that would do better.

Model state per GPU follows the ZeRO paper (Rajbhandari et al. 2020, section 3):
with mixed-precision Adam a model of Ψ parameters holds 2Ψ bytes of bf16 weights,
2Ψ of bf16 gradients and KΨ = 12Ψ of optimizer state (fp32 master weights, momentum,
variance); in fp32 training, 4Ψ + 4Ψ + 8Ψ. Stage 1 divides the optimizer state by the
data-parallel degree, stage 2 the gradients too, stage 3 the weights too.

Communication per GPU and optimizer step (the paper's section 7, ring collectives,
which move (n-1)/n of the data through each GPU): stages 0 and 1 all-reduce the
gradients once a step, 2Ψ; stage 2 reduce-scatters the gradients after every
micro-batch's backward (DeepSpeed cannot hold them whole) and all-gathers the updated
weights once, Ψ per micro-batch + Ψ; stage 3 gathers the weights for each micro-batch's
forward and again for its backward and reduce-scatters its gradients, 3Ψ per
micro-batch. With one micro-batch a step these are the paper's 2Ψ and 3Ψ.

Activations follow Korthikanti et al. 2022 (eq. 1) without recomputation: 34·s·b·h
bytes per layer for 16-bit activations, leaving out the 5·a·s²·b attention-score term
since scaled_dot_product_attention keeps no scores. With full activation
checkpointing each layer keeps only its input (2·s·b·h) and one layer at a time is
recomputed, at one more forward pass of compute. The loss's logits are counted as
they are held at the start of the backward: the bf16 logits, their fp32 copy, the
fp32 log-softmax kept for the backward and its fp32 gradient. Compute per token is
the pipeline's own 6N + 12·L·T·d.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any, Optional

from pipeline.config import ConfigError, RunConfig
from pipeline.models.flops import flops_per_token

# Bytes per parameter of (weights, gradients, optimizer state): mixed-precision Adam keeps
# fp32 master weights, momentum and variance (12); fp32 Adam only momentum and variance (8).
STATE_BYTES = {"bf16": (2, 2, 12), "fp32": (4, 4, 8)}
TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: compute-optimal data is about 20 tokens per parameter
# One recomputed forward (2N of the 6N per token) on top of the usual forward and backward.
RECOMPUTE_FACTOR = 8 / 6
GiB = 1024 ** 3
# The MFU the pipeline's own training path measured: GPT-350M, Ray Train + DeepSpeed
# ZeRO-1, bf16, one H200 (bench/RESULTS.md, 2026-11-27, second run: 40.5%; a plain
# PyTorch loop reached 43.5% there). One GPU: no gradient traffic is in this figure.
MEASURED_MFU = 0.40


@dataclass(frozen=True)
class Hardware:
    """The cluster's side of a plan: its size, its links, its price."""
    nodes: int
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0  # an H100
    peak_flops: float = 989e12  # an H100's dense bf16
    mfu: float = MEASURED_MFU  # of the compute alone, before any wait for communication
    gbps_per_gpu: float = 400.0  # between nodes, per GPU (a p5's 3,200 Gb/s of EFA over 8 GPUs)
    intra_node_gbps: float = 3600.0  # NVLink 4, per GPU and direction (450 GB/s)
    usd_per_gpu_hour: float = 4.0

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def bytes_per_s(self) -> float:
        """Per GPU, over the slowest link a collective crosses."""
        return (self.gbps_per_gpu if self.nodes > 1 else self.intra_node_gbps) * 1e9 / 8


CHOICES = ("zero_stage", "micro_batch", "grad_accum", "checkpointing", "overlap")  # the fields of a Layout


@dataclass(frozen=True)
class Layout:
    """How a preset trains: the choices that trade memory for communication and compute."""
    zero_stage: int
    micro_batch: int
    grad_accum: int
    checkpointing: bool  # full activation checkpointing
    overlap: bool  # communication overlapped with compute (DeepSpeed's overlap_comm)

    def describe(self) -> str:
        return (f"ZeRO-{self.zero_stage}, micro-batch {self.micro_batch} x {self.grad_accum} accumulation, "
                f"activation checkpointing {'full' if self.checkpointing else 'off'}, "
                f"overlap {'on' if self.overlap else 'off'}")


@dataclass
class Plan:
    nodes: int
    gpus_per_node: int
    zero_stage: int
    micro_batch: int
    grad_accum: int
    checkpointing: bool
    overlap: bool
    precision: str
    params_total: int
    params_non_embedding: int
    weights_gib: float  # per GPU, from here on unless said otherwise
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    logits_gib: float  # part of activations_gib
    total_gib: float
    gpu_memory_gib: float
    fits: bool
    comm_gb_per_step: float  # moved through each GPU per optimizer step
    compute_s: float  # one step's compute at `mfu`
    comm_s: float  # one step's communication at the link's bandwidth
    step_s: float
    mfu: float  # assumed, for the compute alone
    mfu_ceiling: float  # what is left of it after communication
    tokens_per_s: float
    compute_optimal_tokens: float
    days_to_compute_optimal: float
    usd_per_gpu_hour: float
    usd_to_compute_optimal: float
    checkpoint_gib: float  # DeepSpeed checkpoint, all ranks together
    weights_file_gib: float  # the exported safetensors
    min_shards: int
    better: Optional[dict[str, Any]] = None  # the cheapest layout that fits, when it beats this one


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


def comm_bytes_per_step(params: int, zero_stage: int, grad_accum: int, world: int, precision: str) -> float:
    """Bytes through each GPU per optimizer step (see the module's docstring)."""
    per_element = STATE_BYTES[precision][0]  # collectives move the training dtype
    elements = {0: 2 * params, 1: 2 * params, 2: params * grad_accum + params, 3: 3 * params * grad_accum}[zero_stage]
    return elements * per_element * (world - 1) / world


def logits_bytes(seq_len: int, micro_batch: int, vocab: int, precision: str) -> float:
    copy = 4 if precision == "bf16" else 0  # `.float()` of bf16 logits is a copy; of fp32 ones, not
    return seq_len * micro_batch * vocab * (STATE_BYTES[precision][0] + copy + 4 + 4)


def activation_bytes(n_layer: int, seq_len: int, micro_batch: int, d_model: int, vocab: int, precision: str,
                     checkpointing: bool = False) -> float:
    width = STATE_BYTES[precision][0]
    layer = 34 * seq_len * micro_batch * d_model * width / 2  # the paper's 34 assumes 2-byte values
    if checkpointing:
        kept = n_layer * seq_len * micro_batch * d_model * width + layer  # every layer's input, one layer whole
    else:
        kept = n_layer * layer
    return kept + logits_bytes(seq_len, micro_batch, vocab, precision)


def _evaluate(config: RunConfig, hw: Hardware, layout: Layout, total: int, non_embedding: int) -> Plan:
    model, train, tok = config.pretrain_gpt.model, config.pretrain_gpt.train, config.tokenize
    state = model_state_bytes(total, layout.zero_stage, train.precision, hw.world, train.offload_optimizer)
    logits = logits_bytes(tok.seq_len, layout.micro_batch, tok.vocab_size, train.precision)
    activations = activation_bytes(model.n_layer, tok.seq_len, layout.micro_batch, model.d_model, tok.vocab_size,
                                   train.precision, layout.checkpointing)
    per_gpu = sum(state.values()) + activations

    tokens_per_step = tok.seq_len * layout.micro_batch * layout.grad_accum  # per GPU
    model_flops = flops_per_token(non_embedding, model.n_layer, tok.seq_len, model.d_model) * tokens_per_step
    compute_s = model_flops * (RECOMPUTE_FACTOR if layout.checkpointing else 1) / (hw.peak_flops * hw.mfu)
    comm = comm_bytes_per_step(total, layout.zero_stage, layout.grad_accum, hw.world, train.precision)
    comm_s = comm / hw.bytes_per_s
    step_s = max(compute_s, comm_s) if layout.overlap else compute_s + comm_s
    tokens_per_s = tokens_per_step * hw.world / step_s
    optimal_tokens = TOKENS_PER_PARAM * total
    seconds = optimal_tokens / tokens_per_s
    weight_bytes, _, optimizer_bytes = STATE_BYTES[train.precision]
    return Plan(
        nodes=hw.nodes, gpus_per_node=hw.gpus_per_node, zero_stage=layout.zero_stage, micro_batch=layout.micro_batch,
        grad_accum=layout.grad_accum, checkpointing=layout.checkpointing, overlap=layout.overlap,
        precision=train.precision, params_total=total, params_non_embedding=non_embedding,
        weights_gib=state["weights"] / GiB, gradients_gib=state["gradients"] / GiB, optimizer_gib=state["optimizer"] / GiB,
        activations_gib=activations / GiB, logits_gib=logits / GiB, total_gib=per_gpu / GiB,
        gpu_memory_gib=hw.gpu_memory_gib, fits=per_gpu / GiB <= hw.gpu_memory_gib,
        comm_gb_per_step=comm / 1e9, compute_s=compute_s, comm_s=comm_s, step_s=step_s,
        mfu=hw.mfu, mfu_ceiling=model_flops / (hw.peak_flops * step_s), tokens_per_s=tokens_per_s,
        compute_optimal_tokens=float(optimal_tokens), days_to_compute_optimal=seconds / 86400,
        usd_per_gpu_hour=hw.usd_per_gpu_hour, usd_to_compute_optimal=seconds / 3600 * hw.world * hw.usd_per_gpu_hour,
        checkpoint_gib=total * (weight_bytes + optimizer_bytes) / GiB, weights_file_gib=total * weight_bytes / GiB,
        min_shards=hw.world * max(1, train.loader_workers),
    )


def layouts_like(layout: Layout) -> list[Layout]:
    """Every layout with the same tokens per step (micro-batch x accumulation) as `layout`."""
    per_step = layout.micro_batch * layout.grad_accum
    splits = [(m, per_step // m) for m in range(1, per_step + 1) if per_step % m == 0]
    return [Layout(stage, m, a, ckpt, overlap) for stage, (m, a), ckpt, overlap
            in itertools.product(range(4), splits, (False, True), (False, True))]


def _changes(old: Layout, new: Layout) -> list[str]:
    def shown(value):
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    return [f"{name} {shown(getattr(old, name))} -> {shown(getattr(new, name))}"
            for name in CHOICES if getattr(old, name) != getattr(new, name)]


def plan(config: RunConfig, hw: Hardware, overlap: bool) -> Plan:
    """The plan of the config's GPT on `hw`, with the cheapest layout that fits when it beats it."""
    import torch

    from pipeline.keys import Param
    from pipeline.kinds.base import param_counts
    from pipeline.kinds.gpt import KIND, GPTModelConfig

    if hw.nodes < 1 or hw.gpus_per_node < 1:
        raise ConfigError(f"--nodes and --gpus-per-node must be >= 1, got {hw.nodes} and {hw.gpus_per_node}")
    if not 0 < hw.mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {hw.mfu}")
    if hw.gbps_per_gpu <= 0 or hw.usd_per_gpu_hour < 0:
        raise ConfigError("--gbps-per-gpu must be > 0 and --usd-per-gpu-hour >= 0")
    model, train, tok = config.pretrain_gpt.model, config.pretrain_gpt.train, config.tokenize
    with torch.device("meta"):  # shapes only: a 7B model costs nothing here
        counts = param_counts(KIND.build(GPTModelConfig(tok.vocab_size, tok.seq_len, model)))
    total, non_embedding = counts[Param.PARAMS_TOTAL], counts[Param.PARAMS_NON_EMBEDDING]
    current = Layout(train.zero_stage, train.micro_batch_size, train.grad_accum, False, overlap)
    result = _evaluate(config, hw, current, total, non_embedding)
    candidates = [(layout, _evaluate(config, hw, layout, total, non_embedding)) for layout in layouts_like(current)]
    fitting = [(layout, p) for layout, p in candidates if p.fits and not (layout.zero_stage == 0 and train.offload_optimizer)]
    if fitting:
        fastest = max(p.tokens_per_s for _, p in fitting)
        # Of the layouts within 1% of the fastest, the one that changes least, then holds least.
        layout, best = min(((layout, p) for layout, p in fitting if p.tokens_per_s >= 0.99 * fastest),
                           key=lambda c: (len(_changes(current, c[0])), c[1].total_gib))
        if best.tokens_per_s > result.tokens_per_s * 1.01 or not result.fits:
            result.better = {"layout": layout.describe(), "change": ", ".join(_changes(current, layout)),
                             "mfu_ceiling": best.mfu_ceiling, "total_gib": best.total_gib,
                             "usd_to_compute_optimal": best.usd_to_compute_optimal}
    return result


def world_of(config: RunConfig, nodes: Optional[int], gpus_per_node: int) -> int:
    """`nodes`, else the preset's own: its `num_workers` over `gpus_per_node`."""
    if nodes is not None:
        return nodes
    workers = config.pretrain_gpt.train.num_workers
    if workers % gpus_per_node:
        raise ConfigError(f"pretrain_gpt.train.num_workers={workers} is not a whole number of "
                          f"{gpus_per_node}-GPU nodes: say --nodes")
    return workers // gpus_per_node


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def _duration(days: float) -> str:
    return f"{days:.3g} days" if days >= 1 else f"{days * 24:.3g} hours"


def format_plan(p: Plan) -> str:
    layout = Layout(p.zero_stage, p.micro_batch, p.grad_accum, p.checkpointing, p.overlap)
    bound = "communication" if p.comm_s > p.compute_s else "compute"
    rows = [
        ("cluster", f"{p.nodes} node(s) x {p.gpus_per_node} GPU(s) = {p.nodes * p.gpus_per_node} data-parallel ranks"),
        ("parameters", f"{_count(p.params_total)} total, {_count(p.params_non_embedding)} non-embedding"),
        ("layout", f"{layout.describe()}, {p.precision}"),
        ("per GPU: weights", f"{p.weights_gib:.2f} GiB"),
        ("per GPU: gradients", f"{p.gradients_gib:.2f} GiB"),
        ("per GPU: optimizer state", f"{p.optimizer_gib:.2f} GiB"),
        ("per GPU: activations (est.)", f"{p.activations_gib:.2f} GiB, of which the loss's logits {p.logits_gib:.2f} GiB"),
        ("per GPU: total", f"{p.total_gib:.2f} GiB of {p.gpu_memory_gib:.0f} GiB: {'fits' if p.fits else 'DOES NOT FIT'}"),
        ("per step: communication", f"{p.comm_gb_per_step:.3g} GB through each GPU, {p.comm_s:.3g} s on its link"),
        ("per step: compute", f"{p.compute_s:.3g} s at {p.mfu:.0%} MFU; step {p.step_s:.3g} s ({bound}-bound)"),
        ("MFU ceiling", f"{p.mfu_ceiling:.1%} (the assumed {p.mfu:.0%}, less the wait for communication)"),
        ("throughput", f"{_count(p.tokens_per_s)} tokens/s"),
        ("compute-optimal data", f"{_count(p.compute_optimal_tokens)} tokens ({TOKENS_PER_PARAM} per parameter)"),
        ("time to it", _duration(p.days_to_compute_optimal)),
        ("cost of it", f"${p.usd_to_compute_optimal:,.0f} at ${p.usd_per_gpu_hour:.2f} per GPU-hour"),
        ("checkpoint", f"{p.checkpoint_gib:.2f} GiB (DeepSpeed, all ranks); {p.weights_file_gib:.2f} GiB safetensors"),
        ("fewest shards", f"{p.min_shards} (one per loader worker per rank)"),
    ]
    if p.better:
        b = p.better
        rows.append(("better layout", f"{b['change']}: MFU ceiling {b['mfu_ceiling']:.1%}, "
                                      f"{b['total_gib']:.1f} GiB per GPU, ${b['usd_to_compute_optimal']:,.0f}"))
    else:
        rows.append(("better layout", "none with the same tokens per step fits and trains faster"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def as_dict(p: Plan) -> dict[str, Any]:
    return asdict(p)
