"""Faults of real processes: a training worker killed with SIGKILL, and `pipeline`
itself sent SIGTERM (preemption). Both must lose no checkpointed work and end with
exactly the weights of an uninterrupted run."""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import signal
import subprocess
import threading
import time

import pytest
from conftest import REPO, SMOKE, TINY_OVERRIDES, VENV_BIN, resume_train, small_vit_spec, stage_fingerprint
from test_resume import _assert_same_weights

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


def test_sigterm_checkpoints_and_the_same_command_resumes_exactly(run_tiny, tiny_workdir, tmp_path):
    workdir = tmp_path / "work"
    run_tiny(["patchify"])
    for upstream in ("shard", "patchify"):  # cache hits in the CLI's workdir: the drill is about training
        shutil.copytree(os.path.join(tiny_workdir, upstream), workdir / upstream)
    command = _pipeline(workdir)
    started = time.time()
    proc = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if re.search(rf"\[vit\] step 20/{STEPS}", line):
            proc.send_signal(signal.SIGTERM)
            signalled = time.time()
            break
    else:
        pytest.fail("training never reached step 20:\n" + "".join(seen[-30:]))
    rest, _ = proc.communicate(timeout=180)
    output = "".join(seen) + rest
    assert proc.returncode == 143, output[-3000:]
    assert time.time() - signalled < 60  # a checkpoint and a clean exit, well inside a typical grace period
    assert "run the same command again to resume" in output
    [line] = [l for l in output.splitlines() if l.startswith("preempted:")]
    stopped_at = int(re.search(r"step (\d+)", line).group(1))
    assert 20 <= stopped_at < STEPS and stopped_at % 5 == 0
    [stage_dir] = glob.glob(str(workdir / "pretrain_vit" / "*"))
    assert glob.glob(os.path.join(stage_dir, "ray", "checkpoint_*")), "the failed stage kept no checkpoint"
    assert not os.path.exists(os.path.join(stage_dir, "stage.json"))

    again = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    steps = _steps_trained(again.stdout)
    assert steps and min(steps) > stopped_at and max(steps) == STEPS  # resumed, not restarted
    resumed = tmp_path / "resumed.safetensors"
    shutil.copy(os.path.join(stage_dir, "model.safetensors"), resumed)

    # The same stage uninterrupted: the tiny workdir's, in this process (trained once for the
    # suite, usually by an earlier test; no third CLI start with its own Ray)
    clean = run_tiny(["pretrain_vit"])["stages"]["pretrain_vit"]
    assert stage_fingerprint("pretrain_vit", clean["outputs"]["checkpoint"]) == os.path.basename(stage_dir)
    _assert_same_weights(clean["outputs"]["weights"], resumed)
    print(f"preemption drill: {time.time() - started:.0f}s")


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
