"""`pipeline scaling sweep SWEEP.yaml`: pretraining runs of several model sizes and
data budgets (tokens for a GPT, images for a ViT), as a grid or as listed points,
through the pipeline's own training stage.

The data stages run once; then every grid point is a `pretrain_gpt` (or
`pretrain_vit`) stage of its own config, launched as a Ray task that drives its own Ray Train run, so as many
run at once as the cluster has room for. Each point is a cached stage: a sweep
started again after an interruption skips the points that finished. Every run
logs to the sweep's MLflow experiment, tagged `sweep: NAME`, where `pipeline
scaling fit --experiment` finds it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from pipeline.config import ConfigError, RunConfig, TransformerConfig, _validate, load_config, load_dataclass
from pipeline.keys import Metric, Param
from pipeline.kinds import KINDS, by_stage


@dataclass
class HoldoutConfig:
    """One run past the sweep, trained after it to check the fitted law's prediction."""
    size: TransformerConfig = field(default_factory=TransformerConfig)
    budget: int = 0  # tokens (or images), as the sweep's budgets
    overrides: list[str] = field(default_factory=list)  # on top of the sweep's, e.g. more workers for one big run

    def validate(self, key: str) -> None:
        if self.budget < 1:
            raise ConfigError(f"{key}.budget must be a positive number of tokens or images, got {self.budget}")
        self.size.validate(f"{key}.size")


@dataclass
class SweepPoint:
    """One run of a sweep laid out point by point (`pipeline scaling design`)."""
    size: TransformerConfig = field(default_factory=TransformerConfig)
    budget: int = 0  # tokens (or images)

    def validate(self, key: str) -> None:
        if self.budget < 1:
            raise ConfigError(f"{key}.budget must be a positive number of tokens or images, got {self.budget}")
        self.size.validate(f"{key}.size")


@dataclass
class SweepConfig:
    """Either a grid (every size x every budget) or `points`, each its own size and
    budget (an isoFLOP design: `pipeline scaling design`)."""
    name: str
    base: str  # the pipeline config every run derives from (data, tokenizer, training settings)
    experiment: str
    stage: Literal["pretrain_gpt", "pretrain_vit"] = "pretrain_gpt"
    sizes: list[TransformerConfig] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # training tokens of each run (a GPT sweep)
    images: list[int] = field(default_factory=list)  # training images of each run (a ViT sweep)
    points: list[SweepPoint] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)  # applied to `base`
    evaluations: int = 5  # validation losses per run, the points of its curve
    # When set, a size's peak and final learning rates are the base's times
    # lr_reference_width / d_model (Adam's rule for hidden layers: lr ∝ 1/width),
    # so the base's rates hold at that width. One rate for all sizes overshoots on the
    # widest and bends the fitted law.
    lr_reference_width: Optional[int] = None
    holdout: Optional[HoldoutConfig] = None  # `pipeline scaling sweep FILE --holdout`

    def validate(self, key: str) -> None:
        unit = by_stage()[self.stage].unit
        if self.points:
            if self.sizes or self.budgets:
                raise ConfigError(f"{key}points: a sweep lists points, or sizes and {unit}, not both")
            if len({(p.size.n_layer, p.size.d_model) for p in self.points}) < 2:
                raise ConfigError(f"{key}points must hold at least 2 model sizes")
            for i, point in enumerate(self.points):
                point.validate(f"{key}points[{i}]")
        elif len(self.sizes) < 2:
            raise ConfigError(f"{key}sizes must list at least 2 model sizes, got {len(self.sizes)}")
        for other in {kind.unit for kind in KINDS.values()} - {unit}:
            if getattr(self, other):
                raise ConfigError(f"{key}{other} is not a budget of a {self.stage} sweep: list {unit}")
        if not self.points and (len(self.budgets) < 1 or any(t < 1 for t in self.budgets)):
            raise ConfigError(f"{key}{unit} must list positive budgets, got {self.budgets}")
        if self.evaluations < 1:
            raise ConfigError(f"{key}evaluations must be >= 1, got {self.evaluations}")
        if self.lr_reference_width is not None and self.lr_reference_width < 1:
            raise ConfigError(f"{key}lr_reference_width must be a positive width, got {self.lr_reference_width}")
        for i, size in enumerate(self.sizes):
            size.validate(f"sizes[{i}]")
        if self.holdout is not None:
            self.holdout.validate(f"{key}holdout")


    @property
    def budgets(self) -> list[int]:
        return getattr(self, by_stage()[self.stage].unit)

    def runs(self) -> list[tuple[TransformerConfig, int]]:
        """(size, budget) of every run: the listed points, or the grid."""
        if self.points:
            return [(p.size, p.budget) for p in self.points]
        return [(size, budget) for size in self.sizes for budget in self.budgets]


def load_sweep(path: str) -> SweepConfig:
    return load_dataclass(SweepConfig, path, "sweep file")


def samples_per_step(config: RunConfig, stage: str) -> int:
    """Tokens (GPT) or images (ViT) one optimizer step consumes."""
    kind = by_stage()[stage]
    train = kind.section(config).train
    return int(train.global_batch * kind.planned_units_per_sample(config))


def point_config(base: RunConfig, sweep: SweepConfig, size: TransformerConfig, budget: int) -> RunConfig:
    """`base` with the model of `size` trained on `budget` tokens or images: the schedule
    spans the whole budget (as Chinchilla's runs did), with `evaluations` validations on the way."""
    section = getattr(base, sweep.stage)
    train = section.train
    steps = max(2, math.ceil(budget / samples_per_step(base, sweep.stage)))
    every = max(1, steps // sweep.evaluations)
    scale = sweep.lr_reference_width / size.d_model if sweep.lr_reference_width else 1.0
    train = dataclasses.replace(train, max_steps=steps, warmup_steps=min(train.warmup_steps, steps // 10),
                                eval_every=every, log_every=min(train.log_every, every),
                                lr=train.lr * scale, min_lr=train.min_lr * scale)
    config = dataclasses.replace(base, **{sweep.stage: dataclasses.replace(section, model=size, train=train)})
    _validate(config, "")
    return config


def run_sweep(path: str, workdir: Optional[str] = None) -> str:
    """Run every point not yet done; return a table of the points."""
    import ray

    from pipeline.progress import progress
    from pipeline.runner import ensure_ray, run_pipeline
    from pipeline.stages import STAGES

    sweep = load_sweep(path)
    base = _base(sweep, sweep.name)
    workdir = workdir or base.workdir
    points = [point_config(base, sweep, size, budget) for size, budget in sweep.runs()]
    run_pipeline(base, list(STAGES[sweep.stage].deps), workdir)  # the data, once, before the runs that share it
    ensure_ray(base.ray)
    task = ray.remote(num_cpus=0)(run_pipeline)  # a launcher: its Ray Train workers hold the resources
    at_once = runs_at_once(ray.cluster_resources(), getattr(base, sweep.stage).train)
    waiting = list(enumerate(points))
    pending: dict = {}
    records: list[dict] = [{}] * len(points)
    with progress(len(points), f"sweep {sweep.name}", "run", leave=True) as bar:
        while waiting or pending:
            # Only as many launchers as can train: each waiting one is a Ray Train
            # controller polling for resources, and on a small machine their polling
            # and start-up starve the runs that do train.
            while waiting and len(pending) < at_once:
                n, config = waiting.pop(0)
                pending[task.remote(config, [sweep.stage], workdir)] = n
            [ready], _ = ray.wait(list(pending), num_returns=1)
            records[pending.pop(ready)] = ray.get(ready)["stages"][sweep.stage]
            bar.update(1)
    return format_sweep(points, records, sweep.stage)


def runs_at_once(cluster: dict[str, float], train) -> int:
    """How many of a sweep's runs the cluster can train side by side: each takes
    `num_workers` GPUs (or CPUs, without `use_gpu`)."""
    unit = "GPU" if train.use_gpu else "CPU"
    return max(1, int(cluster.get(unit, 0) // train.num_workers))


def _base(sweep: SweepConfig, tag: str, overrides: tuple[str, ...] = ()) -> RunConfig:
    """The sweep's base config, logging to its experiment with `tag` as the sweep tag."""
    return load_config(sweep.base, sweep.overrides + list(overrides) + [f"tracking.experiment={sweep.experiment}",
                                                                        f"tracking.sweep={tag}"])


def run_holdout(path: str, workdir: Optional[str] = None, bootstrap: int = 200) -> str:
    """Train the sweep file's held-out run (tagged `NAME-holdout`, so no fit of the sweep
    reads it), fit the sweep's runs, and compare the predicted final validation loss
    with the measured one."""
    from pipeline.runner import run_pipeline
    from pipeline.scaling.commands import predict_command

    sweep = load_sweep(path)
    if sweep.holdout is None:
        raise ConfigError(f"{path} has no holdout: add holdout: {{size: {{...}}, budget: N}}")
    base = _base(sweep, f"{sweep.name}-holdout", tuple(sweep.holdout.overrides))
    config = point_config(base, sweep, sweep.holdout.size, sweep.holdout.budget)
    summary = run_pipeline(config, [sweep.stage], workdir or base.workdir)
    if sweep.stage == "pretrain_vit":
        return _vit_holdout_line(sweep, summary["tracking_uri"], summary["stages"][sweep.stage]["mlflow_run_id"])
    record = summary["stages"][sweep.stage]
    params = float(record["params"][Param.PARAMS_NON_EMBEDDING])
    tokens = float(config.pretrain_gpt.train.max_steps * samples_per_step(config, sweep.stage))
    actual = float(record["metrics"][Metric.final(Metric.VAL_LOSS)])
    predicted = json.loads(predict_command(None, sweep.experiment, summary["tracking_uri"], sweep.name,
                                           params, tokens, bootstrap, as_json=True))
    error = predicted["loss"] / actual - 1
    return (f"held-out run: N = {params:,.0f}, D = {tokens:,.0f} tokens, C = {6 * params * tokens:.3g} FLOPs\n"
            f"  predicted {predicted['loss']:.4f} (95% interval {predicted['ci95'][0]:.4f} .. {predicted['ci95'][1]:.4f}), "
            f"measured {actual:.4f}: {100 * error:+.1f}%")


def _vit_holdout_line(sweep: SweepConfig, tracking_uri: str, run_id: str) -> str:
    """A ViT has no L(N, D) to predict with: its held-out run (MLflow `run_id`) is
    checked against Zhai's law on the sweep's compute frontier, at the run's own
    training compute."""
    from pipeline.scaling.commands import vit_holdout, vit_law

    _, _, law = vit_law(sweep.experiment, tracking_uri, sweep.name)
    [run] = [r for r in vit_holdout(law, sweep.experiment, tracking_uri, sweep.name) if r["run_id"] == run_id]
    error = run["predicted"] / run["measured"] - 1
    return (f"held-out run: N = {run['params']:,}, {run['images']:,.0f} images, C = {run['flops']:.3g} FLOPs\n"
            f"  predicted {run['predicted']:.4f} (Zhai's law on the sweep's frontier), measured {run['measured']:.4f}: "
            f"{100 * error:+.1f}%")


def format_sweep(points: list[RunConfig], records: list[dict[str, Any]], stage: str) -> str:
    unit = by_stage()[stage].unit
    lines = [f"{'layers':>6} {'d_model':>7} {'params':>10} {unit:>10} {'status':>7} {'val loss':>9}"]
    for config, record in zip(points, records):
        model = getattr(config, stage).model
        tokens = getattr(config, stage).train.max_steps * samples_per_step(config, stage)
        params = int(record.get("params", {}).get(Param.PARAMS_NON_EMBEDDING, 0))
        lines.append(f"{model.n_layer:>6} {model.d_model:>7} {params:>10,} {tokens:>10,} {record['status']:>7} "
                     f"{record['metrics'].get(Metric.final(Metric.VAL_LOSS), float('nan')):>9.4f}")
    return "\n".join(lines)
