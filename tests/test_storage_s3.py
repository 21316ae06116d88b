"""The storage layer over the real S3 protocol (moto's server on 127.0.0.1): what
counts as done stays atomic, and shards round-trip through the bucket."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from s3server import counting_s3

from pipeline import storage
from pipeline.data import shards

BUCKET = "storage-test"


@pytest.fixture(scope="module")
def s3_env():
    with counting_s3(BUCKET) as (_, env):
        yield env


def test_a_failed_write_leaves_no_object(s3_env):
    path = f"s3://{BUCKET}/done/manifest.json"
    with pytest.raises(RuntimeError):
        with storage.write_atomic(path) as f:
            f.write(b"{half")
            raise RuntimeError("writer failed")
    assert not storage.exists(path)
    storage.write_json_atomic(path, {"ok": 1})
    assert storage.read_json(path) == {"ok": 1}


def test_a_killed_writer_leaves_no_object(s3_env, tmp_path):
    """SIGKILL in the middle of writing 64 MiB: nothing appears, not even a prefix."""
    path = f"s3://{BUCKET}/killed/shard-000000.tar"
    started = tmp_path / "started"
    script = (
        "import sys, time; from pipeline import storage\n"
        f"with storage.write_atomic({path!r}) as f:\n"
        "    for i in range(64):\n"
        "        f.write(bytes(1 << 20))\n"
        f"        open({str(started)!r}, 'w').close()\n"
        "        time.sleep(0.1)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, **s3_env})
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    proc.kill()
    proc.wait()
    assert started.exists() and not storage.exists(path)


def test_shards_round_trip_through_the_bucket(s3_env):
    directory = f"s3://{BUCKET}/shards"
    infos = [shards.write_shard(f"{directory}/part-{i:06d}.tar",
                                ({"__key__": f"s{i}-{j}", "txt": f"text {i} {j}", "cls": j} for j in range(5)))
             for i in range(2)]
    shards.write_manifest(directory, infos, {"txt": "text", "cls": "label"}, "fp")
    samples = list(shards.iter_verified(directory))
    assert [s["__key__"] for s in samples] == [f"s{i}-{j}" for i in range(2) for j in range(5)]
    assert samples[7]["txt"] == "text 1 2" and samples[7]["cls"] == 2


def test_a_failed_stage_on_s3_leaves_no_record(s3_env):
    from pipeline.config import RunConfig
    from pipeline.dag import DONE, Stage, StageContext, StageResult, run_stage
    from pipeline.fanout import LocalFanOut
    from pipeline.tracking import InMemoryTracker

    config = RunConfig(workdir=f"s3://{BUCKET}/work")
    tracker = InMemoryTracker()
    run_id = tracker.start_run("broken", {})
    out_dir = f"{config.workdir}/broken/abc"

    def half_then_fail(ctx: StageContext) -> StageResult:
        storage.write_bytes_atomic(f"{ctx.out_dir}/part.bin", b"written before the failure")
        raise ValueError("stage failed")

    stage = Stage("broken", (), lambda c: {}, half_then_fail)
    with pytest.raises(ValueError):
        run_stage(stage, StageContext(config, out_dir, {}, "abc", tracker, run_id, LocalFanOut()))
    assert not storage.exists(f"{out_dir}/{DONE}") and not storage.exists(f"{out_dir}/part.bin")

    def writes(ctx: StageContext) -> StageResult:
        storage.write_bytes_atomic(f"{ctx.out_dir}/part.bin", b"whole")
        return StageResult({"part": f"{ctx.out_dir}/part.bin"})

    record = run_stage(Stage("broken", (), lambda c: {}, writes),
                       StageContext(config, out_dir, {}, "abc", tracker, run_id, LocalFanOut()))
    assert record["status"] == "ran" and storage.read_bytes(record["outputs"]["part"]) == b"whole"
    assert storage.read_json(f"{out_dir}/{DONE}")["outputs"] == {"part": "broken/abc/part.bin"}


def test_the_arrow_filesystem_for_ray_train_speaks_the_buckets_region(s3_env, monkeypatch):
    """pyarrow assumes us-east-1 unless told: a bucket elsewhere refuses it."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    fs, path = storage.arrow_filesystem(f"s3://{BUCKET}/train/ckpt")
    assert fs.region == "eu-west-1" and path == f"{BUCKET}/train/ckpt"
    with fs.open_output_stream(path + "/state.json") as f:
        f.write(b"{}")
    assert storage.exists(f"s3://{BUCKET}/train/ckpt/state.json")


def test_a_checkpoint_in_a_bucket_converts_for_another_world_size(s3_env, zero2_reference, tmp_path):
    """The elastic resume's first step from a bucket: the ZeRO-2 checkpoint of 2 workers,
    uploaded, is downloaded, converted to DeepSpeed's universal format and the conversion
    uploaded beside the run: the same files as a local conversion, byte for byte."""
    from pipeline.train.checkpoint import read_data_state
    from pipeline.train.launch import _to_universal

    full, _ = zero2_reference
    checkpoint = full["checkpoints_by_step"][6]
    remote = f"s3://{BUCKET}/run/checkpoint-6"
    storage.upload_tree(checkpoint, remote)
    converted = _to_universal(remote, f"s3://{BUCKET}/elastic/universal-from-world-size-2")
    _to_universal(checkpoint, str(tmp_path / "local"))

    local = {str(p.relative_to(tmp_path / "local")): p.read_bytes() for p in (tmp_path / "local").rglob("*") if p.is_file()}
    assert any(name.endswith(".pt") for name in local) and len(local) > 5
    with storage.local_copy(converted) as downloaded:
        remote_files = {str(p.relative_to(downloaded)): p.read_bytes() for p in Path(downloaded).rglob("*") if p.is_file()}
        assert read_data_state(downloaded) == read_data_state(checkpoint)
    assert remote_files.keys() == local.keys()
    assert [name for name in local if remote_files[name] != local[name]] == []

    # A run directory in the bucket: `fit` finds the newest checkpoint Ray registered there.
    from pipeline.train.launch import newest_checkpoint

    run_dir = Path(checkpoint).parents[1]
    storage.upload_tree(str(run_dir), f"s3://{BUCKET}/run-dir")
    directory, state = newest_checkpoint(f"s3://{BUCKET}/run-dir")
    assert directory == f"s3://{BUCKET}/run-dir/{Path(full['checkpoints_by_step'][12]).relative_to(run_dir)}"
    assert state == read_data_state(full["checkpoints_by_step"][12]) and state["step"] == 12


def test_a_workdir_moved_within_the_bucket_reads_its_own_outputs(s3_env, tiny_config):
    """stage.json names outputs relative to the workdir, in a bucket as on disk: the
    data stages of a moved workdir are cache hits whose outputs lie under the new prefix."""
    import s3fs

    from pipeline.fanout import LocalFanOut
    from pipeline.runner import run_pipeline
    from pipeline.tracking import InMemoryTracker

    def run(workdir: str) -> dict:
        return run_pipeline(tiny_config(), ["patchify"], workdir, tracker=InMemoryTracker(), fan_out=LocalFanOut())["stages"]

    first = run(f"s3://{BUCKET}/before-the-move")
    assert {s["status"] for s in first.values()} == {"ran"}
    fs = s3fs.S3FileSystem(endpoint_url=s3_env["AWS_ENDPOINT_URL"], use_listings_cache=False)
    fs.copy(f"{BUCKET}/before-the-move", f"{BUCKET}/moved", recursive=True)
    fs.rm(f"{BUCKET}/before-the-move", recursive=True)
    moved = run(f"s3://{BUCKET}/moved")
    assert {s["status"] for s in moved.values()} == {"cached"}
    for name, stage in moved.items():
        assert stage["outputs"].keys() == first[name]["outputs"].keys()
        for path in stage["outputs"].values():
            assert path.startswith(f"s3://{BUCKET}/moved/") and storage.exists(path), path
    assert next(shards.iter_verified(moved["patchify"]["outputs"]["mnist_train"]))["__key__"]  # checksums hold there
