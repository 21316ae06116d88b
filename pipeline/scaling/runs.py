"""Training runs read back from MLflow, so a sweep on a cluster and a fit on a laptop
meet through the tracking server alone.

A run is a nested `pretrain_gpt` (or `pretrain_vit`) stage run that trained
(`status` ran): its parameter count, the data and compute it consumed, and its
validation loss, final and per evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from pipeline.keys import RAN, Metric, Param, Tag
from pipeline.scaling.chinchilla import FitError


@dataclass
class TrainingRun:
    run_id: str
    name: str
    params: int  # non-embedding parameters, as the stage logged them
    tokens: float  # data consumed at the end (tokens, or images for a ViT)
    flops: float  # training compute at the end
    val_loss: float  # at the end
    curve: tuple[np.ndarray, np.ndarray]  # (flops, val_loss) at every evaluation


def read_runs(experiment: str, tracking_uri: Optional[str] = None, stage: str = "pretrain_gpt",
              sweep: Optional[str] = None) -> list[TrainingRun]:
    from mlflow.tracking import MlflowClient

    from pipeline.kinds import by_stage

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise FitError(f"no MLflow experiment named {experiment!r} at {client.tracking_uri}")
    query = f"tags.{Tag.STAGE} = '{stage}' and tags.{Tag.STATUS} = '{RAN}' and attributes.status = 'FINISHED'"
    if sweep:
        query += f" and tags.{Tag.SWEEP} = '{sweep}'"
    unit = by_stage()[stage].unit
    runs = []
    for run in client.search_runs([found.experiment_id], query, max_results=10000):
        metrics = run.data.metrics
        if not {Metric.VAL_LOSS, unit, Metric.FLOPS} <= set(metrics) or Param.PARAMS_NON_EMBEDDING not in run.data.params:
            continue  # a run without validation (eval_every 0) cannot be fitted
        val = {m.step: m.value for m in client.get_metric_history(run.info.run_id, Metric.VAL_LOSS)}
        flops = {m.step: m.value for m in client.get_metric_history(run.info.run_id, Metric.FLOPS)}
        steps = sorted(set(val) & set(flops))
        runs.append(TrainingRun(
            run.info.run_id, run.data.tags.get(Tag.RUN_NAME, run.info.run_id),
            int(run.data.params[Param.PARAMS_NON_EMBEDDING]), metrics[unit], metrics[Metric.FLOPS], metrics[Metric.VAL_LOSS],
            (np.array([flops[s] for s in steps]), np.array([val[s] for s in steps])),
        ))
    if not runs:
        raise FitError(f"experiment {experiment!r} has no finished {stage} runs with a validation loss"
                       + (f" in sweep {sweep!r}" if sweep else ""))
    return runs
