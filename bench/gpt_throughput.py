"""Benchmark: GPT training throughput through the pipeline's trainer (Ray Train +
DeepSpeed ZeRO) against a plain single-process PyTorch loop in the same script.

Synthetic tokens, so it measures the engine, not the data. Prints tokens/s of
both and the ratio pipeline / (baseline x workers): 1.0 is perfect scaling with
no framework overhead.

    .venv/bin/python bench/gpt_throughput.py                       # CPU, 2 workers, small GPT
    .venv/bin/python bench/gpt_throughput.py --gpu --workers 1 --layers 12 --d-model 768 \
        --seq-len 1024 --micro-batch 16 --precision bf16          # ~124M GPT on one GPU
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch


def write_tokens(directory: str, n: int, seq_len: int, vocab: int) -> str:
    """Two shards of random token sequences and their manifest; returns the directory."""
    from pipeline.data.shards import write_manifest, write_shard
    from pipeline.preprocess.tokenize import token_dtype

    rng = np.random.default_rng(0)
    infos = []
    for s in range(2):
        path = os.path.join(directory, f"tokens-{s}.tar")
        ids = (rng.integers(0, vocab, seq_len + 1).astype(token_dtype(vocab)) for _ in range(n // 2))
        infos.append(write_shard(path, ({"__key__": f"{s}-{i}", "npy": a} for i, a in enumerate(ids))))
    write_manifest(directory, infos, {"npy": "token ids"}, "bench")
    return directory


def baseline_tokens_per_s(args, model_cfg, device, dtype) -> float:
    """The same model and optimizer in one plain process: no Ray, no DeepSpeed."""
    from pipeline.models.gpt import GPT

    torch.manual_seed(0)
    model = GPT(args.vocab, args.seq_len, model_cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len + 1), device=device)
    timed = 0.0
    for step in range(args.steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            timed += time.perf_counter() - start
    return (args.steps - args.warmup) * args.micro_batch * args.seq_len / timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--zero", type=int, default=3)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="baseline steps not timed")
    parser.add_argument("--peak-flops", type=float, default=None, help="per worker; default 180e9 (one CI core, fp32), 989e12 GPU")
    args = parser.parse_args()

    import ray

    from pipeline.config import PretrainGPTConfig, RayConfig, TrainConfig, TransformerConfig
    from pipeline.kinds.gpt import GPTModelConfig
    from pipeline.runner import ensure_ray
    from pipeline.train.engine import load_zero_config
    from pipeline.train.launch import fit
    from pipeline.train.spec import TrainSpec

    peak = args.peak_flops or (989e12 if args.gpu else 180e9)
    model_cfg = TransformerConfig(n_layer=args.layers, n_head=args.heads, d_model=args.d_model)
    device = torch.device("cuda" if args.gpu else "cpu")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    if not args.gpu:
        torch.set_num_threads(1)  # one core, as each CPU worker gets
    baseline = baseline_tokens_per_s(args, model_cfg, device, dtype)

    with tempfile.TemporaryDirectory() as tmp:
        tokens = write_tokens(os.path.join(tmp, "tokens"), max(64, args.micro_batch * args.workers * 4), args.seq_len, args.vocab)
        train = TrainConfig(
            num_workers=args.workers, use_gpu=args.gpu, zero_stage=args.zero, precision=args.precision,
            micro_batch_size=args.micro_batch, max_steps=args.steps, warmup_steps=1, lr=1e-4, min_lr=1e-5,
            log_every=args.steps // 2, peak_flops_per_worker=peak,
        )
        spec = TrainSpec(kind="gpt", model=GPTModelConfig(args.vocab, args.seq_len, model_cfg),
                         section=PretrainGPTConfig(model=model_cfg, train=train), train_data=tokens,
                         deepspeed=load_zero_config(args.zero), weights_out=os.path.join(tmp, "w.safetensors"))
        # With its dashboard, as the pipeline starts it: Ray Train's placement-group cleaner
        # polls the state API there, and warns on every poll without one.
        ensure_ray(RayConfig(num_cpus=None if args.gpu else args.workers))
        metrics = fit(spec, os.path.join(tmp, "run"))["metrics"]
        ray.shutdown()

    # The trainer's last log window is the second half of the run, past start-up.
    pipeline = metrics["tokens_per_s"]
    print(f"model: {args.layers} layers, d_model {args.d_model}, seq {args.seq_len}, {args.precision}, "
          f"ZeRO-{args.zero}, {args.workers} worker(s) on {'GPU' if args.gpu else 'CPU'}")
    print(f"baseline (plain PyTorch, 1 process): {baseline:,.0f} tokens/s")
    print(f"pipeline (Ray Train + DeepSpeed):    {pipeline:,.0f} tokens/s, MFU {metrics['mfu']:.1%} of {peak:.3g} FLOP/s per worker")
    print(f"pipeline / (baseline x workers):     {pipeline / (baseline * args.workers):.2f}")


if __name__ == "__main__":
    main()
