"""Chinchilla approach 3 against its published law: exact on noiseless points,
honest intervals and predictions with 1% noise, clear errors on degenerate input."""

from __future__ import annotations

import csv
import json
import os
import warnings

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.scaling.chinchilla import FitError, compute_optimal, fit

TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al. 2022


def true_loss(n, d):
    return TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]


def chinchilla_grid():
    """9 compute budgets from 1e18 to 1e22 FLOPs, 8 model sizes each around the optimum."""
    n, d = [], []
    for c in np.logspace(18, 22, 9):
        n_opt, _ = compute_optimal(TRUE["A"], TRUE["B"], TRUE["alpha"], TRUE["beta"], c)
        for size in n_opt * np.geomspace(1 / 8, 8, 8):
            n.append(size)
            d.append(c / (6 * size))
    return np.array(n), np.array(d)


def test_the_fitter_is_exact_on_noiseless_points():
    n, d = chinchilla_grid()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or invalid value along the way
        result = fit(n, d, true_loss(n, d), bootstrap=0)
    for name, value in TRUE.items():
        assert getattr(result, name) == pytest.approx(value, rel=0.005), name


def test_intervals_and_predictions_are_honest_with_noise():
    n, d = chinchilla_grid()
    far = 10 * 1e22  # 10x the largest compute, at the true law's optimal size
    n_far, d_far = compute_optimal(TRUE["A"], TRUE["B"], TRUE["alpha"], TRUE["beta"], far)
    covered = {"E": 0, "alpha": 0, "beta": 0}
    predicted = 0
    for seed in range(10):
        noisy = true_loss(n, d) * (1 + np.random.default_rng(100 + seed).normal(0, 0.01, len(n)))
        result = fit(n, d, noisy, bootstrap=100, seed=seed)
        for name in covered:
            lo, hi = result.ci95[name]
            covered[name] += lo <= TRUE[name] <= hi
        predicted += abs(result.loss(n_far, d_far) / true_loss(n_far, d_far) - 1) <= 0.015
    assert min(covered.values()) >= 8, covered
    assert predicted >= 9


def test_compute_optimal_allocation_is_the_minimum_along_constant_compute():
    for c in (1e19, 1e23):
        n_opt, d_opt = compute_optimal(TRUE["A"], TRUE["B"], TRUE["alpha"], TRUE["beta"], c)
        sizes = np.geomspace(n_opt / 100, n_opt * 100, 20001)
        best = sizes[np.argmin(true_loss(sizes, c / (6 * sizes)))]
        assert best == pytest.approx(n_opt, rel=1e-3) and 6 * n_opt * d_opt == pytest.approx(c)


def test_degenerate_input_is_refused():
    n, d = chinchilla_grid()
    loss = true_loss(n, d)
    with pytest.raises(FitError, match="at least 5"):
        fit(n[:4], d[:4], loss[:4])
    with pytest.raises(FitError, match="same model size"):
        fit(np.full(10, 1e9), d[:10], loss[:10])
    with pytest.raises(FitError, match="positive"):
        fit(n, d, -loss)


def _is_png(data: bytes) -> bool:
    """A PNG that decodes to a picture of real size, not an empty file."""
    import io

    import matplotlib.image

    return data[:8] == b"\x89PNG\r\n\x1a\n" and min(matplotlib.image.imread(io.BytesIO(data)).shape[:2]) >= 300


def test_cli_fits_a_csv(tmp_path, capsys):
    n, d = chinchilla_grid()
    path = tmp_path / "points.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["params", "tokens", "loss", "name"])
        writer.writerows([a, b, true_loss(a, b), f"run{i}"] for i, (a, b) in enumerate(zip(n, d)))
    assert main(["scaling", "fit", "--points", str(path), "--json", "--bootstrap", "10", "--plots", str(tmp_path / "plots")]) == 0
    out = json.loads(capsys.readouterr().out)
    for png in out["plots"]:
        assert _is_png(open(png, "rb").read())
    assert out["chinchilla"]["alpha"] == pytest.approx(TRUE["alpha"], rel=0.005)
    assert set(out["chinchilla"]["ci95"]) == set(TRUE)
    a, b = out["compute_optimal"]["a"], out["compute_optimal"]["b"]
    assert a == pytest.approx(TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"]), rel=0.01) and a + b == pytest.approx(1)
    # What to train next, at 10x and 100x the largest run's compute (1e22): the true law's optimum
    largest = max(6 * n * d)
    for row, factor in zip(out["recommended"], (10, 100)):
        n_true, d_true = compute_optimal(TRUE["A"], TRUE["B"], TRUE["alpha"], TRUE["beta"], factor * largest)
        assert row["flops"] == pytest.approx(factor * largest)
        assert row["approach3"]["params"] == pytest.approx(n_true, rel=0.03)
        assert row["approach3"]["tokens"] == pytest.approx(d_true, rel=0.03)
        assert row["approach2"]["params"] == pytest.approx(n_true, rel=0.25)  # a parabola's vertex is close, not exact
    report = open(out["report"]).read()
    assert f"| 3 (the law's minimum along 6ND = C) | {a:.3f} |" in report and f"{out['isoflop']['a']:.3f}" in report

    bad = tmp_path / "bad.csv"
    bad.write_text("params,tokens\n1,2\n")
    assert main(["scaling", "fit", "--points", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no column loss" in err[0]


# --------------------------------------------------------------------------- approach 2, Kaplan, ViT


def test_isoflop_vertices_recover_the_allocation_exponent():
    from pipeline.scaling.laws import isoflop_profiles

    n, d = chinchilla_grid()
    iso = isoflop_profiles(n, d, true_loss(n, d))
    assert len(iso.budgets) == 9
    # The true law's exponent is beta / (alpha + beta) = 0.4516; a parabola in log N is
    # only close to each profile, so approach 2 lands near it, not on it.
    assert iso.a == pytest.approx(TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"]), rel=0.03)
    true_n_opt, _ = compute_optimal(TRUE["A"], TRUE["B"], TRUE["alpha"], TRUE["beta"], iso.budgets)
    assert np.allclose(iso.n_opt, true_n_opt, rtol=0.15)


def test_kaplan_law_on_the_frontier_of_training_curves():
    """Curves of runs of several sizes whose envelope is L(C) = 2 + (1e15/C)^0.3: the
    frontier taken from the curves and its fit give the law back."""
    from pipeline.scaling.laws import compute_frontier, fit_kaplan

    law = lambda c: 2.0 + (1e15 / c) ** 0.3  # noqa: E731
    curves = []
    for c_opt in np.geomspace(1e15, 1e19, 9):  # each run touches the law at its own compute, above it elsewhere
        c = np.geomspace(c_opt / 30, c_opt * 3, 40)
        curves.append((c, law(c) * (1 + 0.2 * np.log(c / c_opt) ** 2)))
    grid, frontier = compute_frontier(curves)
    assert np.all(np.diff(frontier) <= 0)
    fit = fit_kaplan(*(v[grid >= 1e15] for v in (grid, frontier)))
    assert fit.alpha == pytest.approx(0.3, rel=0.05) and fit.E == pytest.approx(2.0, rel=0.05)
    assert fit.loss(1e21) == pytest.approx(law(1e21), rel=0.01)


def test_saturating_vit_law():
    from pipeline.scaling.laws import fit_saturating

    a, b, c, d = 2e4, 0.35, 0.02, 3e12  # error from ~0.4 at 1e13 FLOPs down towards 0.02
    flops = np.geomspace(1e13, 1e18, 12)
    noise = 1 + np.random.default_rng(0).normal(0, 0.005, len(flops))
    fit = fit_saturating(flops, (a * (flops + d) ** -b + c) * noise)
    assert fit.b == pytest.approx(b, rel=0.1) and fit.c == pytest.approx(c, rel=0.1)
    assert fit.error(1e19) == pytest.approx(a * (1e19 + d) ** -b + c, rel=0.03)


# --------------------------------------------------------------------------- from MLflow


def log_training_run(client, experiment: str, stage: str, params: float, seen: np.ndarray, val_loss: np.ndarray,
                     status: str = "ran", sweep: str = "gpt-cpu") -> None:
    """A run as the pipeline logs one: tagged with its stage, status and sweep, its
    non-embedding parameters as a param, data seen, FLOPs and validation loss per step."""
    unit = "tokens" if stage == "pretrain_gpt" else "images"
    run = client.create_run(experiment, tags={"stage": stage, "status": status, "sweep": sweep})
    client.log_param(run.info.run_id, "params_non_embedding", int(params))
    for step, (x, loss) in enumerate(zip(seen, val_loss), start=1):
        for key, value in ((unit, x), ("flops", 6 * params * x), ("val_loss", loss)):
            client.log_metric(run.info.run_id, key, float(value), step=step)
    client.set_terminated(run.info.run_id)


def test_fit_and_predict_read_runs_back_from_mlflow(tmp_path, capsys):
    """Runs logged as the pipeline logs them (a nested pretrain_gpt run per size and
    budget, tagged with its sweep) into a real SQLite store, fitted through the CLI.
    A cached run and another sweep's run, with absurd losses, must not count."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("sweeps", artifact_location=f"file://{tmp_path}/artifacts")
    n, d = chinchilla_grid()

    def log_run(params, tokens, status="ran", sweep="gpt-cpu", scale=1.0):
        seen = np.linspace(tokens / 5, tokens, 5)
        log_training_run(client, experiment, "pretrain_gpt", params, seen, scale * true_loss(params, seen), status, sweep)

    for params, tokens in zip(n, d):
        log_run(params, tokens)
    log_run(n[0], d[0], status="cached", scale=10.0)
    log_run(n[0], d[0], sweep="another", scale=10.0)
    log_run(3e10, 6e11, sweep="gpt-cpu-holdout", scale=1.02)  # past the sweep, 2% above the law

    source = ["--experiment", "sweeps", "--tracking-uri", uri, "--sweep", "gpt-cpu", "--bootstrap", "0", "--json"]
    assert main(["scaling", "fit", *source, "--plots", str(tmp_path / "plots")]) == 0
    out = json.loads(capsys.readouterr().out)
    for name, value in TRUE.items():
        assert out["chinchilla"][name] == pytest.approx(value, rel=0.005), name
    # the fit is a run of the experiment, beside the runs it read, with its plots attached
    fit_run = client.get_run(out["mlflow_run_id"])
    assert fit_run.data.tags["stage"] == "scaling_fit" and fit_run.data.tags["sweep"] == "gpt-cpu"
    assert fit_run.data.metrics["chinchilla_alpha"] == pytest.approx(out["chinchilla"]["alpha"], rel=1e-9)
    logged = {a.path for a in client.list_artifacts(fit_run.info.run_id)}
    assert logged == {"fit.json", "loss_vs_flops.png", "isoflop.png", "scaling.md"}
    report = open(out["report"]).read()
    assert open(client.download_artifacts(fit_run.info.run_id, "scaling.md", str(tmp_path / "dl")), "r").read() == report
    [holdout] = out["holdout"]  # read from the experiment, not fitted: the page says how far off the law is
    assert holdout["measured"] / holdout["predicted"] == pytest.approx(1.02, rel=1e-3) and "| -2.0% |" in report
    assert "![isoflop.png](isoflop.png)" in report and "## Recommended next runs" in report
    for png in out["plots"]:
        name = os.path.basename(png)
        on_disk = open(png, "rb").read()
        assert _is_png(on_disk) and open(client.download_artifacts(fit_run.info.run_id, name, str(tmp_path)), "rb").read() == on_disk
    assert out["isoflop"]["a"] == pytest.approx(out["compute_optimal"]["a"], rel=0.03)
    assert 0 < out["kaplan"]["alpha"] < 1 and out["kaplan"]["E"] < min(true_loss(n, d))

    assert main(["scaling", "predict", *source, "--params", "1e10", "--tokens", "2e11"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(true_loss(1e10, 2e11), rel=1e-3)

    assert main(["scaling", "fit", "--experiment", "nope", "--tracking-uri", uri]) == 2
    assert "no MLflow experiment named 'nope'" in capsys.readouterr().err


def test_vit_sweep_fit_reads_vit_runs_and_fits_the_saturating_law(tmp_path, capsys):
    """ViT runs whose models follow loss = a·(C + d)^-b + c until the smaller ones saturate
    at a size-dependent floor: the frontier is the law, and the fit recovers it."""
    from mlflow.tracking import MlflowClient

    a, b, c, d = 40.0, 0.12, 0.05, 1e8
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("vit", artifact_location=f"file://{tmp_path}/artifacts")
    for params in (1e4, 4e4, 1.6e5, 6.4e5):
        images = np.geomspace(1e3, 1e5, 8)
        flops = 6 * params * images
        floor = a * (6 * params * 3e4 + d) ** -b + c if params < 6e5 else 0  # smaller sizes stop improving
        log_training_run(client, experiment, "pretrain_vit", params, images,
                         np.maximum(a * (flops + d) ** -b + c, floor), sweep="vit")
    log_training_run(client, experiment, "pretrain_gpt", 1e5, np.geomspace(1e3, 1e5, 8), np.full(8, 0.001), sweep="vit")
    # held out: 4x the sweep's largest compute, 3% above the law, and not part of the fit
    held_images = np.geomspace(4e4, 4e5, 5)
    log_training_run(client, experiment, "pretrain_vit", 6.4e5, held_images,
                     1.03 * (a * (6 * 6.4e5 * held_images + d) ** -b + c), sweep="vit-holdout")

    assert main(["scaling", "fit", "--stage", "pretrain_vit", "--experiment", "vit", "--sweep", "vit",
                 "--tracking-uri", uri, "--json", "--plots", str(tmp_path / "plots")]) == 0
    out = json.loads(capsys.readouterr().out)
    law = out["saturating"]
    assert law["b"] == pytest.approx(b, rel=0.1)
    # the frontier is a staircase between evaluations, so c and b trade off a little: judge the extrapolation
    beyond = 10 * 6 * 6.4e5 * 1e5
    assert law["a"] * (beyond + law["d"]) ** -law["b"] + law["c"] == pytest.approx(a * (beyond + d) ** -b + c, rel=0.03)
    [held] = out["holdout"]  # read back as logged, predicted by the fitted law at its own compute
    truth = a * (held["flops"] + d) ** -b + c
    assert held["flops"] == pytest.approx(4 * 6 * 6.4e5 * 1e5) and held["measured"] == pytest.approx(1.03 * truth)
    assert held["predicted"] == pytest.approx(truth, rel=0.03) and held["predicted"] != pytest.approx(held["measured"], rel=1e-3)
    fit_run = client.get_run(out["mlflow_run_id"])
    assert fit_run.data.metrics["saturating_b"] == pytest.approx(law["b"]) and fit_run.data.tags["stage"] == "scaling_fit"
    assert _is_png(open(out["plots"][0], "rb").read())

    assert main(["scaling", "fit", "--stage", "pretrain_vit", "--points", "x.csv"]) == 2
    assert "--stage pretrain_vit fits runs of an --experiment" in capsys.readouterr().err
