"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

Training workers do not own a run: rank 0 logs into the stage's run by id
(`RunLogger`), so the driver decides the run's shape and the workers only
append metrics.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
import time
from typing import Any, Iterator, Mapping, Optional

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.keys import Metric, Tag

_MAX_PARAM_LEN = 6000


def tracking_uri(configured: Optional[str], workdir: str) -> str:
    """Config value, else MLFLOW_TRACKING_URI, else a SQLite file under the workdir."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if not storage.is_local(workdir):
        raise ConfigError(f"workdir {workdir} is remote: set MLFLOW_TRACKING_URI (or tracking.uri) to an MLflow server")
    return f"sqlite:///{os.path.abspath(os.path.join(workdir, 'mlflow.db'))}"


def is_server(uri: str) -> bool:
    """An MLflow tracking server (every node reaches it), not a file on this machine."""
    return uri.startswith(("http://", "https://", "databricks"))


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


_SECRET_WORDS = {"token", "key", "password", "passwd", "secret", "credentials"}
_URL_PASSWORD = re.compile(r"(://[^/:@\s]+:)[^@/\s]+@")


def is_secret(key: str) -> bool:
    """A key with a word that names a secret: `hf_token`, `aws.secret_access_key`; not
    `tokens`, `tokenize` or `digit_keys`."""
    return any(word in _SECRET_WORDS for word in re.split(r"[^a-z0-9]+", key.lower()))


def redact(key: str, value: Any) -> Any:
    """What may be logged or printed of `value`: nothing under a secret's key, and no
    password inside a URL (`http://user:***@host`)."""
    if is_secret(key) and value not in (None, ""):
        return "***"
    return _URL_PASSWORD.sub(r"\1***@", value) if isinstance(value, str) else value


def redacted(value: Any, key: str = "") -> Any:
    """A nested config (dicts and lists) with every secret redacted, for printing and logging."""
    if isinstance(value, Mapping):
        return {k: redacted(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v, key) for v in value]
    return redact(key, value)


def config_yaml(config) -> str:
    """The resolved run config as YAML, secrets redacted: printed at the start of a run
    and attached to its MLflow runs as `config.yaml`."""
    import yaml

    return yaml.safe_dump(redacted(config.to_dict()), sort_keys=False)


def params_for_mlflow(d: Mapping[str, Any]) -> dict[str, str]:
    return {k: str(redact(k, v))[:_MAX_PARAM_LEN] for k, v in flatten(d).items()}


@contextlib.contextmanager
def _first_open(uri: str) -> Iterator[None]:
    """Held while a process opens a SQLite tracking store. MLflow creates and migrates
    the schema from whichever process opens the file first, with no lock of its own
    (mlflow/mlflow#19943): a sweep's runs starting at once failed with `table ... already
    exists`. Processes on one node take turns here; a server needs none of this."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = uri[len("sqlite:///"):]
    os.makedirs(os.path.dirname(db), exist_ok=True)
    with open(db + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def client(uri: str):
    """An MlflowClient whose store is already open (see `_first_open`)."""
    from mlflow.tracking import MlflowClient

    with _first_open(uri):
        opened = MlflowClient(tracking_uri=uri)
        opened.search_experiments(max_results=1)  # opens the store: schema created or migrated here
    return opened


def ensure_experiment(uri: str, name: str, workdir: str) -> str:
    """Experiment id. A server keeps artifacts where it was told to (its own
    artifact store); a local SQLite store keeps them under the workdir (not ./mlruns)."""
    with _first_open(uri):
        return _ensure_experiment(uri, name, workdir)


def _ensure_experiment(uri: str, name: str, workdir: str) -> str:
    import mlflow

    # set_tracking_uri also exports MLFLOW_TRACKING_URI, which `tracking_uri` reads as
    # the user's choice: a second pipeline run in this process (a held-out run after a
    # sweep, a test after a test) would log into the first run's store. Keep the user's.
    users = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if users is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = users
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        if _KIND not in experiment.tags:
            mlflow.MlflowClient(uri).set_experiment_tag(experiment.experiment_id, _KIND, _MODEL_TRAINING)
        return experiment.experiment_id
    if is_server(uri):
        return mlflow.create_experiment(name, tags={_KIND: _MODEL_TRAINING})
    artifacts = storage.join(storage.absolute(workdir), "mlflow-artifacts")
    if storage.is_local(artifacts):
        os.makedirs(artifacts, exist_ok=True)
        artifacts = "file://" + artifacts
    return mlflow.create_experiment(name, artifact_location=artifacts, tags={_KIND: _MODEL_TRAINING})


# The MLflow UI opens an experiment of unknown kind on its GenAI (traces) pages; ours
# are training runs, which its "model training" pages show.
_KIND, _MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


# MLflow narrates routine steps at INFO on every run: creating a store's tables,
# starting and stopping the system-metrics thread of each stage. Warnings still show.
_CHATTY_LOGGERS = ("mlflow.store.db.utils", "mlflow.system_metrics.system_metrics_monitor")


def quiet_routine_logs() -> None:
    import logging

    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def link_to_producer(uri: str, run_id: str, producer_id: str) -> None:
    """A cached stage's run points at the run that made its outputs: a tag, and a
    description (shown on the run's page) with the link."""
    from mlflow.exceptions import MlflowException

    runs = client(uri)
    runs.set_tag(run_id, Tag.PRODUCED_BY, producer_id)
    try:
        producer = runs.get_run(producer_id)
    except MlflowException:  # a store that no longer holds it (another tracking URI, deleted)
        note = f"Cached: outputs made by run {producer_id}, not in this tracking store."
    else:
        link = f"#/experiments/{producer.info.experiment_id}/runs/{producer_id}"
        note = f"Cached: its outputs were made by [{producer.info.run_name} {producer_id[:8]}]({link}); metrics, plots and weights are there."
    runs.set_tag(run_id, Tag.NOTE, note)


class RunLogger:
    """Appends metrics to an existing run from any process (rank 0 of a trainer)."""

    def __init__(self, uri: str, run_id: str):
        self.client = client(uri)
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])


def plot_loss(uri: str, run_id: str, unit: str, path: str) -> None:
    """Training loss against data seen and against compute, from the run's history;
    saved to `path` and attached to the run as an artifact."""
    from pipeline.plotting import png, pyplot

    plt = pyplot()
    runs = client(uri)
    history = {k: {m.step: m.value for m in runs.get_metric_history(run_id, k)} for k in (Metric.LOSS, unit, Metric.FLOPS)}
    steps = sorted(history[Metric.LOSS])
    if not steps:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, key, label in ((axes[0], unit, unit), (axes[1], Metric.FLOPS, "training FLOPs (6N + 12·L·T·d per token)")):
        ax.plot([history[key][s] for s in steps], [history[Metric.LOSS][s] for s in steps], marker=".")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss")
    fig.suptitle(runs.get_run(run_id).info.run_name)
    storage.write_bytes_atomic(path, png(fig))
    log_files(uri, run_id, [path])


def log_files(uri: str, run_id: str, paths: list[str]) -> None:
    """Attach files (local or on a bucket) to a run as artifacts, under their own names."""
    import tempfile

    runs = client(uri)
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            local = os.path.join(tmp, path.rstrip("/").rsplit("/", 1)[-1])
            with open(local, "wb") as f:
                f.write(storage.read_bytes(path))
            runs.log_artifact(run_id, local)
