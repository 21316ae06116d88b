"""Benchmark: does a pretrained text decoder help the captioner?

The DAG's GPT cannot start the captioner's decoder: it reads BPE tokens (4,096) at
width 128, the decoder reads 15 symbols at width 96. So this pretrains a GPT of the
decoder's shape and vocabulary on digit text (the written form of the training
grids), then fine-tunes the captioner of `configs/digits.yaml` twice, the same
steps from the same pretrained ViT: with a fresh decoder, and with the text model's
embeddings, self-attention, MLPs and final norm (`finetune.init_decoder`). The
choice is read off validation; the test numbers are printed for the record.

    .venv/bin/python bench/decoder_init.py [--workdir runs/digits] [--text-steps 600] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import TransformerConfig, load_config  # noqa: E402
from pipeline.data import shards  # noqa: E402
from pipeline.models.captioner import MAX_TEXT_LEN, PAD, VOCAB, encode_text  # noqa: E402
from pipeline.models.gpt import GPT  # noqa: E402
from pipeline.train.checkpoint import unique_state  # noqa: E402


def run_digits(workdir: Path, name: str, overrides: list[str]) -> dict:
    summary = workdir / f"{name}.json"
    cmd = [str(Path(sys.executable).parent / "pipeline"), "run", str(REPO / "configs/digits.yaml"),
           "--workdir", str(workdir), "--summary", str(summary), *overrides]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(summary.read_text())


def grid_texts(shard_dir: str) -> torch.Tensor:
    """(N, MAX_TEXT_LEN + 1) token ids of every grid's text, BOS ... EOS, padded."""
    ids = [encode_text(s["txt"]) for s in shards.iter_verified(shard_dir)]
    out = torch.full((len(ids), MAX_TEXT_LEN + 1), PAD, dtype=torch.long)
    for i, seq in enumerate(ids):
        out[i, : len(seq)] = torch.tensor(seq)
    return out


def text_loss(model: GPT, batch: torch.Tensor) -> torch.Tensor:
    logits, _ = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), ignore_index=PAD)


def pretrain_text_decoder(shape: TransformerConfig, train: torch.Tensor, val: torch.Tensor, steps: int,
                          batch_size: int = 64, lr: float = 2e-3) -> tuple[GPT, list[tuple[int, float]]]:
    torch.manual_seed(0)
    model = GPT(len(VOCAB), MAX_TEXT_LEN + 1, shape)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(0)
    curve = []
    for step in range(1, steps + 1):
        loss = text_loss(model, train[torch.randint(len(train), (batch_size,), generator=g)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, steps // 6) == 0 or step == steps:
            with torch.no_grad():
                model.eval()
                curve.append((step, text_loss(model, val).item()))
                model.train()
    return model, curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=str(REPO / "runs/digits"))
    parser.add_argument("--text-steps", type=int, default=600, help="steps of digit-text pretraining (batch 64)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for both runs")
    args = parser.parse_args()
    workdir = Path(args.workdir)

    start = time.perf_counter()
    fresh = run_digits(workdir, "decoder-fresh", args.overrides)
    fresh_s = time.perf_counter() - start

    shape = load_config(str(REPO / "configs/digits.yaml"), args.overrides).finetune.decoder
    shard_out = fresh["stages"]["shard"]["outputs"]
    train, val = grid_texts(shard_out["grids_train"]), grid_texts(shard_out["grids_val"])
    text_model, curve = pretrain_text_decoder(shape, train, val, args.text_steps)
    weights = workdir / "digit_text_decoder.safetensors"
    from safetensors.torch import save_file

    save_file(unique_state(text_model), str(weights))

    start = time.perf_counter()
    pretrained = run_digits(workdir, "decoder-pretrained", [*args.overrides, f"finetune.init_decoder={weights}"])
    pretrained_s = time.perf_counter() - start

    print(f"digit-text decoder: {len(train)} training grids, validation loss by step "
          + ", ".join(f"{s}: {v:.3f}" for s, v in curve))
    rows = [("fine-tune val loss", "finetune", "final_val_loss"),
            ("val per cell, ragged", "evaluate", "captioner_val_per_cell_accuracy"),
            ("val per digit, 2x2", "evaluate", "captioner_2x2_val_per_digit_accuracy"),
            ("test per cell, ragged (record only)", "evaluate", "captioner_per_cell_accuracy"),
            ("test per digit, 2x2 (record only)", "evaluate", "captioner_2x2_per_digit_accuracy")]
    print(f"{'':<38}{'fresh':>10}{'from text':>12}")
    for label, stage, key in rows:
        a, b = (s["stages"][stage]["metrics"].get(key, float("nan")) for s in (fresh, pretrained))
        print(f"{label:<38}{a:>10.4f}{b:>12.4f}")
    print(f"wall seconds (fresh includes any upstream stages): {fresh_s:.0f} / {pretrained_s:.0f}")
    chosen = "captioner_val_per_cell_accuracy"
    better = "from text" if pretrained["stages"]["evaluate"]["metrics"][chosen] > fresh["stages"]["evaluate"]["metrics"][chosen] else "fresh"
    print(f"better on validation per-cell accuracy: {better}")


if __name__ == "__main__":
    main()
