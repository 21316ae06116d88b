"""The pipeline on a real two-node Ray cluster that shares no disk: submitted with
`ray job submit`, its workdir on an S3 server, its runs on an MLflow server.

See `localcluster.py` for how the two nodes are kept from seeing each other's
files. The cluster and its servers live for this module only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_OVERRIDES
from localcluster import LocalCluster

pytestmark = pytest.mark.cluster

WORKDIR = "runs/smoke"
STAGES = ["shard", "tokenize", "patchify", "pretrain_gpt", "pretrain_vit", "finetune", "evaluate_gpt", "evaluate"]
TRAINING = ["pretrain_gpt", "pretrain_vit", "finetune"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Short: Ray's socket paths under the temp dir must stay within 107 characters.
    c = LocalCluster(Path(f"/tmp/twc-{os.getpid()}"), tmp_path_factory.mktemp("cluster-logs"))
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(scope="module")
def s3(cluster):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=cluster.env["AWS_ENDPOINT_URL"], key=cluster.env["AWS_ACCESS_KEY_ID"],
                             secret=cluster.env["AWS_SECRET_ACCESS_KEY"], use_listings_cache=False)


def submit(cluster, workdir: str, *overrides: str) -> subprocess.CompletedProcess:
    """The README's submission, against the test cluster."""
    env_vars = {"MLFLOW_TRACKING_URI": cluster.tracking_uri}
    return cluster.ray_cli(
        "job submit", "--working-dir", ".", "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--",
        "python", "jobs/run_pipeline.py", "run", "configs/smoke.yaml", "--workdir", workdir, *TINY_OVERRIDES, *overrides,
        check=False, timeout=480)


def stage_records(s3, root: str) -> dict[str, list[tuple[str, dict]]]:
    """Stage name -> [(its output directory, its stage.json)] found under `root` in the bucket."""
    found: dict[str, list[tuple[str, dict]]] = {}
    for path in s3.glob(f"{root}/*/*/stage.json"):
        stage_dir = path.rsplit("/", 1)[0]
        found.setdefault(stage_dir.split("/")[-2], []).append((stage_dir, json.loads(s3.cat(path))))
    return found


def check_outputs_complete(s3, root: str, name: str, record: dict) -> None:
    for key, rel in record["outputs"].items():
        path = f"{root}/{rel}"
        assert not rel.startswith(("/", "s3://")), f"{name}.{key} is not relative to the workdir: {rel}"
        assert s3.exists(path), f"{name}.{key}: {path} is missing"
        manifest = f"{path}/manifest.json"
        if s3.isdir(path) and s3.exists(manifest):
            for shard in json.loads(s3.cat(manifest))["shards"]:
                assert s3.size(f"{path}/{shard['name']}") == shard["bytes"], f"{name}: {shard['name']} is incomplete"
    if name in TRAINING:
        checkpoint = f"{root}/{record['outputs']['checkpoint']}"
        assert json.loads(s3.cat(f"{checkpoint}/data_state.json"))["world_size"] == 2
        files = " ".join(p.rsplit("/", 1)[-1] for p in s3.find(f"{checkpoint}/state"))
        assert "zero_pp_rank_0_" in files and "zero_pp_rank_1_" in files, f"{name}: not every rank's shard saved"
        from safetensors.torch import load as load_safetensors

        weights = load_safetensors(s3.cat(f"{root}/{record['outputs']['weights']}"))
        assert weights and all(bool(t.isfinite().all()) for t in weights.values())


def test_readme_documents_this_submission():
    readme = (REPO / "README.md").read_text()
    assert "ray job submit" in readme and "--working-dir . " in readme
    assert "-- python jobs/run_pipeline.py run configs/smoke.yaml --workdir s3://" in readme


def test_refuses_what_two_nodes_cannot_share(cluster, tmp_path):
    """Before any work: a local workdir, then a SQLite tracker, on a 2-node cluster."""
    env = {**cluster.env, "RAY_ADDRESS": cluster.gcs_address}
    local = tmp_path / "local-workdir"
    cases = [
        (["--workdir", str(local)], "is a local path"),
        (["--workdir", f"s3://{cluster.bucket}/refused", f"tracking.uri=sqlite:///{tmp_path}/m.db"], "tracking URI"),
    ]
    for args, message in cases:
        out = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "configs/smoke.yaml", *args], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr[-2000:]
        (line,) = [line for line in out.stderr.splitlines() if line.startswith("config error:")]
        assert message in line and ("storage.shared" in line or "MLFLOW_TRACKING_URI" in line)
    assert not local.exists() and not (tmp_path / "m.db").exists()


def test_pipeline_on_two_nodes(cluster, s3):
    root = f"{cluster.bucket}/{WORKDIR}"
    job = submit(cluster, f"s3://{root}")
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]

    # Training workers ran on both nodes.
    actors = json.loads(cluster.ray_cli("list actors", "--detail", "--format", "json", "--limit", "10000").stdout)
    nodes = {a["node_id"] for a in actors if a["class_name"] == "RayTrainWorker"}
    assert len(nodes) == 2, f"training workers ran on {len(nodes)} node(s)"

    # Every stage's outputs are complete and live in the bucket; nothing half-written is left.
    records = stage_records(s3, root)
    assert sorted(records) == sorted(STAGES)
    for name, [(_, record)] in records.items():
        check_outputs_complete(s3, root, name, record)
    leftovers = [p for p in s3.find(root) if ".tmp-" in p or "/upload-" in p]
    assert not leftovers

    # Every MLflow run finished; artifacts went through the server into the bucket.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cluster.tracking_uri)
    experiment = client.get_experiment_by_name("thousandwords")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 + len(STAGES) and {r.info.status for r in runs} == {"FINISHED"}
    by_stage = {r.data.tags.get("stage"): r for r in runs}
    for name in TRAINING:
        run = by_stage[name]
        assert run.data.params["world_size"] == "2"
        history = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
        assert len(history) >= 3 and history[-1] < history[0], f"{name} loss did not fall: {history}"
        assert "loss.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert s3.glob(f"{cluster.bucket}/mlflow-artifacts/**/loss.png")
