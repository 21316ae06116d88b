"""Run a set of stages (and what they depend on) with caching, Ray and MLflow."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Optional

from pipeline import storage, tracking
from pipeline.config import ConfigError, RayConfig, RunConfig
from pipeline.dag import StageContext, closure, fingerprint, read_done, run_stage, section_dict
from pipeline.fanout import FanOut, RayFanOut
from pipeline.keys import CACHED, PIPELINE, RAN, Artifact, Metric, Tag
from pipeline.stages import STAGES
from pipeline.tracking import Tracker

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
        start_local_ray(cfg.num_cpus)


LOCAL_POLL_INTERVAL_S = 0.25


def start_local_ray(num_cpus: Optional[int], **options: Any) -> None:
    """Start a Ray cluster of this machine alone, which knows its own address even
    when other local clusters run beside it (another pipeline, a test run).

    Ray Train's placement-group cleaner asks the state API about its controller
    without an address; with two local clusters that lookup finds either both (and
    fails) or the newest (and, not seeing its controller there, removes a live run's
    placement group). Its workers inherit RAY_API_SERVER_ADDRESS from this process,
    so it points them at this cluster's own dashboard, on a port chosen here.

    Ray Train's controller polls its workers every 2 s by default, so a finished
    stage waited about 4 s more to be seen finished; on one machine the poll is a
    local call and 0.25 s costs nothing (the workers inherit this environment). Its
    preemption watcher, an actor per run that polls the nodes for a cloud's notice that
    one is about to go, has nothing to watch on one machine: it is off here."""
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(LOCAL_POLL_INTERVAL_S))
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    options.setdefault("log_to_driver", True)
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, **options)


def check_cluster_storage(config: RunConfig, workdir: str, uri: Optional[str]) -> None:
    """On a cluster of several nodes, refuse before any work a workdir or tracking
    store that only one node can see (unless the workdir is declared shared); `uri`
    None: a tracker in the driver's memory, which no worker writes to."""
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
    if uri is not None and not tracking.is_server(uri):
        raise ConfigError(
            f"tracking URI {uri} is a file on one node of a {nodes}-node cluster: set MLFLOW_TRACKING_URI "
            "(or tracking.uri) to an MLflow server every node reaches, e.g. http://HOST:5000")


def run_pipeline(config: RunConfig, targets: Optional[list[str]] = None, workdir: Optional[str] = None,
                 tracker: Optional[Tracker] = None, fan_out: Optional[FanOut] = None) -> dict[str, Any]:
    """Run `targets` (default: the config's, else every stage); return the summary dict.

    By default stages fan out as Ray tasks and are recorded in MLflow (the config's
    tracking URI); tests of what stages make may pass a `LocalFanOut` and an
    `InMemoryTracker` (training stages still run under Ray Train)."""
    config = dataclasses.replace(config, workdir=storage.absolute(workdir or config.workdir))
    workdir = config.workdir
    try:
        names = closure(STAGES, targets or config.targets or PIPELINE_ORDER)
    except KeyError as e:
        raise ConfigError(f"targets: {e.args[0]}") from None
    uri = tracking.tracking_uri(config.tracking.uri, workdir) if tracker is None else tracker.uri
    fan_out = fan_out or RayFanOut(functools.partial(ensure_ray, config.ray))
    if isinstance(fan_out, RayFanOut):
        check_cluster_storage(config, workdir, uri)
    _make_workdir(workdir)
    if tracker is None:
        tracking.quiet_routine_logs()
        tracker = tracking.MlflowTracker.for_experiment(uri, config.tracking.experiment, workdir)
    commit = tracking.git_commit()
    sweep = {Tag.SWEEP: config.tracking.sweep} if config.tracking.sweep else {}
    resolved = tracking.config_yaml(config)

    summary: dict[str, Any] = {"workdir": workdir, "tracking_uri": tracker.uri, "stages": {}}
    fingerprints: dict[str, str] = {}
    outputs: dict[str, dict[str, Any]] = {}
    parent = tracker.start_run(config.name, {Tag.GIT_COMMIT: commit, Tag.KIND: PIPELINE, **sweep})
    summary["mlflow_run_id"] = parent
    failed = True
    try:
        tracker.log_params(parent, {"targets": ",".join(names)})
        tracker.log_text(parent, resolved, Artifact.CONFIG)
        for name in names:
            stage = STAGES[name]
            inputs = {d: outputs[d] for d in stage.deps}
            left_out, details = _check_data(stage, config, inputs, fan_out)
            fp = fingerprint(stage, config, {d: fingerprints[d] for d in stage.deps}, left_out)
            fingerprints[name] = fp
            record = _run_recorded(stage, config, fp, inputs, tracker, fan_out, parent,
                                   {Tag.STAGE: name, Tag.FINGERPRINT: fp, Tag.GIT_COMMIT: commit, **sweep}, resolved, details)
            outputs[name] = record["outputs"]
            summary["stages"][name] = {k: record.get(k) for k in ("status", "seconds", "outputs", "metrics", "params", "mlflow_run_id")}
            print(f"[{name}] {record['status']} in {record['seconds']:.1f}s", flush=True)
        failed = False
    finally:
        tracker.end_run(parent, failed)
    return summary


def _make_workdir(workdir: str) -> None:
    try:
        storage.makedirs(workdir)
    except OSError as e:
        raise ConfigError(f"workdir {workdir} cannot be created: {e.strerror or e}") from None


def _check_data(stage, config: RunConfig, inputs: dict[str, dict[str, Any]], fan_out: FanOut) -> tuple[Any, Any]:
    """(identity, details) of the input data the stage will leave out, or (None, None)."""
    if stage.check_data is None:
        return None, None
    return stage.check_data(config, inputs, fan_out) or (None, None)


def _run_recorded(stage, config: RunConfig, fp: str, inputs: dict[str, dict[str, Any]], tracker: Tracker,
                  fan_out: FanOut, parent: str, tags: dict[str, str], resolved: str, data_check: Any) -> dict[str, Any]:
    """One stage (or its cache hit) under its own nested run."""
    out_dir = storage.join(config.workdir, stage.name, fp)
    cached = read_done(out_dir)
    system_metrics = config.tracking.system_metrics_every if cached is None else 0.0
    run_id = tracker.start_run(stage.name, tags, parent=parent, system_metrics=system_metrics)
    failed = True
    try:
        if cached is None:
            if isinstance(fan_out, RayFanOut):
                ensure_ray(config.ray)
            print(f"[{stage.name}] running -> {out_dir}", flush=True)
            tracker.log_params(run_id, {"config": section_dict(stage, config)})
            tracker.log_text(run_id, resolved, Artifact.CONFIG)
        record = run_stage(stage, StageContext(config, out_dir, inputs, fp, tracker, run_id, fan_out, data_check))
        tracker.set_tag(run_id, Tag.STATUS, record["status"])
        if record["status"] == CACHED and record.get("mlflow_run_id"):
            tracker.link_to_producer(run_id, record["mlflow_run_id"])
        if record["status"] == RAN:
            if record.get("params"):
                tracker.log_params(run_id, record["params"])
            tracker.log_metrics(run_id, {**record["metrics"], Metric.STAGE_SECONDS: record["seconds"]})
        failed = False
    finally:
        tracker.end_run(run_id, failed)
    return record


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
