"""Faults of real processes: a training worker killed with SIGKILL, and `pipeline`
itself sent SIGTERM (preemption). Both must lose no checkpointed work and end with
exactly the weights of an uninterrupted run."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest
from conftest import REPO, SMOKE, TINY_OVERRIDES, VENV_BIN, resume_train, small_vit_spec, stage_fingerprint
from test_resume import _assert_same_weights

from pipeline import storage
from pipeline.keys import Metric
from pipeline.train.launch import fit


def _alive_train_workers() -> list[int]:
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address,  # this test's cluster, whatever else runs
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], detail=True)
    return [a.pid for a in actors]


def test_sigkilled_worker_restarts_from_its_checkpoint_and_ends_exactly(run_tiny, tiny_config, tmp_path, zero2_reference):
    summary = run_tiny(["patchify"])
    train = resume_train(tiny_config, 2)
    _, full_weights = zero2_reference  # the same run, uninterrupted

    def spec(name, train, hang_at_step=0):
        return small_vit_spec(summary["stages"]["patchify"]["outputs"]["mnist_train"], train,
                              str(tmp_path / f"{name}.safetensors"), hang_at_step=hang_at_step)

    # The last rank stops at step 9 (after the step-6 checkpoint) until killed: a run that
    # restarted from scratch instead of from the checkpoint would stop there again and time out.
    result: dict = {}
    killed_dir = tmp_path / "killed"
    restartable = dataclasses.replace(train, max_failures=1)
    runner = threading.Thread(target=lambda: result.update(fit(spec("killed", restartable, hang_at_step=9), str(killed_dir))))
    runner.start()
    deadline = time.time() + 180
    snapshot = killed_dir / "ray" / "checkpoint_manager_snapshot.json"  # Ray writes it once a checkpoint is registered
    while not snapshot.exists() or len(_alive_train_workers()) < 2:
        assert time.time() < deadline and runner.is_alive(), "no registered step-6 checkpoint with 2 live workers"
        time.sleep(0.5)
    victims = _alive_train_workers()
    os.kill(victims[-1], signal.SIGKILL)
    try:
        runner.join(timeout=240)
        assert not runner.is_alive(), "the run did not finish after the kill"
    finally:
        for pid in _alive_train_workers() if runner.is_alive() else []:
            os.kill(pid, signal.SIGKILL)
    assert sorted(result["checkpoints_by_step"]) == [6, 12] and result["metrics"]["started_at"] == 6
    assert not set(victims) & set(_alive_train_workers())
    _assert_same_weights(full_weights, tmp_path / "killed.safetensors")


STEPS = 40  # the tiny config's ViT, logging every 5 steps: its uninterrupted run is the tiny workdir's stage


def _pipeline(workdir, *extra) -> list[str]:
    return [str(VENV_BIN / "pipeline"), "pretrain", str(SMOKE), "--model", "vit", "--workdir", str(workdir),
            *TINY_OVERRIDES, *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}


def _steps_trained(output: str) -> list[int]:
    return [int(m) for m in re.findall(rf"\[vit\] step (\d+)/{STEPS}", output)]


# The tiny ViT's digits in shards of 250 (15 shards, not 4) cut into 4 parts of the global
# order, streamed (not held whole in memory, as a corpus this small is by default):
# readers of one part each can then show that they read about their quarter.
LOCALITY = ["data.mnist.samples_per_shard=250", "pretrain_vit.train.data_partitions=4", "pretrain_vit.train.loader_cache_mb=0"]


def test_sigterm_checkpoints_to_the_bucket_and_a_rerun_on_fewer_workers_resumes(run_tiny, tiny_config, tiny_workdir,
                                                                               tmp_path):
    """Preemption with the workdir in a bucket (moto's S3 server): 4 ranks x 32 are sent
    SIGTERM mid-way and leave a checkpoint in the bucket. The same stage run again on 2
    workers x 32 x grad_accum 2 (a node lost: the same global batch, so the same stage)
    continues from that checkpoint through DeepSpeed's universal format, not from step 0,
    and ends at the loss of the same stage trained uninterrupted at 2 x 64. Meanwhile the
    server counts what each rank read of the training shards: its quarter, not all."""
    import s3fs
    from s3server import counting_s3

    from pipeline.data import readers
    from pipeline.train.data import TrainingData

    clean = run_tiny(["pretrain_vit"], *LOCALITY)["stages"]
    train_dir = clean["patchify"]["outputs"]["mnist_train"]
    with counting_s3("preempted") as (server, env):
        workdir, fs = "s3://preempted/work", s3fs.S3FileSystem(use_listings_cache=False)
        for upstream in ("shard", "patchify"):  # cache hits there: the drill is about training
            fs.put(os.path.join(tiny_workdir, upstream), f"preempted/work/{upstream}", recursive=True)
        env = {**_env(), **env}
        common = [*LOCALITY, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "--summary", str(tmp_path / "summary.json")]
        four = ["ray.num_cpus=4", "pretrain_vit.train.num_workers=4", "pretrain_vit.train.micro_batch_size=32"]
        proc = subprocess.Popen(_pipeline(workdir, *common, *four), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if re.search(rf"\[vit\] step 10/{STEPS}", line):
                proc.send_signal(signal.SIGTERM)
                signalled = time.time()
                break
        else:
            pytest.fail("training never reached step 10:\n" + "".join(seen[-30:]))
        rest, _ = proc.communicate(timeout=180)
        output = "".join(seen) + rest
        assert proc.returncode == 143, output[-3000:]
        assert time.time() - signalled < 60  # a checkpoint and a clean exit, well inside a typical grace period
        assert "run the same command again to resume" in output
        [line] = [l for l in output.splitlines() if l.startswith("preempted:")]
        stopped_at = int(re.search(r"step (\d+)", line).group(1))
        assert 10 <= stopped_at < STEPS and stopped_at % 5 == 0
        assert fs.glob("preempted/work/pretrain_vit/*/ray/checkpoint_*"), "the stopped stage kept no checkpoint"
        assert not fs.glob("preempted/work/pretrain_vit/*/stage.json")
        shards_at = f"/preempted/work/{storage.relative(tiny_workdir, train_dir)}/"
        read = server.bytes_by(shards_at)
        tar_bytes = lambda: sum(n for (_, path), n in server.got.items() if path.startswith(shards_at) and path.endswith(".tar"))  # noqa: E731
        before_rerun = tar_bytes()

        # ... and with a node-local shard cache, a run-time setting: still the same stage
        two = ["pretrain_vit.train.num_workers=2", "pretrain_vit.train.micro_batch_size=32", "pretrain_vit.train.grad_accum=2",
               f"data.cache_dir={tmp_path / 'node-cache'}"]
        again = subprocess.run(_pipeline(workdir, *common, *two), cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=600)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert f"continuing from step {stopped_at} " in again.stdout and "saved at world size 4, on 2 workers" in again.stdout
        steps = _steps_trained(again.stdout)
        assert steps and min(steps) > stopped_at and max(steps) == STEPS  # resumed, not restarted
        resumed = json.loads((tmp_path / "summary.json").read_text())["stages"]["pretrain_vit"]
        rerun_read = tar_bytes() - before_rerun
    final = Metric.final(Metric.LOSS)
    assert resumed["metrics"][final] == pytest.approx(clean["pretrain_vit"]["metrics"][final], rel=1e-4)
    assert stage_fingerprint("pretrain_vit", resumed["outputs"]["checkpoint"]) == \
        stage_fingerprint("pretrain_vit", clean["pretrain_vit"]["outputs"]["checkpoint"])

    # What each of the 4 ranks (1 loader worker each) read of the training shards, as the
    # server counted it: its part of epoch 0, and at most epoch 1's too (the next block is
    # prefetched); before locality, every rank read every shard each epoch.
    assert set(read) == {f"rank-{r}" for r in range(4)}, read
    data = TrainingData.open(train_dir, tiny_config(*LOCALITY, *four).pretrain_vit.train, 4)
    corpus, largest = sum(e["bytes"] for e in data.entries), max(e["bytes"] for e in data.entries)
    for rank in range(4):
        plan = [readers.reader_io(data.order, data.layout, data.entries, rank, 0, 1, epoch=e)["bytes"] for e in (0, 1)]
        assert plan[0] <= 1.25 * corpus / 4 + largest
        assert plan[0] <= read[f"rank-{rank}"] <= sum(plan) + 64 * 1024, (rank, read, plan)
    # The rerun's two ranks read through one node cache: each shard sent at most once,
    # though the run goes into a second epoch, and the copies are the manifest's shards.
    copies = {p.name.removesuffix(".tar") for p in (tmp_path / "node-cache").glob("*.tar")}
    assert copies and copies <= {e["sha256"] for e in data.entries}
    whole_copies = sum(e["bytes"] for e in data.entries if e["sha256"] in copies)
    print(f"rerun read {rerun_read} bytes of training shards; its cache holds {whole_copies} in {len(copies)} copies")
    assert whole_copies <= rerun_read <= whole_copies + 2 * largest, (rerun_read, whole_copies)


def _shard_manifests(workdir) -> dict[str, bytes]:
    root = str(workdir)
    return {os.path.relpath(p, root): open(p, "rb").read()
            for p in glob.glob(os.path.join(root, "shard", "*", "**", "manifest.json"), recursive=True)}


def test_data_stage_killed_half_way_reruns_to_identical_manifests(run_local, tmp_path):
    """SIGKILL to `pipeline shard` while it writes tars: no stage is taken as done that
    was not, and the re-run's manifests are byte-identical to a clean run's (the same
    config's shard stage run in this process: tests/test_stages.py holds the local fan-out
    and Ray's tasks to the same bytes)."""

    def command(workdir):
        return [str(VENV_BIN / "pipeline"), "shard", str(SMOKE), "--workdir", str(workdir), *TINY_OVERRIDES]

    run_local(["shard"])
    expected = _shard_manifests(run_local.workdir)
    assert len(expected) == 10  # digits and grids: train, val, test; 2x2 grids: val, test; text: train, val

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not glob.glob(str(killed / "shard" / "*" / "**" / "*.tar"), recursive=True):
        assert time.time() < deadline and proc.poll() is None, "the shard stage never started writing"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the local Ray it started
    proc.wait(timeout=60)
    assert not glob.glob(str(killed / "shard" / "*" / "stage.json"))

    again = subprocess.run(command(killed), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[shard] running" in again.stdout
    assert _shard_manifests(killed) == expected
