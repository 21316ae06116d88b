"""Run a set of stages (and what they depend on) with caching, Ray and MLflow."""

from __future__ import annotations

import os
from typing import Any, Optional

from pipeline import storage, tracking
from pipeline.config import ConfigError, RayConfig, RunConfig
from pipeline.dag import StageContext, closure, fingerprint, read_done, run_stage, section_dict
from pipeline.keys import PIPELINE, Artifact, Metric, Tag
from pipeline.stages import STAGES

PIPELINE_ORDER = list(STAGES)


def ensure_ray(cfg: RayConfig) -> None:
    """Connect to the cluster (config, then RAY_ADDRESS) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    # Workers inherit this: torch.distributed's deprecation warnings drown the logs otherwise.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # said, not guessed: no warning per worker
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)


def check_cluster_storage(config: RunConfig, workdir: str, uri: str) -> None:
    """On a cluster of several nodes, refuse before any work a workdir or tracking
    store that only one node can see (unless the workdir is declared shared)."""
    import ray

    if not (config.ray.address or os.environ.get("RAY_ADDRESS")) or config.storage.shared:
        return  # a local Ray instance is one node
    ensure_ray(config.ray)
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    if nodes < 2:
        return
    if storage.is_local(workdir):
        raise ConfigError(
            f"workdir {workdir} is a local path, and the Ray cluster has {nodes} nodes that do not see "
            "each other's disks: pass --workdir s3://BUCKET/PATH (or gs://...), or set storage.shared=true "
            "if it is a mount every node shares")
    if not tracking.is_server(uri):
        raise ConfigError(
            f"tracking URI {uri} is a file on one node of a {nodes}-node cluster: set MLFLOW_TRACKING_URI "
            "(or tracking.uri) to an MLflow server every node reaches, e.g. http://HOST:5000")


def run_pipeline(config: RunConfig, targets: Optional[list[str]] = None, workdir: Optional[str] = None) -> dict[str, Any]:
    """Run `targets` (default: every stage); return the summary dict."""
    import mlflow

    workdir = storage.absolute(workdir or config.workdir)
    config.workdir = workdir
    try:
        names = closure(STAGES, targets or config.targets or PIPELINE_ORDER)
    except KeyError as e:
        raise ConfigError(f"targets: {e.args[0]}") from None
    uri = tracking.tracking_uri(config.tracking.uri, workdir)
    tracking.quiet_routine_logs()
    check_cluster_storage(config, workdir, uri)
    try:
        storage.makedirs(workdir)
    except OSError as e:
        raise ConfigError(f"workdir {workdir} cannot be created: {e.strerror or e}") from None
    experiment_id = tracking.ensure_experiment(uri, config.tracking.experiment, workdir)
    commit = tracking.git_commit()

    summary: dict[str, Any] = {"workdir": workdir, "tracking_uri": uri, "stages": {}}
    fingerprints: dict[str, str] = {}
    outputs: dict[str, dict[str, Any]] = {}
    sweep = {Tag.SWEEP: config.tracking.sweep} if config.tracking.sweep else {}
    with mlflow.start_run(experiment_id=experiment_id, run_name=config.name,
                          tags={Tag.GIT_COMMIT: commit, Tag.KIND: PIPELINE, **sweep}) as parent:
        mlflow.log_params(tracking.params_for_mlflow({"targets": ",".join(names)}))
        resolved = tracking.config_yaml(config)
        mlflow.log_text(resolved, Artifact.CONFIG)
        summary["mlflow_run_id"] = parent.info.run_id
        if config.tracking.system_metrics_every:
            from mlflow.system_metrics import set_system_metrics_sampling_interval

            set_system_metrics_sampling_interval(config.tracking.system_metrics_every)
        for name in names:
            stage = STAGES[name]
            fp = fingerprint(stage, config, {d: fingerprints[d] for d in stage.deps})
            fingerprints[name] = fp
            out_dir = storage.join(workdir, name, fp)
            cached = read_done(out_dir)
            with mlflow.start_run(experiment_id=experiment_id, run_name=name, nested=True,
                                  tags={Tag.STAGE: name, Tag.FINGERPRINT: fp, Tag.GIT_COMMIT: commit, **sweep},
                                  log_system_metrics=cached is None and config.tracking.system_metrics_every > 0) as run:
                if cached is None:
                    ensure_ray(config.ray)
                    print(f"[{name}] running -> {out_dir}", flush=True)
                    mlflow.log_params(tracking.params_for_mlflow({"config": section_dict(stage, config)}))
                    mlflow.log_text(resolved, Artifact.CONFIG)
                ctx = StageContext(config, out_dir, {d: outputs[d] for d in stage.deps}, fp, uri, run.info.run_id)
                record = run_stage(stage, ctx)
                mlflow.set_tag(Tag.STATUS, record["status"])
                if record["status"] == "cached" and record.get("mlflow_run_id"):
                    tracking.link_to_producer(uri, run.info.run_id, record["mlflow_run_id"])
                if record["status"] == "ran":
                    if record.get("params"):
                        mlflow.log_params(tracking.params_for_mlflow(record["params"]))
                    if record["metrics"]:
                        mlflow.log_metrics(record["metrics"])
                    mlflow.log_metric(Metric.STAGE_SECONDS, record["seconds"])
            outputs[name] = record["outputs"]
            summary["stages"][name] = {k: record.get(k) for k in ("status", "seconds", "outputs", "metrics", "params", "mlflow_run_id")}
            print(f"[{name}] {record['status']} in {record['seconds']:.1f}s", flush=True)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A table of stages (status, seconds, outputs' count), then every evaluation metric."""
    from pipeline.report import table

    rows = [("stage", "status", "seconds", "checkpoint / outputs")]
    for name, s in summary["stages"].items():
        where = s["outputs"].get("checkpoint") or f"{len(s['outputs'])} outputs"
        rows.append((name, s["status"], f"{s['seconds']:.1f}", str(where)))
    lines = table(rows, right=(2,)).splitlines()
    metrics = {k: v for stage in ("evaluate_gpt", "evaluate") for k, v in summary["stages"].get(stage, {}).get("metrics", {}).items()}
    if metrics:
        width = max(len(k) for k in metrics)
        lines += ["", "evaluation"] + [f"  {k:<{width}}  {_fmt(v)}" for k, v in metrics.items()]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
