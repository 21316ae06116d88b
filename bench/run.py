"""Every CPU performance target in one run, each a ratio against a baseline measured
in the same run (medians of repeats), printed last as one JSON object:

    {"NAME": {"ratio": R, "target": T, "pass": bool, ...raw figures}}

- train_step: the pipeline's training step (DeepSpeed engine, ZeRO-1, one process,
  fp32, built by `pipeline.train.engine`) against a plain PyTorch loop: the same
  12M-parameter GPT, batch and AdamW; ours / plain >= 0.90.
- loader: the streamed loader (cache off, one rank of 2, one loader worker) against
  the rate the smoke GPT and ViT consume samples; the lower of the two >= 20.
- tokenize: the tokenize stage alone, cold, on 2 Ray CPUs against 1 (medians of
  interleaved repeats; 2 each when quick), on the whole standard library's sources; >= 1.7.
- shard_write: the shard writer (`data.shards.write_shard`: encoding, sha256,
  WebDataset tar) against a bare `tarfile` loop writing the same members; >= 0.5.
- peak_rss: the smoke DAG's peak resident memory, all its processes (the CLI, Ray's
  daemons and workers) summed every 0.5 s; <= 8 GB.
- smoke_dag: the cold `pipeline run configs/smoke.yaml` wall time, reported.

    .venv/bin/python bench/run.py --quick        # 9.5-14 minutes on the 2-core CI machine
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

GiB = 1024**3


def result(ratio: float, target: float, higher_is_better: bool = True, **figures) -> dict:
    ok = ratio >= target if higher_is_better else ratio <= target
    return {"ratio": round(ratio, 3), "target": target, "pass": bool(ok), **figures}


# --------------------------------------------------------------------- train_step


def train_step(repeats: int, steps: int) -> dict:
    import torch

    from pipeline.config import TrainConfig, TransformerConfig
    from pipeline.models.gpt import GPT
    from pipeline.models.layers import count_params
    from pipeline.train.engine import deepspeed_config, init_distributed, initialize, load_zero_config

    torch.set_num_threads(1)  # one core, as a CPU Ray worker gets
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    init_distributed(use_gpu=False)
    vocab, seq, batch = 4096, 128, 8
    shape = TransformerConfig(n_layer=6, n_head=6, d_model=384)

    def model() -> GPT:
        torch.manual_seed(0)
        return GPT(vocab, seq, shape)

    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]
    plain = model()
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def plain_step():
        _, loss = plain(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)  # the pipeline clips too
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    train = TrainConfig(num_workers=1, zero_stage=1, micro_batch_size=batch, max_steps=10**6, warmup_steps=1,
                        lr=1e-4, min_lr=1e-5)
    ours = model()
    groups = [{"params": list(ours.parameters()), "weight_decay": 0.1}]
    engine, _, _ = initialize(ours, groups, train, deepspeed_config(load_zero_config(1), train, 1))

    def engine_step():
        _, loss = engine(x, y)
        engine.backward(loss)
        engine.step()

    def seconds(step) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - start) / steps

    for step in (plain_step, engine_step):  # warm-up: first-step allocations, optimizer state
        step(), step()
    plain_s, ours_s = [], []
    for _ in range(repeats):  # interleaved, so drift in the machine hits both alike
        plain_s.append(seconds(plain_step))
        ours_s.append(seconds(engine_step))
    ratio = statistics.median(plain_s) / statistics.median(ours_s)
    return result(ratio, 0.90, params=count_params(plain), plain_ms=round(1e3 * statistics.median(plain_s), 2),
                  ours_ms=round(1e3 * statistics.median(ours_s), 2))


# --------------------------------------------------------------------- loader


def loader(tmp: str, seconds: float) -> dict:
    import loader as loader_bench  # bench/loader.py

    figures, ratios = {}, []
    for kind, count, micro in (("gpt", loader_bench.SMOKE_SEQUENCES, 16), ("vit", loader_bench.SMOKE_DIGITS, 64)):
        directory = loader_bench.make_shards(f"{tmp}/{kind}", kind, count, 1000)
        figures[kind] = loader_bench.median_ratio(directory, kind, micro, workers=1, cache_mb=0, seconds=seconds)
        ratios.append(figures[kind]["ratio"])
    return result(min(ratios), 20.0, **figures)


# --------------------------------------------------------------------- shard_write


def shard_write(tmp: str, samples: int, repeats: int) -> dict:
    from pipeline.data.shards import iter_shard, write_shard

    rng = np.random.default_rng(0)
    digits = [(rng.integers(0, 256, (28, 28), dtype=np.uint8), int(rng.integers(0, 10))) for _ in range(samples)]
    ours_path, bare_path = f"{tmp}/ours.tar", f"{tmp}/bare.tar"

    def ours() -> None:
        write_shard(ours_path, ({"__key__": f"{i:06d}", "npy": image, "cls": label} for i, (image, label) in enumerate(digits)))

    def members() -> list[tuple[str, bytes]]:
        with tarfile.open(ours_path) as tar:
            return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]

    def bare(entries) -> None:
        with tarfile.open(bare_path, "w") as tar:
            for name, data in entries:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    ours()
    entries = members()
    assert sum(1 for _ in iter_shard(ours_path)) == samples
    ours_s, bare_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        ours()
        ours_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        bare(entries)
        bare_s.append(time.perf_counter() - start)
    ratio = statistics.median(bare_s) / statistics.median(ours_s)
    return result(ratio, 0.5, samples=samples, bytes=os.path.getsize(ours_path),
                  ours_s=round(statistics.median(ours_s), 4), bare_tarfile_s=round(statistics.median(bare_s), 4))


# --------------------------------------------------------------------- the smoke DAG: wall, peak RSS, tokenize


class TreeRss(threading.Thread):
    """Samples the summed RSS of a process and all its descendants."""

    def __init__(self, pid: int, every: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak, self.done = pid, every, 0, threading.Event()

    def run(self) -> None:
        import psutil

        root = psutil.Process(self.pid)
        while not self.done.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            self.peak = max(self.peak, total)
            self.done.wait(self.every)


def pipeline_cli(*args: str, rss: bool = False) -> tuple[float, dict, int]:
    """(wall seconds, the run summary, peak RSS of the process tree) of one CLI run."""
    summary = Path(tempfile.mkstemp(suffix=".json")[1])
    cmd = [str(Path(sys.executable).parent / "pipeline"), *args, "--summary", str(summary)]
    start = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sampler = TreeRss(process.pid) if rss else None
    if sampler:
        sampler.start()
    _, err = process.communicate()
    wall = time.perf_counter() - start
    if sampler:
        sampler.done.set()
        sampler.join()
    if process.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {process.returncode}: {err[-2000:]}")
    return wall, json.loads(summary.read_text()), sampler.peak if sampler else 0


def smoke_dag(tmp: str) -> dict:
    config = str(REPO / "configs" / "smoke.yaml")
    wall, summary, peak = pipeline_cli("run", config, "--workdir", f"{tmp}/smoke", "ray.num_cpus=2", rss=True)
    return {
        "smoke_dag": {"wall_s": round(wall, 1), "stages_s": {k: round(v["seconds"], 1) for k, v in summary["stages"].items()}},
        "peak_rss": result(peak / GiB, 8.0, higher_is_better=False, peak_gb=round(peak / GiB, 2)),
    }


# The whole standard library (about 31 MB here), not the smoke's 3 MB: on that, a cold stage
# is mostly what a second CPU cannot split (the tokenizer's training, worker start-up).
TOKENIZE_CORPUS = ("data.text.max_bytes=100000000",)


def tokenize(tmp: str, repeats: int) -> dict:
    """The tokenize stage alone, cold, the same way on 1 and 2 Ray CPUs (interleaved,
    medians), each run from a copy of one shard stage (a cache hit)."""
    config = str(REPO / "configs" / "smoke.yaml")
    shard_dir = f"{tmp}/tokenize-shard"
    _, summary, _ = pipeline_cli("shard", config, "--workdir", shard_dir, *TOKENIZE_CORPUS)
    corpus = summary["stages"]["shard"]["metrics"]
    seconds: dict[int, list[float]] = {1: [], 2: []}
    for repeat in range(repeats):
        for cpus in seconds:
            workdir = f"{tmp}/tokenize-{cpus}cpu-{repeat}"
            shutil.copytree(f"{shard_dir}/shard", f"{workdir}/shard", symlinks=True)
            _, alone, _ = pipeline_cli("tokenize", config, "--workdir", workdir, f"ray.num_cpus={cpus}", *TOKENIZE_CORPUS)
            seconds[cpus].append(alone["stages"]["tokenize"]["seconds"])
            shutil.rmtree(workdir)
    one, two = statistics.median(seconds[1]), statistics.median(seconds[2])
    return result(one / two, 1.7, one_cpu_s=round(one, 2), two_cpus_s=round(two, 2),
                  text_shard_bytes=corpus["text_train_shard_bytes"] + corpus["text_val_shard_bytes"],
                  repeats={f"{cpus}cpu": [round(v, 2) for v in values] for cpus, values in seconds.items()})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (the figures of bench/RESULTS.md)")
    parser.add_argument("--skip", nargs="*", default=[], help="measurements to leave out, by name")
    args = parser.parse_args()
    repeats = 3 if args.quick else 5
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="tw-bench-") as tmp:
        parts = {
            "train_step": lambda: train_step(repeats, steps=5 if args.quick else 20),
            "loader": lambda: loader(tmp, seconds=6 if args.quick else 15),
            "shard_write": lambda: shard_write(tmp, samples=5000, repeats=repeats),
            # Two pairs when quick: each pair is two cold CLI runs, about 70 s together.
            "tokenize": lambda: tokenize(tmp, 2 if args.quick else repeats),
            "smoke_dag": lambda: smoke_dag(tmp),
        }
        for name, measure in parts.items():
            if name in args.skip:
                continue
            start = time.perf_counter()
            figures = measure()
            out.update(figures if name == "smoke_dag" else {name: figures})  # it gives peak_rss too
            print(f"[bench] {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print(json.dumps(out))
    return 0 if all(v.get("pass", True) for v in out.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
