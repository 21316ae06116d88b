"""One GPU, one prepared run: the pipeline's training path against a plain PyTorch
loop, model by model, in the same process tree and the same minutes.

- GPT ~124M (12 x 768) and ~350M (24 x 1024), seq 1,024, vocabulary 50,304:
  through the pipeline (Ray Train, DeepSpeed ZeRO-1, bf16, torch.compile, fused
  AdamW, chunked cross-entropy) and in a plain loop (bf16 autocast, fused AdamW,
  torch.compile, SDPA); tokens/s, MFU, peak GPU memory, pipeline / plain.
- ViT-S/16 at 224 px, 1,000 classes: images/s through the pipeline's DeepSpeed
  engine (`pipeline.train.engine`, without Ray and the loader: device-resident
  batches) and in the plain loop.
- Resume: stop a run at step N, resume it, compare its final weights with an
  uninterrupted run's (and, on a GPU, with a second uninterrupted run: the floor
  that GPU kernels' own run-to-run differences set).

Synthetic data (random tokens and pixels): it measures the training path, not the
data. MFU counts 6N + 12·L·T·d FLOPs per token (pipeline/models/flops.py) against
989 TFLOP/s, an H100 SXM's dense bf16 peak (an H200's is the same).

    python bench/gpu.py --out results.json    # one GPU, about 7 minutes
    python bench/gpu.py --cpu --tiny          # the same code on tiny models
    python bench/gpu.py --cpu --tiny --no-compile   # ... without torch.compile (CI)

Prints one JSON object last. Installs nothing: see bench/gpu_carry.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import PretrainGPTConfig, TrainConfig, TransformerConfig  # noqa: E402
from pipeline.models import flops  # noqa: E402
from pipeline.models.gpt import GPT  # noqa: E402
from pipeline.models.vit import ViT  # noqa: E402

PEAK_BF16 = 989e12  # H100 SXM, dense bf16
PEAK_CPU = 180e9  # one core of the CI machine, fp32 (see TrainConfig.peak_flops_per_worker)


@dataclass(frozen=True)
class GPTSize:
    name: str
    n_layer: int
    n_head: int
    d_model: int
    seq_len: int
    vocab: int
    micro_batch: int

    def shape(self) -> TransformerConfig:
        return TransformerConfig(n_layer=self.n_layer, n_head=self.n_head, d_model=self.d_model)


@dataclass(frozen=True)
class ViTSize:
    name: str
    n_layer: int
    n_head: int
    d_model: int
    image: int
    patch: int
    channels: int
    classes: int
    batch: int

    @property
    def num_patches(self) -> int:
        return (self.image // self.patch) ** 2

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch**2


GPT_SIZES = {
    "gpu": [GPTSize("gpt-124m", 12, 12, 768, 1024, 50304, 16), GPTSize("gpt-350m", 24, 16, 1024, 1024, 50304, 16)],
    "tiny": [GPTSize("gpt-tiny", 2, 4, 64, 64, 512, 4)],
}
VIT_SIZES = {"gpu": ViTSize("vit-s16-224", 12, 6, 384, 224, 16, 3, 1000, 128),
             "tiny": ViTSize("vit-tiny", 2, 4, 64, 32, 8, 3, 10, 4)}
RESUME_SIZES = {"gpu": GPTSize("gpt-resume", 4, 4, 256, 256, 4096, 8), "tiny": GPTSize("gpt-resume", 2, 4, 64, 64, 512, 4)}


@dataclass(frozen=True)
class Setting:
    device: torch.device
    dtype: torch.dtype
    peak: float
    steps: int  # plain loops: steps, of which `warmup` are not timed
    warmup: int
    pipeline_steps: int  # pipeline runs: three logging windows, the last one timed
    compile: bool = True  # torch.compile in both ways (off: the CPU check of the code path)

    @property
    def precision(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed_steps(step, setting: Setting) -> float:
    """Seconds per step of `step()`, after `warmup` untimed steps (compilation)."""
    for _ in range(setting.warmup):
        step()
    synchronize(setting.device)
    start = time.perf_counter()
    for _ in range(setting.steps - setting.warmup):
        step()
    synchronize(setting.device)
    return (time.perf_counter() - start) / (setting.steps - setting.warmup)


def gpt_flops_per_token(model: GPT, size: GPTSize) -> float:
    return flops.flops_per_token(flops.matmul_params(model), size.n_layer, size.seq_len, size.d_model)


# --------------------------------------------------------------------- plain loops


def plain_seconds_per_step(model: torch.nn.Module, inputs: tuple, setting: Setting) -> float:
    """nanoGPT's loop on `model(*inputs) -> (_, loss)`: bf16 autocast over fp32 weights,
    fused AdamW, torch.compile, SDPA."""
    if setting.compile:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=setting.gpu)

    def step():
        with torch.autocast(setting.device.type, dtype=setting.dtype, enabled=setting.dtype != torch.float32):
            _, loss = model(*inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed_steps(step, setting)


def plain_gpt(size: GPTSize, setting: Setting) -> dict:
    device = setting.device
    reset_peak(device)
    torch.manual_seed(0)
    model = GPT(size.vocab, size.seq_len, size.shape()).to(device)
    per_token = gpt_flops_per_token(model, size)
    seq = torch.randint(0, size.vocab, (size.micro_batch, size.seq_len + 1), device=device)
    tokens_per_s = size.micro_batch * size.seq_len / plain_seconds_per_step(model, (seq[:, :-1], seq[:, 1:]), setting)
    return {"tokens_per_s": tokens_per_s, "mfu": tokens_per_s * per_token / setting.peak, "peak_gpu_memory_gb": peak_gb(device)}


def vit_flops_per_image(model: ViT, size: ViTSize) -> float:
    head = flops.matmul_params(model.head)
    return flops.vit_flops_per_image(flops.matmul_params(model), head, size.n_layer, size.num_patches, size.d_model)


def vit_batch(size: ViTSize, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    patches = torch.randn(size.batch, size.num_patches, size.patch_dim, generator=g).to(device)
    labels = torch.randint(0, size.classes, (size.batch,), generator=g).to(device)
    return patches, labels


def build_vit(size: ViTSize) -> ViT:
    torch.manual_seed(0)
    shape = TransformerConfig(n_layer=size.n_layer, n_head=size.n_head, d_model=size.d_model)
    return ViT(size.num_patches, size.patch_dim, size.classes, shape)


def plain_vit(size: ViTSize, setting: Setting) -> dict:
    device = setting.device
    reset_peak(device)
    model = build_vit(size).to(device)
    per_image = vit_flops_per_image(model, size)
    images_per_s = size.batch / plain_seconds_per_step(model, vit_batch(size, device), setting)
    return {"images_per_s": images_per_s, "mfu": images_per_s * per_image / setting.peak, "peak_gpu_memory_gb": peak_gb(device)}


# --------------------------------------------------------------------- the pipeline's path


def train_config(setting: Setting, micro_batch: int, **overrides) -> TrainConfig:
    steps = setting.pipeline_steps
    values = dict(num_workers=1, use_gpu=setting.gpu, zero_stage=1, precision=setting.precision,
                  micro_batch_size=micro_batch, max_steps=steps, warmup_steps=1, lr=1e-4, min_lr=1e-5,
                  log_every=steps // 3, peak_flops_per_worker=setting.peak, compile=setting.compile)
    return TrainConfig(**{**values, **overrides})


def write_tokens(directory: str, size: GPTSize, samples: int) -> str:
    """Token shards of random sequences and their manifest, as the tokenize stage writes them."""
    from pipeline.data.shards import write_manifest, write_shard
    from pipeline.preprocess.tokenize import token_dtype

    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    infos = []
    for s in range(2):
        ids = (rng.integers(0, size.vocab, size.seq_len + 1).astype(token_dtype(size.vocab)) for _ in range(samples // 2))
        infos.append(write_shard(os.path.join(directory, f"tokens-{s}.tar"),
                                 ({"__key__": f"{s}-{i}", "npy": a} for i, a in enumerate(ids))))
    write_manifest(directory, infos, {"npy": "token ids"}, "bench", seq_len=size.seq_len, vocab_size=size.vocab)
    return directory


def gpt_spec(size: GPTSize, train: TrainConfig, tokens: str, weights_out: str, **extra):
    from pipeline.kinds.gpt import GPTModelConfig
    from pipeline.train.engine import load_zero_config
    from pipeline.train.spec import TrainSpec

    return TrainSpec(kind="gpt", model=GPTModelConfig(size.vocab, size.seq_len, size.shape()),
                     section=PretrainGPTConfig(model=size.shape(), train=train), train_data=tokens,
                     deepspeed=load_zero_config(train.zero_stage), weights_out=weights_out, **extra)


def pipeline_gpt(size: GPTSize, setting: Setting, tmp: str) -> dict:
    """Ray Train + DeepSpeed through `pipeline.train.launch.fit`, as a pretrain stage runs it.
    The trainer's last logging window (a third of the steps, past compilation) is the figure."""
    from pipeline.train.launch import fit

    train = train_config(setting, size.micro_batch)
    tokens = write_tokens(os.path.join(tmp, size.name, "tokens"), size, 8 * size.micro_batch)
    spec = gpt_spec(size, train, tokens, os.path.join(tmp, size.name, "weights.safetensors"))
    metrics = fit(spec, os.path.join(tmp, size.name, "run"))["metrics"]
    return {"tokens_per_s": metrics["tokens_per_s"], "mfu": metrics["mfu"],
            "peak_gpu_memory_gb": metrics.get("peak_gpu_memory_gb")}


def pipeline_vit(size: ViTSize, setting: Setting) -> dict:
    """The pipeline's DeepSpeed engine (`pipeline.train.engine`: ZeRO-1, fused AdamW,
    engine.compile) on device-resident batches, in this process."""
    from pipeline.train.engine import deepspeed_config, init_distributed, initialize, load_zero_config

    device = setting.device
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("BENCH_PORT", "29533"), RANK="0",
                      LOCAL_RANK="0", WORLD_SIZE="1")
    if not torch.distributed.is_initialized():
        init_distributed(setting.gpu)
    reset_peak(device)
    train = train_config(setting, size.batch)
    model = build_vit(size).to(device)
    per_image = vit_flops_per_image(model, size)
    groups = [{"params": list(model.parameters()), "weight_decay": train.weight_decay}]
    engine, _, _ = initialize(model, groups, train, deepspeed_config(load_zero_config(1), train, 1))
    patches, labels = vit_batch(size, device)
    patches = patches.to(setting.dtype)  # DeepSpeed's bf16 mode holds the weights in bf16

    def step():
        _, loss = engine(patches, labels)
        engine.backward(loss)
        engine.step()

    images_per_s = size.batch / timed_steps(step, setting)
    return {"images_per_s": images_per_s, "mfu": images_per_s * per_image / setting.peak,
            "peak_gpu_memory_gb": peak_gb(device)}


# --------------------------------------------------------------------- resume


def resume_check(size: GPTSize, setting: Setting, tmp: str, stop_at: int = 10) -> dict:
    """Train 2N steps straight; train N, stop, resume from the step-N checkpoint to 2N;
    compare final weights. On a GPU a second straight run gives the noise floor."""
    from safetensors.torch import load_file

    from pipeline.train.launch import fit

    root = os.path.join(tmp, "resume")
    tokens = write_tokens(os.path.join(root, "tokens"), size, 64 * size.micro_batch)
    train = train_config(setting, size.micro_batch, max_steps=2 * stop_at, log_every=stop_at, checkpoint_every=stop_at,
                         compile=False)

    def run(name: str, **extra) -> dict:
        out = fit(gpt_spec(size, train, tokens, os.path.join(root, f"{name}.safetensors"), **extra), os.path.join(root, name))
        return {"weights": load_file(os.path.join(root, f"{name}.safetensors")), **out}

    straight = run("straight")
    resumed = run("resumed", resume_from=straight["checkpoints_by_step"][stop_at])

    def max_diff(a: dict, b: dict) -> float:
        return max((a[k].float() - b[k].float()).abs().max().item() for k in a)

    result = {"stop_at": stop_at, "steps": 2 * stop_at, "model": size.name,
              "bit_exact": all(torch.equal(straight["weights"][k], resumed["weights"][k]) for k in straight["weights"]),
              "max_abs_diff_resumed": max_diff(straight["weights"], resumed["weights"])}
    if setting.gpu:
        again = run("straight-again")
        result["max_abs_diff_two_straight_runs"] = max_diff(straight["weights"], again["weights"])
    return result


# --------------------------------------------------------------------- the run


def ratio(ours: dict, plain: dict, key: str) -> float:
    return ours[key] / plain[key]


def guarded(results: dict, name: str, measure, out: str | None) -> None:
    """Run one measurement; an error is recorded under its name and the run goes on."""
    start = time.perf_counter()
    try:
        results[name] = measure()
    except Exception as error:  # one broken measurement must not lose the others
        traceback.print_exc()
        results[name] = {"error": f"{type(error).__name__}: {error}"}
    results[name]["seconds"] = round(time.perf_counter() - start, 1)
    print(f"[bench] {name}: {json.dumps(results[name])}", flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU in fp32 (no GPU needed)")
    parser.add_argument("--tiny", action="store_true", help="tiny models, a few steps: the code path, not figures")
    parser.add_argument("--out", help="also write the JSON here, after each measurement")
    parser.add_argument("--skip", nargs="*", default=[], help="measurements to leave out, by name")
    parser.add_argument("--no-compile", action="store_true",
                        help="both ways without torch.compile (a CPU check of the code path: compiling is most of its time)")
    args = parser.parse_args()

    if not args.cpu and not torch.cuda.is_available():
        parser.error("no GPU here: use --cpu (with --tiny for a quick check)")
    gpu = not args.cpu
    scale = "tiny" if args.tiny else "gpu"
    setting = Setting(torch.device("cuda" if gpu else "cpu"), torch.bfloat16 if gpu else torch.float32,
                      PEAK_BF16 if gpu else PEAK_CPU, steps=6 if args.tiny else 40, warmup=3 if args.tiny else 10,
                      pipeline_steps=6 if args.tiny else 90, compile=not args.no_compile)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    import ray

    ray.init(num_cpus=None if gpu else 2, include_dashboard=False, log_to_driver=True)
    results: dict = {"device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
                     "precision": setting.precision, "peak_flops": setting.peak}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for size in GPT_SIZES[scale]:
            for way, measure in (("pipeline", lambda s=size: pipeline_gpt(s, setting, tmp)),
                                 ("plain", lambda s=size: plain_gpt(s, setting))):
                if f"{size.name}/{way}" not in args.skip and size.name not in args.skip:
                    guarded(results, f"{size.name}/{way}", measure, args.out)
        vit = VIT_SIZES[scale]
        if vit.name not in args.skip:
            guarded(results, f"{vit.name}/plain", lambda: plain_vit(vit, setting), args.out)
            guarded(results, f"{vit.name}/pipeline-engine", lambda: pipeline_vit(vit, setting), args.out)
        if "resume" not in args.skip:
            guarded(results, "resume", lambda: resume_check(RESUME_SIZES[scale], setting, tmp), args.out)
    ray.shutdown()

    for size in GPT_SIZES[scale]:
        ours, plain = results.get(f"{size.name}/pipeline", {}), results.get(f"{size.name}/plain", {})
        if "tokens_per_s" in ours and "tokens_per_s" in plain:
            results[f"{size.name}/pipeline_over_plain"] = ratio(ours, plain, "tokens_per_s")
    ours, plain = results.get(f"{vit.name}/pipeline-engine", {}), results.get(f"{vit.name}/plain", {})
    if "images_per_s" in ours and "images_per_s" in plain:
        results[f"{vit.name}/pipeline_over_plain"] = ratio(ours, plain, "images_per_s")
    results["wall_s"] = round(time.perf_counter() - start, 1)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
