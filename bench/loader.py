"""Does training wait on data? And does loader memory follow the corpus size?

In one run, on shards in the smoke's formats (ViT patches, GPT token sequences):

1. the loader's rate for one rank (real DataLoader workers, tar reading with
   sha256, decoding, batching), against the rate at which that rank of the smoke
   GPT and ViT consumes samples (forward, backward, AdamW step; one thread, as a
   CPU Ray worker gets one core). The goal: loader >= 20x consumption.
2. the peak RSS of a training process (trainer + its loader worker) that trains
   the smoke ViT through one whole epoch of a smoke-sized corpus and of one 8x
   larger. The goal: within 10%.

    python bench/loader.py [--workers 1] [--scale 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SMOKE_DIGITS = 3600  # train digits in the smoke run
SMOKE_SEQUENCES = 6000  # ~ the smoke's training sequences of 129 tokens


def make_shards(directory: str, kind: str, count: int, per_shard: int) -> str:
    from pipeline.data import shards

    rng = np.random.default_rng(0)
    infos = []
    for s, start in enumerate(range(0, count, per_shard)):
        def samples():
            for i in range(start, min(count, start + per_shard)):
                if kind == "vit":
                    yield {"__key__": f"d{i:07d}", "npy": rng.standard_normal((16, 49)).astype(np.float16), "cls": i % 10}
                else:
                    yield {"__key__": f"t{i:07d}", "npy": rng.integers(0, 4096, 129).astype(np.uint16)}
        infos.append(shards.write_shard(f"{directory}/{kind}-{s:05d}.tar", samples()))
    shards.write_manifest(directory, infos, {}, "bench")
    return directory


def _train_config(micro: int, workers: int, cache_mb: int = 0):
    from pipeline.config import TrainConfig

    return TrainConfig(num_workers=2, micro_batch_size=micro, loader_workers=workers, max_steps=10**6,
                       loader_cache_mb=cache_mb)


def loader_rate(directory: str, kind: str, micro: int, workers: int, cache_mb: int, seconds: float = 8.0) -> float:
    """Samples/s one rank's loader delivers (rank 0 of 2), with the smoke's augmentation."""
    from pipeline.kinds import KINDS
    from pipeline.train.augment import KeyedShift
    from pipeline.train.data import TrainingData

    train = _train_config(micro, workers, cache_mb)
    data = TrainingData.open(directory, train, world_size=2)
    shift = KeyedShift(0, 7, 1, -0.42) if kind == "vit" else None
    batches = iter(data.loader(0, 0, train.max_steps, KINDS[kind].fields, shift, train))
    next(batches)  # worker start-up is paid once per run, not per batch
    if cache_mb:  # measure the steady state: every shard decoded once already
        for _ in range(data.order.epoch_size // data.layout.global_batch + 1):
            next(batches)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += len(next(batches)["__key__"])
    return n / (time.perf_counter() - start)


def consume_rate(kind: str, micro: int, steps: int = 30) -> float:
    """Samples/s the smoke model trains on, in one thread."""
    import torch

    from pipeline.config import TransformerConfig
    from pipeline.models.gpt import GPT
    from pipeline.models.vit import ViT

    torch.set_num_threads(1)
    if kind == "gpt":
        model = GPT(4096, 128, TransformerConfig(n_layer=2, n_head=4, d_model=128))
        x = torch.randint(0, 4096, (micro, 129))
        step = lambda: model(x[:, :-1], x[:, 1:])[1]  # noqa: E731
    else:
        model = ViT(16, 49, 10, TransformerConfig(n_layer=3, n_head=4, d_model=96))
        x, y = torch.randn(micro, 16, 49), torch.randint(0, 10, (micro,))
        step = lambda: model(x, y)[1]  # noqa: E731
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for i in range(steps + 3):
        if i == 3:
            start = time.perf_counter()
        opt.zero_grad()
        step().backward()
        opt.step()
    return steps * micro / (time.perf_counter() - start)


def median_ratio(directory: str, kind: str, micro: int, workers: int, cache_mb: int, repeats: int = 3,
                 seconds: float = 8.0) -> dict:
    """Loader rate over consumption rate, measured `repeats` times interleaved (so that a slow
    minute of this machine hits both sides of a ratio), and the medians."""
    eats, loads = [], []
    for _ in range(repeats):
        eats.append(consume_rate(kind, micro))
        loads.append(loader_rate(directory, kind, micro, workers, cache_mb, seconds))
    ratios = [load / eat for load, eat in zip(loads, eats)]
    return {"consumes_per_s": round(statistics.median(eats)), "loader_per_s": round(statistics.median(loads)),
            "ratio": round(statistics.median(ratios), 2), "repeats": [round(r, 2) for r in ratios]}


def _epoch_worker(directory: str, workers: int) -> None:
    """Child process: train the smoke ViT through one epoch (rank 0 of 2), streaming
    (cache off, the path a large corpus takes); print peak RSS."""
    import torch

    from pipeline.config import TransformerConfig
    from pipeline.models.vit import ViT
    from pipeline.kinds import KINDS
    from pipeline.train.data import TrainingData

    torch.set_num_threads(1)
    train = _train_config(64, workers)
    data = TrainingData.open(directory, train, world_size=2)
    steps = data.order.epoch_size // data.layout.global_batch
    model = ViT(16, 49, 10, TransformerConfig(n_layer=3, n_head=4, d_model=96))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    vit = KINDS["vit"]
    for batch in data.loader(0, 0, steps, vit.fields, None, train):
        opt.zero_grad()
        vit.forward(model, batch, torch.device("cpu"), torch.float32)[1].backward()
        opt.step()
    # The trainer's own peak (VmHWM): its ru_maxrss would start at the parent's RSS at the
    # spawn, which exec keeps. The loader workers are forked here, so theirs start at this
    # process's RSS at the fork, which is theirs too (copy-on-write pages they can touch).
    with open("/proc/self/status") as status:
        own_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"trainer_mb": own_kb / 1024, "loader_worker_mb": children / 1024, "steps": steps}))


def epoch_rss(directory: str, workers: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--epoch-worker", directory, "--workers", str(workers)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1, help="loader workers per rank (the config default is 1)")
    parser.add_argument("--scale", type=int, default=8, help="the larger corpus, in smoke corpora")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved measurements; the median ratio is the figure")
    parser.add_argument("--epoch-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.epoch_worker:
        _epoch_worker(args.epoch_worker, args.workers)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        vit = make_shards(f"{tmp}/vit", "vit", SMOKE_DIGITS, 1000)
        gpt = make_shards(f"{tmp}/gpt", "gpt", SMOKE_SEQUENCES, 1000)
        print(f"rates for one rank (rank 0 of 2), loader workers = {args.workers}")
        ok = True
        for kind, directory, micro in (("gpt", gpt, 16), ("vit", vit, 64)):
            for how, cache_mb in (("streamed (a corpus larger than the cache)", 0), ("cached (the smoke's case)", 128)):
                r = median_ratio(directory, kind, micro, args.workers, cache_mb, args.repeats)
                ok &= r["ratio"] >= 20
                print(f"  {kind}, {how:42s} loader {r['loader_per_s']:6.0f} samples/s, training {r['consumes_per_s']:5.0f}: "
                      f"{r['ratio']:6.1f}x (goal >= 20x; repeats {', '.join(f'{x:.1f}' for x in r['repeats'])})")

        big = make_shards(f"{tmp}/vit-big", "vit", SMOKE_DIGITS * args.scale, 1000)
        small_rss, big_rss = epoch_rss(vit, args.workers), epoch_rss(big, args.workers)
        print(f"peak RSS over one epoch of the smoke ViT (trainer + loader worker), rank 0 of 2:")
        for name, r, n in (("smoke", small_rss, SMOKE_DIGITS), (f"{args.scale}x", big_rss, SMOKE_DIGITS * args.scale)):
            print(f"  {name:>5} corpus ({n:6d} samples, {r['steps']:4d} steps): trainer {r['trainer_mb']:6.1f} MB, "
                  f"loader worker {r['loader_worker_mb']:6.1f} MB")
        growth = (big_rss["trainer_mb"] + big_rss["loader_worker_mb"]) / (small_rss["trainer_mb"] + small_rss["loader_worker_mb"]) - 1
        ok &= growth <= 0.10
        print(f"  growth {growth:+.1%} for {args.scale}x the data (goal <= +10%)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
