"""`pipeline run` on the smoke config, end to end, through the real CLI.

Asserts the learning bars, the summary contract, the MLflow run tree, and the
cache: an identical re-run is all cache hits, and changing one stage's config
re-runs that stage and what depends on it, nothing upstream.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import numpy as np
import pytest

from conftest import SMOKE, VENV_BIN

STAGES = ["shard", "tokenize", "patchify", "pretrain_gpt", "pretrain_vit", "finetune", "evaluate_gpt", "evaluate"]


def _pipeline(workdir, summary, *extra):
    # Ray's socket paths must stay under 108 bytes: a short temp dir of its own.
    env = {**os.environ, "RAY_TMPDIR": f"/tmp/twe-{os.getpid()}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(VENV_BIN / "pipeline"), "run", str(SMOKE), "--workdir", str(workdir), "--summary", str(summary), *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(summary.read_text()), proc.stdout, time.perf_counter() - start


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    return root, _pipeline(root / "work", root / "summary.json")


@pytest.mark.slow
def test_smoke_run_learns(smoke):
    _, (summary, stdout, seconds) = smoke
    assert list(summary["stages"]) == STAGES
    for name, stage in summary["stages"].items():
        assert stage["status"] == "ran" and stage["seconds"] >= 0
    for name in ("pretrain_gpt", "pretrain_vit", "finetune"):
        assert os.path.isdir(summary["stages"][name]["outputs"]["checkpoint"])
    m = {**summary["stages"]["evaluate_gpt"]["metrics"], **summary["stages"]["evaluate"]["metrics"]}
    print(f"smoke cold run {seconds:.0f}s, metrics {m}")
    assert m["gpt_val_loss"] < m["gpt_unigram_entropy"]
    assert m["vit_test_accuracy"] >= 0.90
    assert m["captioner_per_digit_accuracy"] >= 0.80
    assert 0.0 <= m["captioner_exact_match"] <= 1.0
    assert "vit_test_accuracy" in stdout  # the printed summary table


@pytest.mark.slow
def test_smoke_run_is_tracked_in_mlflow(smoke):
    from mlflow.tracking import MlflowClient

    _, (summary, _, _) = smoke
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    parent = client.get_run(summary["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["stage"] for r in children) == sorted(STAGES)
    gpt = next(r for r in children if r.data.tags["stage"] == "pretrain_gpt")
    for key in ("loss", "tokens", "flops", "lr", "tokens_per_s", "mfu", "batch_digest", "val_loss", "val_accuracy"):
        assert key in gpt.data.metrics, key
    # Validation loss on the training run's own axes, every eval_every steps: what the scaling fits read.
    for stage, steps in (("pretrain_gpt", [50, 100, 150]), ("pretrain_vit", [250, 500, 750, 1000]), ("finetune", [100, 200, 300])):
        run = next(r for r in children if r.data.tags["stage"] == stage)
        val = client.get_metric_history(run.info.run_id, "val_loss")
        assert sorted(m.step for m in val) == steps, stage
        flops = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "flops")}
        assert all(flops[m.step] > 0 for m in val)
        assert sorted(val, key=lambda m: m.step)[-1].value < sorted(val, key=lambda m: m.step)[0].value, stage
    assert gpt.data.params["config.train.zero_stage"] == "3"
    evaluate = next(r for r in children if r.data.tags["stage"] == "evaluate")
    assert evaluate.data.metrics["vit_test_accuracy"] == summary["stages"]["evaluate"]["metrics"]["vit_test_accuracy"]


@pytest.mark.slow
def test_rerun_is_cached_and_a_change_reruns_only_downstream(smoke):
    root, (first, _, _) = smoke
    again, _, seconds = _pipeline(root / "work", root / "again.json")
    assert {s["status"] for s in again["stages"].values()} == {"cached"}
    assert again["stages"]["evaluate"]["metrics"] == first["stages"]["evaluate"]["metrics"]
    assert seconds < 90, f"cached re-run took {seconds:.0f}s"

    changed, _, _ = _pipeline(root / "work", root / "changed.json", "finetune.train.max_steps=40")
    status = {name: s["status"] for name, s in changed["stages"].items()}
    assert status == {"shard": "cached", "tokenize": "cached", "patchify": "cached", "pretrain_gpt": "cached",
                      "pretrain_vit": "cached", "finetune": "ran", "evaluate_gpt": "cached", "evaluate": "ran"}
    assert changed["stages"]["finetune"]["outputs"]["checkpoint"] != first["stages"]["finetune"]["outputs"]["checkpoint"]


@pytest.mark.slow
def test_predict_writes_test_grids_with_the_finetuned_checkpoint(smoke, tmp_path):
    """`pipeline predict` on PNGs a user would pass: 2x2 grids of test digits (the smoke
    captioner's shape), written out through the summary's checkpoint."""
    from PIL import Image

    from pipeline.data.sources import compose_grid, mnist_split

    _, (summary, _, _) = smoke
    checkpoint = summary["stages"]["finetune"]["outputs"]["checkpoint"]
    images, labels, _ = mnist_split("test")
    rng = np.random.default_rng(7)
    paths, truth = [], []
    for n in range(12):
        pick = rng.choice(len(labels), size=(2, 2), replace=False)
        path = tmp_path / f"grid{n}.png"
        Image.fromarray(compose_grid(images[pick], np.zeros((2, 2), bool))).save(path)
        paths.append(str(path))
        truth.append(["".join(str(labels[i]) for i in row) for row in pick])

    def predict(*args):
        out = subprocess.run([str(VENV_BIN / "pipeline"), "predict", "--checkpoint", checkpoint, *args],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    written = [json.loads(line) for line in predict("--json", *paths).stdout.splitlines()]
    assert [w["image"] for w in written] == paths
    assert all(len(w["rows"]) == 2 and all(len(r) == 2 for r in w["rows"]) for w in written)
    right = sum(a == b for w, t in zip(written, truth) for got, want in zip(w["rows"], t) for a, b in zip(got, want))
    assert right / 48 >= 0.8, (written, truth)
    one = predict(paths[0])
    assert one.stdout.splitlines() == written[0]["rows"] and "grids/s" in one.stderr
