"""The eight stages of the pipeline, each a function of a `StageContext`: shard,
tokenize, patchify, one training stage per model kind (`pipeline.kinds`), and the
two evaluations.

Heavy lifting lives in `data/`, `preprocess/`, `kinds/`, `train/` and `evaluate`;
this module wires inputs to outputs and fans per-shard work out as Ray tasks.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable, Iterable

from pipeline import storage, tracking
from pipeline.config import ConfigError
from pipeline.dag import Stage, StageContext, StageResult
from pipeline.data import shards, sources
from pipeline.data.shards import ShardInfo
from pipeline.keys import Artifact, Metric, Param
from pipeline.kinds import KINDS, ModelKind
from pipeline.kinds.base import param_counts
from pipeline.train.checkpoint import MODEL_CONFIG, WEIGHTS
from pipeline.train.spec import TrainSpec

# --------------------------------------------------------------------------- writing shards


def _write_samples(path: str, make: Callable[..., Iterable[dict]], args: tuple) -> ShardInfo:
    return shards.write_shard(path, make(*args))


def _shard_ranges(count: int, per_shard: int) -> list[tuple[int, int]]:
    return [(start, min(count, start + per_shard)) for start in range(0, max(count, 1), per_shard)]


def _write_split(ctx: StageContext, out_dir: str, prefix: str, make: Callable[..., Iterable[dict]],
                 shard_args: list[tuple], schema: dict[str, str], desc: str) -> dict:
    """One shard per entry of `shard_args`, shard i yielded by `make(*shard_args[i])`, then the manifest."""
    calls = [(storage.join(out_dir, f"{prefix}-{i:06d}.tar"), make, args) for i, args in enumerate(shard_args)]
    return shards.write_manifest(out_dir, ctx.fan_out.map(_write_samples, calls, desc), schema, ctx.fingerprint)


# --------------------------------------------------------------------------- shard


def _write_text_part(cfg, part: sources.TextPart, train_path: str, val_path: str, every: int) -> tuple[ShardInfo, ShardInfo]:
    """Read one part of the text source and write its train and validation shards
    (every `every`-th document of the part goes to validation)."""
    docs = list(sources.read_text_part(cfg, part))

    def samples(split: str):
        for n, (key, text) in enumerate(docs):
            if sources.held_out_for_validation(n, every) == (split == "val"):
                yield {"__key__": f"doc-{part.number:05d}-{n:06d}", "txt": text, "json": {"source_key": key}}

    return shards.write_shard(train_path, samples("train")), shards.write_shard(val_path, samples("val"))


def run_shard(ctx: StageContext) -> StageResult:
    data = ctx.config.data
    out, fp = ctx.out_dir, ctx.fingerprint
    outputs: dict[str, str] = {}
    metrics: dict[str, float] = {}

    digit_schema = {"png": "uint8 28x28 grayscale digit", "cls": "int label 0-9"}
    listed = {"folder": sources.plan_image_folder, "idx": sources.plan_idx}.get(data.mnist.source)
    items = listed(data.mnist) if listed else None  # the driver lists names and positions; tasks read the images
    for split in sources.SPLITS:
        digits = sources.ImageSet(split)
        d = storage.join(out, *digits.parts)
        if data.mnist.source == "embedded":
            ranges = _shard_ranges(len(sources.mnist_split(split)[1]), data.mnist.samples_per_shard)
            make, shard_args = sources.digit_samples, [(split, a, b) for a, b in ranges]
        elif data.mnist.source == "hf":  # each task streams its own files (or row groups) of the dataset
            _, parts = sources.hf_stream(data.mnist.hf_dataset, None, sources.hf_digit_split(split), data.mnist.hf_parts)
            make, shard_args = sources.hf_digit_samples, [(data.mnist, split, p) for p in range(parts)]
        elif data.mnist.source == "idx":  # each task reads the images at its own positions
            ranges = _shard_ranges(len(items[split]), data.mnist.samples_per_shard)
            images = storage.absolute(data.mnist.images)  # tasks may run in another directory
            make, shard_args = sources.idx_digit_samples, [(images, items[split][a:b]) for a, b in ranges]
        else:  # each task gets only its own file names
            ranges = _shard_ranges(len(items[split]), data.mnist.samples_per_shard)
            make, shard_args = sources.folder_digit_samples, [(items[split][a:b], a) for a, b in ranges]
        m = _write_split(ctx, d, "mnist", make, shard_args, digit_schema, f"shard mnist/{split}")
        outputs[digits.output] = d
        metrics[f"{digits.output}_samples"] = m["total_samples"]

    grid_schema = {"png": "uint8 grid image of 28x28 cells", "txt": "digits row by row, '_' blank",
                   "json": "rows, cols, digit_keys (the digits' keys in the mnist shards of the split)"}
    grid_sets = {g.name: g for g in data.grid_sets()}
    for image_set in sources.image_sets(data):
        if image_set.grid_set is None:
            continue  # written above
        grids, split, name = grid_sets[image_set.grid_set], image_set.split, image_set.output
        d = storage.join(out, *image_set.parts)
        ranges = _shard_ranges(getattr(grids, f"{split}_count"), grids.samples_per_shard)
        shard_args = [(grids, split, outputs[sources.ImageSet(split).output], data.seed, a, b) for a, b in ranges]
        m = _write_split(ctx, d, "grids", sources.grid_samples, shard_args, grid_schema, f"shard {name}")
        outputs[name] = d
        metrics[f"{name}_samples"] = m["total_samples"]

    # The driver lists the parts; each Ray task reads only its own.
    text_schema = {"txt": "a UTF-8 document", "json": "source_key"}
    dirs = {split: storage.join(out, "text", split) for split in ("train", "val")}
    every = max(2, round(1 / data.text.val_fraction))
    calls = [(data.text, part, storage.join(dirs["train"], f"text-{part.number:06d}.tar"),
              storage.join(dirs["val"], f"text-{part.number:06d}.tar"), every)
             for part in sources.plan_text_parts(data.text, data.seed)]
    written = ctx.fan_out.map(_write_text_part, calls, "shard text")
    for split, infos in zip(("train", "val"), zip(*written)):
        m = shards.write_manifest(dirs[split], list(infos), text_schema, fp)
        if m["total_samples"] == 0:
            raise sources.SourceError(f"text source '{data.text.source}' gave no {split} documents")
        outputs[f"text_{split}"] = dirs[split]
        metrics[f"text_{split}_docs"] = m["total_samples"]
        metrics[f"text_{split}_shard_bytes"] = m["total_bytes"]
    return StageResult(outputs, metrics)


# --------------------------------------------------------------------------- tokenize


def run_tokenize(ctx: StageContext) -> StageResult:
    from pipeline.preprocess.tokenize import tokenize_shard, train_bpe_on_shards

    cfg = ctx.config.tokenize
    raw = ctx.inputs["shard"]
    # Trained in a task on a bounded sample of the training text: the driver holds no text.
    tokenizer_json = ctx.fan_out.call(train_bpe_on_shards, shards.shard_entries(raw["text_train"]), cfg.vocab_size,
                                      cfg.train_bytes)
    tokenizer_path = storage.join(ctx.out_dir, "tokenizer.json")
    storage.write_bytes_atomic(tokenizer_path, tokenizer_json.encode("utf-8"))
    vocab_size = len(json.loads(tokenizer_json)["model"]["vocab"])

    outputs: dict[str, Any] = {"tokenizer": tokenizer_path}
    metrics: dict[str, float] = {"vocab_size": vocab_size}
    schema = {"npy": f"uint16/int32 array of seq_len+1 = {cfg.seq_len + 1} token ids"}
    # Both splits in one fan-out, largest shards first, so that no CPU idles at a split's end.
    splits = {split: storage.join(ctx.out_dir, "tokens", split) for split in ("train", "val")}
    jobs = [(split, entry, storage.join(out, f"tokens-{i:06d}.tar"))
            for split, out in splits.items()
            for i, entry in enumerate(shards.shard_entries(raw[f"text_{split}"]))]
    jobs.sort(key=lambda job: -job[1]["bytes"])
    calls = [(entry, path, tokenizer_json, cfg.seq_len) for _, entry, path in jobs]
    infos = ctx.fan_out.map(tokenize_shard, calls, "tokenize")
    for split, out in splits.items():
        mine = [info for (s, _, _), info in zip(jobs, infos) if s == split]  # the manifest lists them by name
        m = shards.write_manifest(out, mine, schema, ctx.fingerprint, seq_len=cfg.seq_len, vocab_size=vocab_size)
        if m["total_samples"] == 0:
            raise ValueError(f"the {split} text is shorter than one sequence of {cfg.seq_len + 1} tokens")
        outputs[f"tokens_{split}"] = out
        metrics[f"{split}_sequences"] = m["total_samples"]
        metrics[f"{split}_tokens"] = m["total_samples"] * cfg.seq_len
    return StageResult(outputs, metrics)


# --------------------------------------------------------------------------- patchify


def run_patchify(ctx: StageContext) -> StageResult:
    from pipeline.preprocess.patchify import patchify_shard

    cfg = ctx.config.patchify
    raw = ctx.inputs["shard"]
    outputs: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    schema = {"npy": f"float16 (num_patches, {cfg.patch_size ** 2}) normalised patches, raster order"}
    for image_set in sources.image_sets(ctx.config.data):  # what the shard stage wrote (its fingerprint says)
        name = image_set.output
        out = storage.join(ctx.out_dir, *image_set.parts)
        calls = [
            (entry, storage.join(out, f"patches-{i:06d}.tar"), cfg.patch_size, cfg.mean, cfg.std)
            for i, entry in enumerate(shards.shard_entries(raw[name]))
        ]
        infos = ctx.fan_out.map(patchify_shard, calls, f"patchify {name}")
        m = shards.write_manifest(out, infos, schema, ctx.fingerprint, patch_size=cfg.patch_size)
        outputs[name] = out
        metrics[f"{name}_samples"] = m["total_samples"]
    return StageResult(outputs, metrics)


# --------------------------------------------------------------------------- training


def run_training(ctx: StageContext, kind: ModelKind) -> StageResult:
    """Train the stage's model kind under Ray Train (see `train.launch.fit`)."""
    import torch

    from pipeline.train.engine import load_zero_config
    from pipeline.train.launch import fit

    config, section = ctx.config, kind.section(ctx.config)
    train_dir, val_dir = kind.shards(ctx.inputs)
    skip = _log_skipped(ctx) if config.data.on_bad_shard == "skip" else ((), ())
    spec = TrainSpec(
        kind=kind.name,
        model=kind.model_config(config, ctx.inputs),
        section=section,
        train_data=train_dir,
        val_data=val_dir,
        deepspeed=load_zero_config(section.train.zero_stage),
        weights_out=storage.join(ctx.out_dir, WEIGHTS),
        start=kind.starting_weights(config, ctx.inputs),
        tracking_uri=ctx.tracker.uri,
        mlflow_run_id=ctx.run_id,
        skip_shards=skip[0],
        skip_val_shards=skip[1],
        shard_cache_dir=config.data.cache_dir,
        shard_cache_mb=config.data.cache_mb,
    )
    with torch.device("meta"):  # shapes only: the driver never holds the weights
        model = kind.build(spec.model)
    kind.initialise(model, spec.start, check_only=True)  # a misfit is refused before any worker starts
    model_config_path = storage.join(ctx.out_dir, MODEL_CONFIG)
    kind.write_config(model_config_path, spec.model)

    result = fit(spec, ctx.out_dir)
    params = {**param_counts(model), Param.WORLD_SIZE: section.train.num_workers, Param.ZERO_STAGE: section.train.zero_stage}
    reported = result["metrics"]
    metrics = {Metric.final(k): float(reported[k]) for k in (Metric.LOSS, Metric.VAL_LOSS, Metric.VAL_ACCURACY)
               if k in reported}
    outputs = {"checkpoint": result["checkpoint"], "weights": spec.weights_out, "model_config": model_config_path,
               **kind.finish(ctx.out_dir, ctx.inputs)}
    loss_plot = storage.join(ctx.out_dir, Artifact.LOSS_PLOT)
    if tracking.plot_loss(ctx.tracker, ctx.run_id, kind.unit, loss_plot):
        outputs["loss_plot"] = loss_plot
    if config.tracking.log_weights:
        ctx.tracker.log_files(ctx.run_id, [spec.weights_out, model_config_path])
    return StageResult(outputs, metrics, params)


def skipped_shards(config, inputs: dict[str, dict[str, Any]], fan_out, kind: ModelKind):
    """Under `data.on_bad_shard: skip`, every training and validation shard read and
    decoded (fanned out) before the stage is fingerprinted: (the bad shards' names by
    split, {split: {name: what is wrong}}), or None when none is bad. A model trained
    without some shards is then never the cached answer for all of them, and once they
    are repaired the clean run's cache applies again."""
    if config.data.on_bad_shard != "skip":
        return None
    found = {}
    for split, directory in zip(("training", "validation"), kind.shards(inputs)):
        desc = f"check {split} shards"
        found[split] = shards.bad_shards(directory, lambda fn, entries: fan_out.map(fn, [(e,) for e in entries], desc))
        for name, why in sorted(found[split].items()):
            print(f"[data] skipping bad {split} shard {name}: {why}", flush=True)
    if not any(found.values()):
        return None
    return {split: sorted(bad) for split, bad in found.items()}, found


def _log_skipped(ctx: StageContext) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The shards `skipped_shards` found bad, named in the stage's MLflow run (params
    `skipped_shards`, `skipped_val_shards`, their counts, and `skipped_shards.txt`)."""
    found = ctx.data_check or {"training": {}, "validation": {}}
    train_bad, val_bad = (tuple(sorted(found[split])) for split in ("training", "validation"))
    for key, bad in ((Param.SKIPPED_SHARDS, train_bad), (Param.SKIPPED_VAL_SHARDS, val_bad)):
        ctx.tracker.log_params(ctx.run_id, {key: ",".join(bad) or "none"})
        ctx.tracker.log_metrics(ctx.run_id, {f"{key}_count": len(bad)})
    if train_bad or val_bad:
        lines = [f"{split} {n}: {w}\n" for split, bad in found.items() for n, w in sorted(bad.items())]
        ctx.tracker.log_text(ctx.run_id, "".join(lines), Artifact.SKIPPED_SHARDS)
    return train_bad, val_bad


# --------------------------------------------------------------------------- evaluate


def _evaluation_task(ctx: StageContext, fn: Callable, *args: Any) -> Any:
    """`fn(*args)` as one task with `evaluate.num_cpus` (refused at once if the cluster
    has fewer: Ray would wait forever) and a GPU if `evaluate.use_gpu`."""
    cfg = ctx.config.evaluate
    total = ctx.fan_out.cpus()
    if cfg.num_cpus > total:
        raise ConfigError(f"evaluate.num_cpus is {cfg.num_cpus} but the Ray cluster has {total} CPUs")
    return ctx.fan_out.call(fn, *args, num_cpus=cfg.num_cpus, num_gpus=1 if cfg.use_gpu else 0)


def run_evaluate_gpt(ctx: StageContext) -> StageResult:
    from pipeline import evaluate

    cfg = ctx.config.evaluate
    metrics = _evaluation_task(ctx, evaluate.evaluate_gpt, ctx.inputs["pretrain_gpt"], ctx.inputs["tokenize"]["tokens_val"], cfg)
    metrics_path = storage.join(ctx.out_dir, "metrics.json")
    storage.write_json_atomic(metrics_path, metrics)
    return StageResult({"metrics": metrics_path}, metrics)


def run_evaluate(ctx: StageContext) -> StageResult:
    from pipeline import evaluate

    cfg = ctx.config.evaluate
    grid_sets = [g.name for g in ctx.config.data.grid_sets()]
    metrics, examples = _evaluation_task(ctx, evaluate.evaluate_images, ctx.inputs, cfg, grid_sets, ctx.out_dir)
    outputs = {"metrics": storage.join(ctx.out_dir, "metrics.json"),
               "captioner_examples": storage.join(ctx.out_dir, "captioner_examples.json")}
    storage.write_json_atomic(outputs["metrics"], metrics)
    storage.write_json_atomic(outputs["captioner_examples"], examples)
    for picture in evaluate.PICTURES:
        path = storage.join(ctx.out_dir, picture)
        if storage.exists(path):
            outputs[picture.removesuffix(".png")] = path
    ctx.tracker.log_files(ctx.run_id, list(outputs.values()))
    return StageResult(outputs, metrics)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        # on_bad_shard decides whether a stage with bad shards fails; what a training stage left
        # out joins its fingerprint (check_data)
        Stage("shard", (), lambda c: dataclasses.replace(c.data, on_bad_shard="error"), run_shard),
        Stage("tokenize", ("shard",), lambda c: c.tokenize, run_tokenize),
        Stage("patchify", ("shard",), lambda c: c.patchify, run_patchify),
        *(Stage(kind.stage, kind.deps, kind.section, functools.partial(run_training, kind=kind), resumable=True,
                check_data=functools.partial(skipped_shards, kind=kind))
          for kind in KINDS.values()),
        Stage("evaluate_gpt", ("tokenize", "pretrain_gpt"), lambda c: c.evaluate, run_evaluate_gpt),
        # the grid sets' names decide which metrics there are
        Stage("evaluate", ("shard", "patchify", "pretrain_vit", "finetune"),
              lambda c: {**dataclasses.asdict(c.evaluate), "grid_sets": [g.name for g in c.data.grid_sets()]}, run_evaluate),
    ]
}
