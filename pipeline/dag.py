"""The stage DAG: fingerprints, the cache, and running stages in order.

A stage's output directory is `<workdir>/<stage>/<fingerprint>`, where the
fingerprint hashes the stage's config section and its inputs' fingerprints.
A stage is done when its `stage.json` exists: it is written last, atomically.
A directory without it is a stage killed half-way and is cleared and redone.

`stage.json` names its outputs relative to the workdir, so a workdir copied to
another path or bucket is whole: its stages read their own copies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from pipeline import storage
from pipeline.config import RunConfig, identity_dict
from pipeline.fanout import FanOut
from pipeline.keys import CACHED, RAN
from pipeline.tracking import Tracker

DONE = "stage.json"
# Bump when a stage's outputs change meaning, so old caches are not reused.
FORMAT_VERSION = 3  # 2: outputs relative to the workdir; 3: typed, versioned model_config.json


@dataclass
class StageContext:
    config: RunConfig
    out_dir: str
    inputs: dict[str, dict[str, Any]]  # upstream stage name -> its outputs
    fingerprint: str
    tracker: Tracker
    run_id: str  # the stage's run in `tracker`
    fan_out: FanOut  # where per-shard work and evaluation tasks run
    data_check: Any = None  # what the stage's `check_data` found (the details), if it has one


@dataclass
class StageResult:
    outputs: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)  # extra MLflow params (parameter counts, ...)


@dataclass(frozen=True)
class Stage:
    name: str
    deps: tuple[str, ...]
    section: Callable[[RunConfig], Any]  # the config this stage's output depends on
    run: Callable[[StageContext], StageResult]  # the driver's part: it schedules Ray work
    # A resumable stage (training) keeps its directory when it fails or is killed: run
    # again, it continues from its last checkpoint there. Others start over, clean.
    resumable: bool = False
    # What of its input data the stage will leave out, found before it is fingerprinted
    # (training under data.on_bad_shard: skip): (identity, details), or None when it reads
    # all of it. The identity joins the fingerprint, so a model trained on part of the data
    # is never the cached answer for all of it; the details reach the stage as ctx.data_check.
    check_data: Optional[Callable[[RunConfig, dict[str, dict[str, Any]], FanOut], Optional[tuple[Any, Any]]]] = None


def section_dict(stage: Stage, config: RunConfig) -> Any:
    section = stage.section(config)
    return dataclasses.asdict(section) if dataclasses.is_dataclass(section) else section


def fingerprint(stage: Stage, config: RunConfig, input_fingerprints: dict[str, str], data_left_out: Any = None) -> str:
    payload = {
        "stage": stage.name,
        "format": FORMAT_VERSION,
        "config": identity_dict(stage.section(config)),
        "inputs": input_fingerprints,
    }
    if data_left_out is not None:  # absent when the stage reads all its inputs: the clean run's fingerprint
        payload["data_left_out"] = data_left_out
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def closure(stages: dict[str, Stage], targets: list[str]) -> list[str]:
    """`targets` and everything they depend on, in dependency order."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name not in stages:
            raise KeyError(f"unknown stage '{name}' (known: {', '.join(stages)})")
        for dep in stages[name].deps:
            visit(dep)
        order.append(name)

    for target in targets:
        visit(target)
    return order


def read_done(out_dir: str) -> Optional[dict[str, Any]]:
    path = storage.join(out_dir, DONE)
    return storage.read_json(path) if storage.exists(path) else None


def _outputs_in(workdir: str, record: dict[str, Any]) -> dict[str, Any]:
    """The record with its (workdir-relative) outputs resolved under `workdir`."""
    return {**record, "outputs": {k: storage.join(workdir, v) for k, v in record["outputs"].items()}}


def run_stage(stage: Stage, ctx: StageContext) -> dict[str, Any]:
    """Run one stage unless its done record exists; return that record plus status."""
    start = time.perf_counter()
    workdir = ctx.config.workdir
    done = read_done(ctx.out_dir)
    if done is not None and done.get("fingerprint") == ctx.fingerprint:
        return {**_outputs_in(workdir, done), "status": CACHED, "seconds": round(time.perf_counter() - start, 2)}
    if not stage.resumable:
        storage.remove_tree(ctx.out_dir)  # whatever a killed run left behind
    storage.makedirs(ctx.out_dir)
    try:
        result = stage.run(ctx)
    except BaseException:
        if not stage.resumable:
            storage.remove_tree(ctx.out_dir)  # leave nothing half-written behind
        raise
    record = {
        "fingerprint": ctx.fingerprint,
        "seconds": round(time.perf_counter() - start, 2),
        "outputs": {k: storage.relative(workdir, v) for k, v in result.outputs.items()},
        "metrics": result.metrics,
        "params": result.params,
        "mlflow_run_id": ctx.run_id,  # the run that produced these outputs, for cache hits to link to
    }
    storage.write_json_atomic(storage.join(ctx.out_dir, DONE), record)
    return {**_outputs_in(workdir, record), "status": RAN}
