"""`pipeline scaling fit` and `pipeline scaling predict`: the laws fitted to runs from
an MLflow experiment (`--experiment`) or from anywhere (`--points FILE.csv` with
columns params,tokens,loss)."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from typing import Optional

import numpy as np

from pipeline import storage
from pipeline.keys import SCALING_FIT, Tag
from pipeline.scaling import laws, page
from pipeline.scaling.chinchilla import NAMES, ChinchillaFit, FitError, fit
from pipeline.scaling.runs import TrainingRun, read_runs

COLUMNS = ("params", "tokens", "loss")
REPORT = "scaling.md"  # the fit's one-page report, beside its plots


def read_points(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The params, tokens and loss columns of a CSV file (other columns are ignored)."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise FitError(f"{path}: no column {', '.join(missing)} (need {','.join(COLUMNS)}; found {reader.fieldnames})")
            rows = list(reader)
    except OSError as e:
        raise FitError(f"{path}: cannot read it ({e.strerror})") from None
    values = []
    for line, row in enumerate(rows, start=2):
        try:
            values.append([float(row[c]) for c in COLUMNS])
        except (TypeError, ValueError):
            raise FitError(f"{path}:{line}: {[row.get(c) for c in COLUMNS]} are not all numbers") from None
    table = np.array(values, dtype=float).reshape(-1, 3)
    return table[:, 0], table[:, 1], table[:, 2]


def _points(points: Optional[str], experiment: Optional[str], tracking_uri: Optional[str], sweep: Optional[str]):
    """(params, tokens, loss) and, from an experiment, the runs themselves."""
    if points:
        return read_points(points), []
    runs = read_runs(experiment, tracking_uri, sweep=sweep)
    return (np.array([r.params for r in runs]), np.array([r.tokens for r in runs]), np.array([r.val_loss for r in runs])), runs


def fitted(points: Optional[str], experiment: Optional[str], tracking_uri: Optional[str], sweep: Optional[str]) -> ChinchillaFit:
    """Chinchilla's law fitted to a CSV's or an experiment's runs, without intervals."""
    (n, d, loss), _ = _points(points, experiment, tracking_uri, sweep)
    return fit(n, d, loss, bootstrap=0)


def _runs_table(runs: list[TrainingRun], stage: str = "pretrain_gpt") -> list[str]:
    from pipeline.kinds import by_stage

    unit = by_stage()[stage].unit
    lines = [f"{'run':<34} {'params':>10} {unit:>12} {'FLOPs':>10} {'val loss':>9}"]
    for r in sorted(runs, key=lambda r: (r.params, r.tokens)):
        lines.append(f"{r.run_id:<34} {r.params:>10,} {r.tokens:>12,.0f} {r.flops:>10.3g} {r.val_loss:>9.4f}")
    return lines


def _chinchilla_lines(result: ChinchillaFit) -> list[str]:
    lines = [f"Chinchilla approach 3 on {result.points} runs: L(N, D) = E + A/N^alpha + B/D^beta",
             f"  {'':<6} {'fit':>12} {'95% interval':>27}"]
    for name in NAMES:
        lo, hi = result.ci95.get(name, (float("nan"), float("nan")))
        lines.append(f"  {name:<6} {getattr(result, name):>12.4g} {lo:>13.4g} .. {hi:<11.4g}")
    exps = result.exponents()
    lines.append(f"compute-optimal allocation: N* ∝ C^{exps['a']:.3f}, D* ∝ C^{exps['b']:.3f}")
    return lines


def fit_command(points: Optional[str], experiment: Optional[str], tracking_uri: Optional[str], sweep: Optional[str],
                bootstrap: int, as_json: bool, plots: Optional[str] = None) -> str:
    """Fit every law the points allow; draw the two plots and write the one-page report
    (`scaling.md`) into `plots` (a directory) and, for an experiment, log the fit as a
    `scaling_fit` run there with the plots and the page attached."""
    (n, d, loss), runs = _points(points, experiment, tracking_uri, sweep)
    result = fit(n, d, loss, bootstrap=bootstrap)
    largest = float(np.max(6 * n * d))
    out: dict = {"chinchilla": result.as_dict(), "compute_optimal": result.exponents()}
    lines = (_runs_table(runs) + [""] if runs else []) + _chinchilla_lines(result)
    a3_ci = page.exponent_interval(result)
    if a3_ci:
        out["compute_optimal_a_ci95"] = list(a3_ci)
    iso = None
    try:
        iso = laws.isoflop_profiles(n, d, loss)
        out["isoflop"] = {"a": iso.a, "b": iso.b, "budgets": iso.budgets.tolist(), "n_opt": iso.n_opt.tolist()}
        out["approach3_n_opt"] = result.compute_optimal(iso.budgets)[0].tolist()  # at the same budgets
        if bootstrap:
            out["isoflop"]["a_ci95"] = list(laws.isoflop_interval(n, d, loss, bootstrap))
        lines.append(f"approach 2 (isoFLOP vertices of {len(iso.budgets)} budgets): N* ∝ C^{iso.a:.3f} "
                     f"(95% {page.span(out['isoflop'].get('a_ci95'))}); approach 3 says C^{result.exponents()['a']:.3f} "
                     f"(95% {page.span(a3_ci)})")
    except FitError as e:
        out["isoflop_error"] = str(e)
        lines.append(f"approach 2: not fitted ({e})")
    out["recommended"] = page.recommendations(result, iso, largest)
    for row in out["recommended"]:
        r3 = row["approach3"]
        lines.append(f"at {row['factor']}x the largest run's compute ({row['flops']:.3g} FLOPs): N* = {r3['params']:.3g}, "
                     f"D* = {r3['tokens']:.3g} tokens" + (f" (approach 2: N* = {row['approach2']['params']:.3g})" if iso else ""))
    holdout = _holdout(result, experiment, tracking_uri, sweep) if experiment and sweep else []
    if holdout:
        out["holdout"] = holdout
    frontier = kaplan = None
    if runs:
        try:
            frontier = laws.compute_frontier([r.curve for r in runs])
            kaplan = laws.fit_kaplan(*frontier)
            out["kaplan"] = {"E": kaplan.E, "C0": kaplan.C0, "alpha": kaplan.alpha}
            lines.append(f"Kaplan on the compute frontier: L(C) = {kaplan.E:.4g} + ({kaplan.C0:.3g}/C)^{kaplan.alpha:.4f}")
        except FitError as e:
            lines.append(f"Kaplan: not fitted ({e})")
    pngs = {}
    if plots or experiment:
        from pipeline.scaling import plots as draw

        curves = {f"Chinchilla at N*(C): E={result.E:.2f}, α={result.alpha:.2f}, β={result.beta:.2f}":
                  lambda c: result.loss(*result.compute_optimal(c))}
        if kaplan:
            curves[f"Kaplan: {kaplan.E:.2f} + ({kaplan.C0:.2g}/C)^{kaplan.alpha:.3f}"] = kaplan.loss
        pngs = {"loss_vs_flops.png": draw.loss_vs_flops(n, d, loss, runs, frontier, curves),
                "isoflop.png": draw.isoflop(result, n, d, loss, runs)}
    source = f"experiment {experiment}" + (f", sweep {sweep}" if sweep else "") if experiment else str(points)
    report = page.markdown(out, len(n), largest, list(pngs), holdout, source)
    return _publish(out, lines, pngs, plots, experiment, tracking_uri, sweep, as_json, report)


def _held_out_runs(experiment: str, tracking_uri: Optional[str], sweep: str, stage: str) -> list[TrainingRun]:
    """The sweep's held-out runs (tagged `<sweep>-holdout`, so no fit reads them); none yet is no error."""
    try:
        return read_runs(experiment, tracking_uri, stage=stage, sweep=f"{sweep}-holdout")
    except FitError:
        return []


def _holdout(result: ChinchillaFit, experiment: str, tracking_uri: Optional[str], sweep: str) -> list[dict]:
    """The GPT sweep's held-out runs, each against the law."""
    return [{"params": r.params, "tokens": r.tokens, "measured": r.val_loss, "predicted": float(result.loss(r.params, r.tokens))}
            for r in _held_out_runs(experiment, tracking_uri, sweep, "pretrain_gpt")]


def vit_law(experiment: str, tracking_uri: Optional[str], sweep: Optional[str]):
    """A ViT sweep's runs, the compute frontier of their validation curves, and Zhai et
    al.'s saturating law fitted to it."""
    runs = read_runs(experiment, tracking_uri, stage="pretrain_vit", sweep=sweep)
    grid, frontier = laws.compute_frontier([r.curve for r in runs])
    return runs, (grid, frontier), laws.fit_saturating(grid, frontier)


def vit_holdout(law: laws.SaturatingFit, experiment: str, tracking_uri: Optional[str], sweep: str) -> list[dict]:
    """The ViT sweep's held-out runs: final validation loss against the frontier law at
    the run's training compute."""
    return [{"run_id": r.run_id, "params": r.params, "images": r.tokens, "flops": r.flops, "measured": r.val_loss,
             "predicted": float(law.error(r.flops))} for r in _held_out_runs(experiment, tracking_uri, sweep, "pretrain_vit")]


def fit_vit_command(experiment: str, tracking_uri: Optional[str], sweep: Optional[str], as_json: bool,
                    plots: Optional[str] = None) -> str:
    """Zhai et al.'s saturating law on the compute frontier of a ViT sweep's validation curves."""
    runs, (grid, frontier), law = vit_law(experiment, tracking_uri, sweep)
    out = {"saturating": {"a": law.a, "b": law.b, "c": law.c, "d": law.d}}
    lines = _runs_table(runs, "pretrain_vit") + ["", f"Zhai's saturating law on the compute frontier of {len(runs)} ViT runs: "
                                                f"L(C) = {law.a:.4g}·(C + {law.d:.3g})^-{law.b:.4f} + {law.c:.4g}"]
    holdout = vit_holdout(law, experiment, tracking_uri, sweep) if sweep else []
    if holdout:
        out["holdout"] = holdout
        lines += [f"held-out run: N = {h['params']:,}, {h['images']:,.0f} images, C = {h['flops']:.3g} FLOPs: "
                  f"predicted {h['predicted']:.4f}, measured {h['measured']:.4f} "
                  f"({100 * (h['predicted'] / h['measured'] - 1):+.1f}%)" for h in holdout]
    pngs = {}
    if plots or experiment:
        from pipeline.scaling import plots as draw

        n, d, loss = (np.array([getattr(r, k) for r in runs]) for k in ("params", "tokens", "val_loss"))
        label = f"saturating: {law.a:.2g}·(C + {law.d:.2g})^-{law.b:.3f} + {law.c:.3f}"
        pngs = {"loss_vs_flops.png": draw.loss_vs_flops(n, d, loss, runs, (grid, frontier), {label: law.error})}
    return _publish(out, lines, pngs, plots, experiment, tracking_uri, sweep, as_json)


def _publish(out: dict, lines: list[str], pngs: dict[str, bytes], plots: Optional[str], experiment: Optional[str],
             tracking_uri: Optional[str], sweep: Optional[str], as_json: bool, report: Optional[str] = None) -> str:
    """Plots (and the report page) to disk, the fit to its experiment in MLflow; the text
    or JSON to print."""
    files = {**pngs, **({REPORT: report.encode()} if report else {})}
    if plots:
        out["plots"] = [storage.join(plots, name) for name in pngs]
        for name, data in files.items():
            storage.write_bytes_atomic(storage.join(plots, name), data)
        if report:
            out["report"] = storage.join(plots, REPORT)
        lines.append("plots: " + ", ".join(out["plots"]) + (f"; report: {out['report']}" if report else ""))
    if experiment:
        out["mlflow_run_id"] = _log_fit(experiment, tracking_uri, sweep, out, files)
        lines.append(f"logged as MLflow run {out['mlflow_run_id']} (tag stage=scaling_fit) in experiment {experiment!r}")
    return json.dumps(out) if as_json else "\n".join(lines)


def _log_fit(experiment: str, tracking_uri: Optional[str], sweep: Optional[str], out: dict, files: dict[str, bytes]) -> str:
    """The fit as a run of the experiment it read: constants as metrics, the whole result
    as fit.json, the plots and the report page as artifacts, beside the runs in the MLflow UI."""
    import mlflow

    from pipeline import tracking

    client = tracking.client(tracking_uri or mlflow.get_tracking_uri())
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    tags = {Tag.STAGE: SCALING_FIT, **({Tag.SWEEP: sweep} if sweep else {})}
    run = client.create_run(experiment_id, run_name=f"scaling-fit{'-' + sweep if sweep else ''}", tags=tags)
    metrics = {f"{law}_{k}": v for law in ("chinchilla", "compute_optimal", "kaplan", "saturating")
               for k, v in out.get(law, {}).items() if isinstance(v, float)}
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, float(value))
    client.log_dict(run.info.run_id, out, "fit.json")
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        client.log_artifacts(run.info.run_id, tmp)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def predict_command(points: Optional[str], experiment: Optional[str], tracking_uri: Optional[str], sweep: Optional[str],
                    params: float, tokens: float, bootstrap: int, as_json: bool) -> str:
    """The fitted law's loss at (params, tokens), with the 95% interval of the bootstrap refits' predictions."""
    if params <= 0 or tokens <= 0:
        raise FitError(f"--params and --tokens must be positive, got {params} and {tokens}")
    (n, d, loss), _ = _points(points, experiment, tracking_uri, sweep)
    result = fit(n, d, loss, bootstrap=bootstrap)
    refits = [b["E"] + b["A"] / params ** b["alpha"] + b["B"] / tokens ** b["beta"] for b in result.bootstrap]
    lo, hi = (float(np.percentile(refits, q)) for q in (2.5, 97.5)) if refits else (float("nan"),) * 2
    value = float(result.loss(params, tokens))
    out = {"params": params, "tokens": tokens, "flops": 6 * params * tokens, "loss": value, "ci95": [lo, hi]}
    if as_json:
        return json.dumps(out)
    return (f"predicted loss at N = {params:.4g} parameters, D = {tokens:.4g} tokens (C = {6 * params * tokens:.3g} FLOPs): "
            f"{value:.4f}, 95% interval {lo:.4f} .. {hi:.4f} ({len(refits)} bootstrap refits)")
