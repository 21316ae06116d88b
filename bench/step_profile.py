"""Where the pipeline's training step spends its time against the plain loop's.

One process, device-resident batches, no Ray, no loader: the plain loop (autocast,
fused AdamW) and the pipeline's DeepSpeed engine (`pipeline.train.engine`) with
variants (ZeRO stage, gradient clipping, compile), each timed; then torch.profiler's
top operators of one engine step, and the number of host syncs (`.item()`,
`.cpu()`, `float(tensor)`: aten::_local_scalar_dense) in one step of each.

    python bench/step_profile.py            # GPU: GPT-124M, bf16
    python bench/step_profile.py --cpu      # CPU: a small GPT, fp32
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import TrainConfig, TransformerConfig  # noqa: E402
from pipeline.models.gpt import GPT  # noqa: E402


class SyncCounter(TorchDispatchMode):
    """Counts the ops that copy a device value to the host (and so wait for the device)."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def timed(step, device, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compiled-only", action="store_true", help="only the compiled engine and plain loop")
    args = parser.parse_args()
    from pipeline.train.engine import deepspeed_config, init_distributed, initialize, load_zero_config

    gpu = not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    layers, d, heads, seq, vocab, batch = (12, 768, 12, 1024, 50304, 16) if gpu else (2, 128, 4, 128, 2048, 4)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29541", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    init_distributed(gpu)
    shape = TransformerConfig(n_layer=layers, n_head=heads, d_model=d)
    tokens = torch.randint(0, vocab, (batch, seq + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def model() -> GPT:
        torch.manual_seed(0)
        return GPT(vocab, seq, shape).to(device)

    plain = model()
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-4, fused=gpu)

    def plain_step():
        with torch.autocast(device.type, dtype=dtype, enabled=gpu):
            _, loss = plain(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    results = {"plain eager": timed(plain_step, device, args.steps, 3)}
    plain.compile()
    results["plain compiled"] = timed(plain_step, device, args.steps, 3)
    print(f"plain compiled: {results['plain compiled']:.1f} ms/step", flush=True)
    counter = SyncCounter()
    with counter:
        plain_step()
    syncs = {"plain eager": counter.syncs}

    engines = {}
    variants = [("engine zero1 clip", 1, 1.0, False), ("engine zero1 noclip", 1, 0.0, False),
                ("engine zero0 clip", 0, 1.0, False), ("engine zero1 clip compiled", 1, 1.0, True)]
    for name, stage, clip, compiled in variants[-1:] if args.compiled_only else variants:
        train = TrainConfig(num_workers=1, use_gpu=gpu, zero_stage=stage, precision="bf16" if gpu else "fp32",
                            micro_batch_size=batch, max_steps=1000, warmup_steps=1, grad_clip=clip, compile=compiled)
        m = model()
        engine, _, _ = initialize(m, [{"params": list(m.parameters()), "weight_decay": 0.1}], train,
                                  deepspeed_config(load_zero_config(stage), train, 1))

        def engine_step(engine=engine):
            _, loss = engine(x, y)
            engine.backward(loss)
            engine.step()

        results[name] = timed(engine_step, device, args.steps, 3)
        if compiled:
            from torch._dynamo.utils import counters

            print("dynamo:", {k: dict(v) for k, v in counters.items() if k in ("stats", "graph_break")}, flush=True)
        counter = SyncCounter()
        with counter:
            engine_step()
        syncs[name] = counter.syncs
        engines[name] = engine_step
        print(f"{name}: {results[name]:.1f} ms/step, {syncs[name]} host syncs", flush=True)

    print(f"plain eager: {results['plain eager']:.1f} ms/step, {syncs['plain eager']} host syncs", flush=True)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            engines[variants[-1][0]]()
        if gpu:
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if gpu else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
