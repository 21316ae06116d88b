"""Corrupt training data: a flipped byte, a truncated tar, a missing shard. By default
the training stage stops naming the shard; with `data.on_bad_shard: skip` it checks
every training and validation shard first, trains and validates on the good ones, logs
each skipped one by name, and `pipeline batches` leaves out the same ones."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from pipeline.data import shards


def _flip_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0xFF]))


def _corrupt(directory: str) -> dict[str, str]:
    """Three of the manifest's shards broken three ways; returns name -> how."""
    names = [e["name"] for e in shards.read_manifest(directory)["shards"]]
    assert len(names) >= 4, names
    flipped, truncated, missing = (os.path.join(directory, n) for n in names[:3])
    _flip_byte(flipped)
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    os.remove(missing)
    return {names[0]: "sha256", names[1]: "tar", names[2]: "missing"}


def test_bad_shards_stop_training_or_are_skipped_by_name(run_tiny, tiny_config, tiny_workdir, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from pipeline import cli
    from pipeline.runner import run_pipeline
    from conftest import SMOKE, TINY_OVERRIDES, stage_fingerprint

    run_tiny(["patchify"])
    workdir = str(tmp_path / "copy")
    shutil.copytree(tiny_workdir, workdir)  # outputs are workdir-relative: the copy is a workdir of its own
    small_shards = ["data.mnist.samples_per_shard=250"]  # 16 training and 2 validation shards
    summary = run_pipeline(tiny_config(*small_shards), ["patchify"], workdir)
    train_dir, val_dir = (summary["stages"]["patchify"]["outputs"][k] for k in ("mnist_train", "mnist_val"))
    broken_keys = {sample["__key__"] for entry in shards.shard_entries(train_dir)[:3]
                   for sample in shards.iter_shard(entry["path"], entry)}
    pristine = str(tmp_path / "pristine")
    shutil.copytree(train_dir, os.path.join(pristine, "train"))
    shutil.copytree(val_dir, os.path.join(pristine, "val"))
    broken = _corrupt(train_dir)  # the first three shards
    val_names = [e["name"] for e in shards.read_manifest(val_dir)["shards"]]
    assert len(val_names) == 2, val_names
    _flip_byte(os.path.join(val_dir, val_names[0]))
    short = small_shards + ["pretrain_vit.train.max_steps=6", "pretrain_vit.train.log_every=3",
                            "pretrain_vit.train.eval_every=6", "pretrain_vit.train.num_workers=1"]

    stage_dirs = lambda: set(os.listdir(os.path.join(workdir, "pretrain_vit")))  # noqa: E731
    before = stage_dirs() if os.path.isdir(os.path.join(workdir, "pretrain_vit")) else set()
    with pytest.raises(Exception) as stopped:
        run_pipeline(tiny_config(*short), ["pretrain_vit"], workdir)
    assert any(name in str(stopped.value) for name in broken), str(stopped.value)[-2000:]
    [clean_dir] = stage_dirs() - before  # the failed run's, at the clean fingerprint, kept for a resume

    capsys.readouterr()
    skip = short + ["data.on_bad_shard=skip"]
    summary = run_pipeline(tiny_config(*skip), ["pretrain_vit"], workdir)
    record = summary["stages"]["pretrain_vit"]
    assert record["status"] == "ran"
    out = capsys.readouterr().out
    for name in broken:
        assert f"skipping bad training shard {name}" in out
    assert f"skipping bad validation shard {val_names[0]}" in out
    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(record["mlflow_run_id"])
    assert run.data.params["skipped_shards"] == ",".join(sorted(broken))
    assert run.data.metrics["skipped_shards_count"] == 3
    assert run.data.params["skipped_val_shards"] == val_names[0]
    assert 0.0 < run.data.metrics["final_val_accuracy"] <= 1.0  # validated on the good half
    # A model trained without those shards is a stage of its own: never the cached answer
    # to a run that reads all the data...
    assert stage_fingerprint("pretrain_vit", record["outputs"]["checkpoint"]) != clean_dir
    assert not os.path.exists(os.path.join(workdir, "pretrain_vit", clean_dir, "stage.json"))
    # ...and the same skip again is its cache hit.
    assert run_pipeline(tiny_config(*skip), ["pretrain_vit"], workdir)["stages"]["pretrain_vit"]["status"] == "cached"

    # `pipeline batches` reads the batches training read: the digests it logged, and no
    # key of the three broken shards (read before they were broken).
    logged = {m.step: m.value for m in client.get_metric_history(record["mlflow_run_id"], "batch_digest")}
    assert sorted(logged) == [3, 6]
    argv = ["batches", str(SMOKE), "--stage", "pretrain_vit", "--steps", "1:7", "--json", "--workdir", workdir]
    capsys.readouterr()
    assert cli.main(argv + TINY_OVERRIDES + skip) == 0
    captured = capsys.readouterr()
    steps = {b["step"]: b for b in map(json.loads, captured.out.splitlines())}
    for step, digest in logged.items():
        assert steps[step]["digest"] == digest
    for name in broken:
        assert f"skipping bad training shard {name}" in captured.err
    read = [k for b in steps.values() for keys in b["ranks"] for k in keys]
    assert len(read) == len(set(read)) > 0
    assert not set(read) & broken_keys

    # Repaired, the data are whole again: a run under `skip` is the clean run (its fingerprint).
    shutil.rmtree(train_dir)
    shutil.rmtree(val_dir)
    shutil.copytree(os.path.join(pristine, "train"), train_dir)
    shutil.copytree(os.path.join(pristine, "val"), val_dir)
    capsys.readouterr()
    assert cli.main(["batches", str(SMOKE), "--stage", "pretrain_vit", "--steps", "1:2", "--workdir", workdir,
                     *TINY_OVERRIDES, *skip]) == 0
    assert "skipping" not in capsys.readouterr().err
    from pipeline.fanout import LocalFanOut
    from pipeline.kinds import KINDS
    from pipeline.stages import skipped_shards

    inputs = {"patchify": summary["stages"]["patchify"]["outputs"]}
    assert skipped_shards(tiny_config(*skip), inputs, LocalFanOut(), KINDS["vit"]) is None  # nothing left out
