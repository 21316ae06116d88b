"""`pipeline report`: a pipeline run's stages and metrics, read back from MLflow.

The latest pipeline run of an experiment as a table (a cached stage shows the
numbers of the run that produced it), or two runs side by side with what differs in
their configs and metrics.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional

from pipeline import tracking
from pipeline.keys import PIPELINE, Artifact, Metric, Tag


class ReportError(ValueError):
    """A report that cannot be made from what the tracking store holds."""


def table(rows: list[tuple], right: tuple[int, ...] = ()) -> str:
    """Rows of cells as aligned columns; the first row is the header, underlined."""
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in cells]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def resolve_uri(tracking_uri: Optional[str], workdir: Optional[str]) -> str:
    """The tracking store to read: named, a workdir's own, or MLFLOW_TRACKING_URI; a
    SQLite file must exist (reading never creates one)."""
    if tracking_uri:
        uri = tracking_uri
    elif workdir:
        uri = tracking.tracking_uri(None, workdir)
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        uri = os.environ["MLFLOW_TRACKING_URI"]
    else:
        raise ReportError("say which tracking store: --workdir DIR (its mlflow.db) or --tracking-uri URI "
                          "(or set MLFLOW_TRACKING_URI)")
    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):]):
        raise ReportError(f"no tracking store at {uri[len('sqlite:///'):]}: has a pipeline run there?")
    return uri


def _experiment_id(runs, name: str) -> str:
    experiment = runs.get_experiment_by_name(name)
    if experiment is None:
        known = [e.name for e in runs.search_experiments()]
        raise ReportError(f"no experiment {name!r} in the tracking store (it has: {', '.join(known) or 'none'})")
    return experiment.experiment_id


def _pipeline_run(runs, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        run = runs.get_run(run_id)
    except MlflowException:
        raise ReportError(f"no run {run_id} in the tracking store") from None
    if run.data.tags.get(Tag.KIND) != PIPELINE:
        parent = run.data.tags.get(Tag.PARENT)
        hint = f" (it is stage {run.data.tags.get(Tag.STAGE)!r} of pipeline run {parent})" if parent else ""
        raise ReportError(f"run {run_id} is not a pipeline run{hint}")
    return run


def stages_of(runs, parent) -> dict[str, dict[str, Any]]:
    """Stage name -> its status, seconds, metrics and run id; a cached stage's metrics
    are those of the run that produced its outputs."""
    from mlflow.exceptions import MlflowException

    children = runs.search_runs([parent.info.experiment_id], f"tags.`{Tag.PARENT}` = '{parent.info.run_id}'",
                                order_by=["attributes.start_time ASC"])
    stages = {}
    for child in children:
        tags, metrics = child.data.tags, dict(child.data.metrics)
        producer = tags.get(Tag.PRODUCED_BY)
        if producer:
            try:
                metrics = dict(runs.get_run(producer).data.metrics)
            except MlflowException:
                pass  # a producer this store does not hold: no numbers to show
        seconds = metrics.pop(Metric.STAGE_SECONDS, None)
        if producer:
            seconds = None  # that was the producer's time, not this run's
        metrics = {k: v for k, v in metrics.items() if not k.startswith("system/")}
        stages[tags.get(Tag.STAGE, child.info.run_name)] = {
            "status": tags.get(Tag.STATUS, child.info.status.lower()), "seconds": seconds,
            "metrics": metrics, "run_id": child.info.run_id, "produced_by": producer,
        }
    return stages


# Per stage, the metrics a run's table shows (all of them are in --json and --compare).
HEADLINE = (Metric.final(Metric.LOSS), Metric.final(Metric.VAL_LOSS), Metric.final(Metric.VAL_ACCURACY),
            "gpt_val_loss", "vit_test_accuracy", "captioner_per_digit_accuracy", "captioner_exact_match", "captioner_2x2_per_digit_accuracy",
            "captioner_2x2_exact_match")


def report(uri: str, experiment: str) -> str:
    runs = tracking.client(uri)
    found = runs.search_runs([_experiment_id(runs, experiment)], "tags.kind = 'pipeline'",
                             order_by=["attributes.start_time DESC"], max_results=1)
    if not found:
        raise ReportError(f"experiment {experiment!r} holds no pipeline run yet")
    parent = found[0]
    stages = stages_of(runs, parent)
    rows = [("stage", "status", "seconds", "metrics", "run")]
    for name, s in stages.items():
        shown = [f"{k}={_cell(s['metrics'][k])}" for k in HEADLINE if k in s["metrics"]]
        where = f"{s['run_id'][:8]}" + (f" (made by {s['produced_by'][:8]})" if s["produced_by"] else "")
        rows.append((name, s["status"], s["seconds"], " ".join(shown), where))
    head = (f"pipeline run {parent.info.run_name} {parent.info.run_id} ({parent.info.status.lower()}), "
            f"experiment {experiment}, {tracking.redacted(uri)}")
    return head + "\n\n" + table(rows, right=(2,))


def compare(uri: str, run_a: str, run_b: str) -> str:
    import yaml
    from mlflow.exceptions import MlflowException

    runs = tracking.client(uri)
    a, b = _pipeline_run(runs, run_a), _pipeline_run(runs, run_b)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file each
    configs = []
    for run in (a, b):
        try:
            with tempfile.TemporaryDirectory() as tmp, open(runs.download_artifacts(run.info.run_id, Artifact.CONFIG, tmp)) as f:
                configs.append(tracking.flatten(yaml.safe_load(f)))
        except (MlflowException, OSError):  # a run from before configs were saved, or a store out of reach
            configs.append({})
    names = (f"A {run_a[:8]}", f"B {run_b[:8]}")
    config_rows = [("config key", *names)] + [(k, configs[0].get(k, "-"), configs[1].get(k, "-"))
                                              for k in sorted(set(configs[0]) | set(configs[1]))
                                              if configs[0].get(k, "-") != configs[1].get(k, "-")]
    metrics = [{f"{stage}/{k}": v for stage, s in stages_of(runs, run).items() for k, v in s["metrics"].items()}
               for run in (a, b)]
    metric_rows = [("metric", *names, "B - A")]
    for key in sorted(set(metrics[0]) | set(metrics[1])):
        va, vb = metrics[0].get(key), metrics[1].get(key)
        if va != vb:
            metric_rows.append((key, va, vb, vb - va if va is not None and vb is not None else None))
    out = [f"A: {a.info.run_name} {run_a}", f"B: {b.info.run_name} {run_b}", ""]
    out += [table(config_rows) if len(config_rows) > 1 else "configs: the same" if all(configs) else
            "configs: not saved with one of the runs", ""]
    out += [table(metric_rows, right=(1, 2, 3)) if len(metric_rows) > 1 else "metrics: the same"]
    return "\n".join(out)
