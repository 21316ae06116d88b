"""Corrupt training data: a flipped byte, a truncated tar, a missing shard. By default
the training stage stops naming the shard; with `data.on_bad_shard: skip` it checks
every shard first, trains on the good ones and logs each skipped one by name."""

from __future__ import annotations

import os
import shutil

import pytest

from pipeline.data import shards


def _corrupt(directory: str) -> dict[str, str]:
    """Three of the manifest's shards broken three ways; returns name -> how."""
    names = [e["name"] for e in shards.read_manifest(directory)["shards"]]
    assert len(names) >= 4, names
    flipped, truncated, missing = (os.path.join(directory, n) for n in names[:3])
    with open(flipped, "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    os.remove(missing)
    return {names[0]: "sha256", names[1]: "tar", names[2]: "missing"}


def test_bad_shards_stop_training_or_are_skipped_by_name(run_tiny, tiny_config, tiny_workdir, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from pipeline.runner import run_pipeline

    run_tiny(["patchify"])
    workdir = str(tmp_path / "copy")
    shutil.copytree(tiny_workdir, workdir)  # outputs are workdir-relative: the copy is a workdir of its own
    summary = run_pipeline(tiny_config(), ["patchify"], workdir)
    train_dir = summary["stages"]["patchify"]["outputs"]["mnist_train"]
    broken = _corrupt(train_dir)
    short = ["pretrain_vit.train.max_steps=6", "pretrain_vit.train.log_every=3", "pretrain_vit.train.num_workers=1"]

    with pytest.raises(Exception) as stopped:
        run_pipeline(tiny_config(*short), ["pretrain_vit"], workdir)
    assert any(name in str(stopped.value) for name in broken), str(stopped.value)[-2000:]

    capsys.readouterr()
    summary = run_pipeline(tiny_config(*short, "data.on_bad_shard=skip"), ["pretrain_vit"], workdir)
    record = summary["stages"]["pretrain_vit"]
    assert record["status"] == "ran"
    out = capsys.readouterr().out
    for name in broken:
        assert f"skipping bad shard {name}" in out
    run = MlflowClient(summary["tracking_uri"]).get_run(record["mlflow_run_id"])
    assert run.data.params["skipped_shards"] == ",".join(sorted(broken))
    assert run.data.metrics["skipped_shards_count"] == 3
