"""Where the pipeline's training step spends its time against the plain loop's.

One process, device-resident batches, no Ray, no loader: the plain loop (autocast,
fused AdamW) and the pipeline's DeepSpeed engine (`pipeline.train.engine`) with
variants (ZeRO stage, gradient clipping, bucket settings), each timed with the number
of host syncs (`.item()`, `.cpu()`, `float(tensor)`: aten::_local_scalar_dense) in
one step; then torch.profiler's top operators of the first variant's step.

    python bench/step_profile.py --model gpt               # GPU: GPT-124M, bf16
    python bench/step_profile.py --model vit --variants zero1 zero0
    python bench/step_profile.py --cpu --model vit         # CPU: a small ViT, fp32
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
from pipeline.models.vit import ViT  # noqa: E402


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


# Engine variants: (ZeRO stage, gradient clipping, overrides of the stage's zero_optimization block).
VARIANTS = {
    "zero1": (1, 1.0, {}),  # what the pipeline ships
    "zero1-noclip": (1, 0.0, {}),
    "zero1-bucket5e8": (1, 1.0, {"reduce_bucket_size": 500_000_000}),
    "zero1-noncontiguous": (1, 1.0, {"contiguous_gradients": False}),
    "zero0": (0, 1.0, {}),
}


def build(name: str, gpu: bool, device: torch.device):
    """A model factory and one device-resident batch: GPT-124M or ViT-S/16 at 224 px on a
    GPU, small ones on the CPU."""
    if name == "gpt":
        layers, d, heads, seq, vocab, batch = (12, 768, 12, 1024, 50304, 16) if gpu else (2, 128, 4, 128, 2048, 4)
        tokens = torch.randint(0, vocab, (batch, seq + 1), device=device)

        def model() -> torch.nn.Module:
            torch.manual_seed(0)
            return GPT(vocab, seq, TransformerConfig(n_layer=layers, n_head=heads, d_model=d)).to(device)

        return model, (tokens[:, :-1], tokens[:, 1:])
    layers, d, heads, image, patch, classes, batch = (12, 384, 6, 224, 16, 1000, 128) if gpu else (2, 64, 4, 32, 8, 10, 8)
    num_patches, patch_dim = (image // patch) ** 2, 3 * patch * patch
    patches = torch.randn(batch, num_patches, patch_dim, device=device)
    labels = torch.randint(0, classes, (batch,), device=device)

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return ViT(num_patches, patch_dim, classes, TransformerConfig(n_layer=layers, n_head=heads, d_model=d)).to(device)

    return model, (patches, labels)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--model", choices=("gpt", "vit"), default="gpt")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eager", action="store_true", help="time the engines without torch.compile")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--port", default="29541")
    args = parser.parse_args()
    from pipeline.train.engine import deepspeed_config, init_distributed, initialize, load_zero_config

    gpu = not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=args.port, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    init_distributed(gpu)
    model, inputs = build(args.model, gpu, device)

    plain = model()
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-4, fused=gpu)

    def plain_step():
        with torch.autocast(device.type, dtype=dtype, enabled=gpu):
            _, loss = plain(*inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    print(f"[{args.model}] plain eager: {timed(plain_step, device, args.steps, 3):.1f} ms/step", flush=True)
    plain.compile()
    print(f"[{args.model}] plain compiled: {timed(plain_step, device, args.steps, 3):.1f} ms/step", flush=True)

    shipped = None
    for name in args.variants:
        stage, clip, overrides = VARIANTS[name]
        train = TrainConfig(num_workers=1, use_gpu=gpu, zero_stage=stage, precision="bf16" if gpu else "fp32",
                            micro_batch_size=len(inputs[0]), max_steps=1000, warmup_steps=1, grad_clip=clip,
                            compile=not args.eager)
        base = load_zero_config(stage)
        base["zero_optimization"].update(overrides)
        m = model()
        engine, _, _ = initialize(m, [{"params": list(m.parameters()), "weight_decay": 0.1}], train,
                                  deepspeed_config(base, train, 1))
        engine_inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)  # bf16 weights

        def engine_step(engine=engine, engine_inputs=engine_inputs):
            _, loss = engine(*engine_inputs)
            engine.backward(loss)
            engine.step()

        ms = timed(engine_step, device, args.steps, 3)
        counter = SyncCounter()
        with counter:
            engine_step()
        print(f"[{args.model}] engine {name}{' eager' if args.eager else ''}: {ms:.1f} ms/step, "
              f"{counter.syncs} host syncs", flush=True)
        shipped = shipped or engine_step

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            shipped()
        if gpu:
            torch.cuda.synchronize()
    averages = prof.key_averages()
    if gpu:
        print(averages.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    main()
