#!/usr/bin/env bash
# Writes cluster/SCALE.md: `pipeline plan` of each GPT preset at its own world size, and at
# 1 and 64 nodes beside it. Run from the repo root: bash cluster/scale.sh > cluster/SCALE.md
set -euo pipefail
cat <<'HEAD'
# Scale plan: GPT 124M, 1.3B and 7B on nodes of 8 H100s

Written by `bash cluster/scale.sh > cluster/SCALE.md` from the presets in
`configs/cluster/`, each at its own ZeRO stage, micro-batch, accumulation and sequence
length, with the overlap its stage's ZeRO config sets (`pipeline/train/zero_configs/`).
Assumed: bf16, an H100's 989 TFLOP/s dense bf16 peak, 40% MFU for the compute alone
(what the pipeline's own training path measured for GPT-350M on one H200, against 43.5%
for a plain PyTorch loop on the same GPU: bench/RESULTS.md, 2026-11-27; pass `--mfu` to
plan for another figure), 400 Gb/s per GPU between nodes (a p5's 3,200 Gb/s of EFA over
8 GPUs), NVLink inside one node, $4.00 per GPU-hour. Memory is the ZeRO paper's
model-state accounting plus an activation estimate (Korthikanti et al. 2022, no
recomputation) and the loss's logits as held; communication is the bytes each ZeRO stage
moves through each GPU per optimizer step, stage 3's gathers once per micro-batch. The
MFU ceiling is what is left of the assumed MFU after waiting for the links: overlapped,
a step takes the longer of compute and communication; in series, their sum. Estimates,
to size a run before renting it: not measurements (`pipeline/plan.py` says how each is
counted). Re-measure the MFU with `bench/gpu.py` when a GPU is at hand.

At an assumed 40% MFU (an earlier guess, now the measured figure), the 7B preset was ZeRO-3 at micro-batch 2 x 4 accumulation: 159
GB a step through each GPU, 3.2 s against 1.8 s of compute, a 14% ceiling with overlap
off (22% on). It is now ZeRO-2, whose 67 GB overlap hides. The 1.3B preset keeps ZeRO-2;
overlap on lifted it from a 30% ceiling to 40%. Overlap is on in the stage 2 and 3 configs.
HEAD
for model in 124m 1.3b 7b; do
  printf '\n## GPT %s\n' "$model"
  own=$(pipeline plan "configs/cluster/gpt-$model.yaml" --json | python -c "import json,sys; print(json.load(sys.stdin)['nodes'])")
  for nodes in $(printf '%s\n' 1 "$own" 64 | sort -nu); do
    printf '\n```\n$ pipeline plan configs/cluster/gpt-%s.yaml --nodes %s\n' "$model" "$nodes"
    pipeline plan "configs/cluster/gpt-$model.yaml" --nodes "$nodes"
    printf '```\n'
  done
done
