"""Tracking: one parent run per pipeline run, one nested run per stage, in MLflow
(`MlflowTracker`) or, for tests, in memory (`InMemoryTracker`).

Training workers do not own a run: rank 0 logs into the stage's run by id (an
`MlflowTracker` of the same store), so the driver decides the run's shape and the
workers only append metrics.
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


# A key names a secret when one of its words holds one of these anywhere
# ("aws_secret_access_key", "db_password", "gcpCredentials") or ends in one of
# those ("hfToken", "apiKey", "x-api-key"); "tokens", "tokenizer" and "digit_keys" do not.
_SECRET_PARTS = ("secret", "passw", "credential")
_SECRET_ENDINGS = ("token", "key", "pwd")
# The password of a URL's userinfo, up to its last "@": a password may hold "/".
_URL_PASSWORD = re.compile(r"(://[^/:@\s]*:)\S+@")


def is_secret(key: str) -> bool:
    """Whether a (dotted) key names a secret, whatever its case."""
    return any(any(part in word for part in _SECRET_PARTS) or word.endswith(_SECRET_ENDINGS)
               for word in re.split(r"[^a-z0-9]+", key.lower()) if word)


def redacted(value: Any, key: str = "") -> Any:
    """What may be printed or logged of `value` (nested dicts and lists too): nothing
    under a key that names a secret, and no password inside a URL (`http://user:***@host`)."""
    if is_secret(key) and value not in (None, "", [], {}):
        return "***"
    if isinstance(value, Mapping):
        return {k: redacted(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redacted(v, key) for v in value]
    return _URL_PASSWORD.sub(r"\1***@", value) if isinstance(value, str) else value


def config_yaml(config) -> str:
    """The resolved run config as YAML, secrets redacted: printed at the start of a run
    and attached to its MLflow runs as `config.yaml`."""
    import yaml

    return yaml.safe_dump(redacted(config.to_dict()), sort_keys=False)


def params_for_mlflow(d: Mapping[str, Any]) -> dict[str, str]:
    """Dotted keys and string values, secrets redacted at every depth (lists of dicts too)."""
    return {k: str(v)[:_MAX_PARAM_LEN] for k, v in flatten(redacted(d)).items()}


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


def client(uri: str, _locked: bool = False):
    """An MlflowClient whose store is already open (see `_first_open`)."""
    from mlflow.tracking import MlflowClient

    with contextlib.nullcontext() if _locked else _first_open(uri):
        opened = MlflowClient(tracking_uri=uri)
        opened.search_experiments(max_results=1)  # opens the store: schema created or migrated here
    return opened


def ensure_experiment(uri: str, name: str, workdir: str) -> str:
    """Experiment id. A server keeps artifacts where it was told to (its own
    artifact store); a local SQLite store keeps them under the workdir (not ./mlruns).
    Nothing global is set: every call names its store."""
    with _first_open(uri):
        runs = client(uri, _locked=True)
        experiment = runs.get_experiment_by_name(name)
        if experiment is not None:
            if _KIND not in experiment.tags:
                runs.set_experiment_tag(experiment.experiment_id, _KIND, _MODEL_TRAINING)
            return experiment.experiment_id
        if is_server(uri):
            return runs.create_experiment(name, tags={_KIND: _MODEL_TRAINING})
        artifacts = storage.join(storage.absolute(workdir), "mlflow-artifacts")
        if storage.is_local(artifacts):
            os.makedirs(artifacts, exist_ok=True)
            artifacts = "file://" + artifacts
        return runs.create_experiment(name, artifact_location=artifacts, tags={_KIND: _MODEL_TRAINING})


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


def plot_loss(tracker: "Tracker", run_id: str, unit: str, path: str) -> bool:
    """Training loss against data seen and against compute, from the run's history;
    saved to `path` and attached to the run as an artifact. False: no history to plot."""
    from pipeline.plotting import png, pyplot

    history = {k: tracker.metric_history(run_id, k) for k in (Metric.LOSS, unit, Metric.FLOPS)}
    steps = sorted(history[Metric.LOSS])
    if not steps:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, key, label in ((axes[0], unit, unit), (axes[1], Metric.FLOPS, "training FLOPs (6N + 12·L·T·d per token)")):
        ax.plot([history[key][s] for s in steps], [history[Metric.LOSS][s] for s in steps], marker=".")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss")
    fig.suptitle(tracker.run_name(run_id))
    storage.write_bytes_atomic(path, png(fig))
    tracker.log_files(run_id, [path])
    return True


class Tracker:
    """Where a pipeline run and its stages are recorded: one parent run, a nested run
    per stage. `MlflowTracker` is the pipeline's; `InMemoryTracker` keeps everything in
    this process, for tests of what the stages make where MLflow is not what they check."""

    uri: Optional[str] = None  # what processes elsewhere (training workers) log to; None: they do not

    def start_run(self, name: str, tags: Mapping[str, str], parent: Optional[str] = None,
                  system_metrics: float = 0.0) -> str:
        """A new run's id; `system_metrics`: seconds between samples of CPU, memory and GPU (0: none)."""
        raise NotImplementedError

    def end_run(self, run_id: str, failed: bool = False) -> None:
        raise NotImplementedError

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Nested params, flattened to dotted keys, secrets redacted."""
        raise NotImplementedError

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        raise NotImplementedError

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        raise NotImplementedError

    def log_text(self, run_id: str, text: str, name: str) -> None:
        raise NotImplementedError

    def log_files(self, run_id: str, paths: list[str]) -> None:
        """Attach files (local or on a bucket) as artifacts, under their own names."""
        raise NotImplementedError

    def metric_history(self, run_id: str, key: str) -> dict[int, float]:
        raise NotImplementedError

    def run_name(self, run_id: str) -> str:
        raise NotImplementedError

    def link_to_producer(self, run_id: str, producer_id: str) -> None:
        """A cached stage's run points at the run that made its outputs: a tag, and a
        description (shown on the run's page) with the link."""
        self.set_tag(run_id, Tag.PRODUCED_BY, producer_id)


class MlflowTracker(Tracker):
    """An MLflow store (SQLite file or server), through MlflowClient: no global state."""

    def __init__(self, uri: str, experiment_id: Optional[str] = None):
        """`experiment_id`: where new runs go; without it, only existing runs are logged to
        (rank 0 of a trainer appends to its stage's run)."""
        self.uri, self.experiment_id = uri, experiment_id
        self.client = client(uri)
        self._monitors: dict[str, Any] = {}
        self._pending: list = []  # metrics queued by log_metrics_later

    @classmethod
    def for_experiment(cls, uri: str, experiment: str, workdir: str) -> "MlflowTracker":
        return cls(uri, ensure_experiment(uri, experiment, workdir))

    def start_run(self, name, tags, parent=None, system_metrics=0.0):
        if parent:
            tags = {**tags, Tag.PARENT: parent}
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=redacted(dict(tags))).info.run_id
        if system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run_id, sampling_interval=system_metrics, tracking_uri=self.uri)
            monitor.start()
            self._monitors[run_id] = monitor
        return run_id

    def end_run(self, run_id, failed=False):
        monitor = self._monitors.pop(run_id, None)
        if monitor is not None:
            monitor.finish()
        self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED")

    def log_params(self, run_id, params):
        from mlflow.entities import Param as MlflowParam

        flat = params_for_mlflow(params)
        self.client.log_batch(run_id, params=[MlflowParam(k, v) for k, v in flat.items()])

    def log_metrics(self, run_id, metrics, step=0):
        self.client.log_batch(run_id, metrics=self._metrics(metrics, step))

    def log_metrics_later(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        """Queue the metrics for MLflow's background thread (a training step does not wait
        on the store's round trip); `flush` waits for everything queued."""
        self._pending.append(self.client.log_batch(run_id, metrics=self._metrics(metrics, step), synchronous=False))

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.wait()

    @staticmethod
    def _metrics(metrics: Mapping[str, float], step: int) -> list:
        from mlflow.entities import Metric as MlflowMetric

        ts = int(time.time() * 1000)
        return [MlflowMetric(k, float(v), ts, step) for k, v in metrics.items()]

    def set_tag(self, run_id, key, value):
        self.client.set_tag(run_id, key, redacted(value, key))

    def log_text(self, run_id, text, name):
        self.client.log_text(run_id, text, name)

    def log_files(self, run_id, paths):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            for path in paths:
                local = os.path.join(tmp, path.rstrip("/").rsplit("/", 1)[-1])
                with open(local, "wb") as f:
                    f.write(storage.read_bytes(path))
                self.client.log_artifact(run_id, local)

    def metric_history(self, run_id, key):
        return {m.step: m.value for m in self.client.get_metric_history(run_id, key)}

    def run_name(self, run_id):
        return self.client.get_run(run_id).info.run_name

    def link_to_producer(self, run_id, producer_id):
        from mlflow.exceptions import MlflowException

        super().link_to_producer(run_id, producer_id)
        try:
            producer = self.client.get_run(producer_id)
        except MlflowException:  # a store that no longer holds it (another tracking URI, deleted)
            note = f"Cached: outputs made by run {producer_id}, not in this tracking store."
        else:
            link = f"#/experiments/{producer.info.experiment_id}/runs/{producer_id}"
            note = (f"Cached: its outputs were made by [{producer.info.run_name} {producer_id[:8]}]({link}); "
                    "metrics, plots and weights are there.")
        self.set_tag(run_id, Tag.NOTE, note)


class InMemoryTracker(Tracker):
    """Runs as dicts in this process. Training workers cannot reach it (`uri` is None):
    a training stage's curve is not recorded, its final metrics are."""

    def __init__(self):
        self.runs: dict[str, dict[str, Any]] = {}

    def start_run(self, name, tags, parent=None, system_metrics=0.0):
        run_id = f"run-{len(self.runs):04d}"
        self.runs[run_id] = {"name": name, "tags": {**tags, **({Tag.PARENT: parent} if parent else {})},
                             "params": {}, "metrics": {}, "texts": {}, "files": [], "status": "RUNNING"}
        return run_id

    def end_run(self, run_id, failed=False):
        self.runs[run_id]["status"] = "FAILED" if failed else "FINISHED"

    def log_params(self, run_id, params):
        self.runs[run_id]["params"].update(params_for_mlflow(params))

    def log_metrics(self, run_id, metrics, step=0):
        for k, v in metrics.items():
            self.runs[run_id]["metrics"].setdefault(k, {})[step] = float(v)

    def set_tag(self, run_id, key, value):
        self.runs[run_id]["tags"][key] = value

    def log_text(self, run_id, text, name):
        self.runs[run_id]["texts"][name] = text

    def log_files(self, run_id, paths):
        self.runs[run_id]["files"] += [path.rstrip("/").rsplit("/", 1)[-1] for path in paths]

    def metric_history(self, run_id, key):
        return dict(self.runs[run_id]["metrics"].get(key, {}))

    def run_name(self, run_id):
        return self.runs[run_id]["name"]

