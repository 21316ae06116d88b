"""`pipeline scaling design`: isoFLOP sweeps whose sizes bracket the optimum, whose
token counts put every run on its budget, and from which approach 2 recovers the
allocation exponent of a known law."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_scaling import TRUE, true_loss

from pipeline.cli import main
from pipeline.config import ConfigError, TrainConfig, TransformerConfig
from pipeline.scaling.chinchilla import FitError, compute_optimal
from pipeline.scaling.design import MIN_STEPS, design, ratio_prior
from pipeline.scaling.laws import isoflop_profiles
from pipeline.scaling.sweep import load_sweep, runs_at_once

TEMPLATE = "configs/scaling/gpt-cpu.yaml"


def blocks(shape: TransformerConfig) -> int:
    """A stand-in count of a GPT's non-embedding parameters: 12·L·d² and the biases."""
    return 12 * shape.n_layer * shape.d_model ** 2 + 13 * shape.n_layer * shape.d_model


def true_optimum(flops: float) -> float:
    return float(compute_optimal(TRUE["A"], TRUE["B"], TRUE["alpha"], TRUE["beta"], flops)[0])


@pytest.mark.parametrize("budgets", [[1e18, 1e19, 1e20], [3e17, 3e21]])
def test_sizes_bracket_the_guess_evenly_in_log_n(budgets):
    runs = design(budgets, sizes=7, spread=8.0, aspect=64, prior=true_optimum, count=blocks, tokens_per_step=2048)
    for budget in budgets:
        group = [r for r in runs if r.budget == budget]
        logs = np.log([r.params / true_optimum(budget) for r in group])
        assert len(group) == 7 and list(logs) == sorted(logs) and len(set(logs)) == 7
        assert logs[0] < -math.log(8) * 0.8 and logs[-1] > math.log(8) * 0.8  # from about N*/8 to 8N*
        assert abs(logs[3]) < 0.15  # the middle size at the guess
        gaps = np.diff(logs)
        assert gaps.max() < 2.0 * gaps.min() and gaps.mean() == pytest.approx(2 * math.log(8) / 6, rel=0.2)


def test_every_run_is_on_its_budget_in_whole_steps():
    step = 4096
    runs = design([1e17, 1e18, 1e19], sizes=5, spread=4.0, aspect=40, prior=ratio_prior(20), count=blocks, tokens_per_step=step)
    assert len(runs) == 15
    for r in runs:
        assert r.tokens % step == 0 and r.tokens >= MIN_STEPS * step
        assert abs(6 * r.params * r.tokens - r.budget) <= 6 * r.params * step / 2  # rounded to the nearest step
        assert r.size.d_model % r.size.n_head == 0 and r.size.d_model // r.size.n_head in (16, 32)
        assert r.params == blocks(r.size)


@pytest.mark.parametrize("tokens_per_param", [20, 5, 80])  # a first guess right, 2x too big, 2x too small
def test_approach_2_on_the_design_recovers_the_allocation_exponent(tokens_per_param):
    budgets = list(np.geomspace(1e18, 1e21, 4))
    runs = design(budgets, sizes=7, spread=8.0, aspect=64, prior=ratio_prior(tokens_per_param), count=blocks,
                  tokens_per_step=2048)
    n, d = np.array([r.params for r in runs], float), np.array([r.tokens for r in runs], float)
    profiles = isoflop_profiles(n, d, true_loss(n, d))
    assert len(profiles.budgets) == 4  # every budget's minimum inside its sizes
    assert profiles.a == pytest.approx(TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"]), abs=0.03)
    for budget, vertex in zip(profiles.budgets, profiles.n_opt):
        assert vertex == pytest.approx(true_optimum(budget), rel=0.25)


def test_a_design_too_small_for_its_sizes_or_too_narrow_is_refused():
    with pytest.raises(FitError, match="fewer than 10"):
        design([1e9, 1e10], sizes=5, spread=4.0, aspect=40, prior=ratio_prior(20), count=blocks, tokens_per_step=4096)
    with pytest.raises(FitError, match="--sizes must be >= 5"):
        design([1e18, 1e19], sizes=3, spread=4.0, aspect=40, prior=ratio_prior(20), count=blocks, tokens_per_step=4096)
    with pytest.raises(FitError, match="--spread must be > 1"):
        design([1e18, 1e19], sizes=5, spread=1.0, aspect=40, prior=ratio_prior(20), count=blocks, tokens_per_step=4096)


def test_cli_writes_a_sweep_file_the_sweep_reads(tmp_path, capsys):
    out = tmp_path / "isoflop.yaml"
    argv = ["scaling", "design", TEMPLATE, "--compute", "1e12", "1e13", "--budgets", "2", "--out", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    sweep = load_sweep(str(out))
    template = load_sweep(TEMPLATE)
    assert sweep.name == "gpt-cpu-isoflop" and sweep.overrides == template.overrides
    assert sweep.lr_reference_width == template.lr_reference_width and not sweep.sizes and not sweep.tokens
    runs = sweep.runs()
    assert len(runs) == 10 and "10 runs" in table and str(out) in table
    micro, seq = 32, 64  # the template's tokens per step: 1 worker x 32 sequences of 64
    assert all(tokens % (micro * seq) == 0 for _, tokens in runs)

    assert main(argv) == 2  # never over an existing file
    assert "exists" in capsys.readouterr().err
    assert main([*argv[:-2], "--budgets", "1", "--out", str(tmp_path / "one.yaml")]) == 2
    assert "--budgets must be >= 2" in capsys.readouterr().err and not (tmp_path / "one.yaml").exists()


def test_a_sweep_lists_points_or_a_grid_not_both(tmp_path):
    both = tmp_path / "both.yaml"
    both.write_text("name: b\nbase: configs/smoke.yaml\nexperiment: e\nsizes: [{}, {d_model: 64}]\ntokens: [1000]\n"
                    "points: [{size: {d_model: 64}, budget: 1000}, {size: {d_model: 32, n_head: 2}, budget: 2000}]\n")
    with pytest.raises(ConfigError, match="points, or sizes and tokens, not both"):
        load_sweep(str(both))
    one = tmp_path / "one.yaml"
    one.write_text("name: b\nbase: configs/smoke.yaml\nexperiment: e\npoints: [{size: {d_model: 64}, budget: 1000}]\n")
    with pytest.raises(ConfigError, match="at least 2 model sizes"):
        load_sweep(str(one))


def test_on_a_noisy_designed_sweep_both_approaches_agree_within_their_intervals():
    """Issue 25's check, on Chinchilla's published law with 1% noise: 4 budgets x 7 sizes
    from the design, both approaches' N* ∝ C^a with 95% intervals that overlap and hold
    the truth."""
    from pipeline.scaling.chinchilla import fit
    from pipeline.scaling.laws import isoflop_interval
    from pipeline.scaling.page import exponent_interval

    truth = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    runs = design(list(np.geomspace(1e18, 1e21, 4)), sizes=7, spread=8.0, aspect=64, prior=ratio_prior(20), count=blocks,
                  tokens_per_step=2048)
    n, d = np.array([r.params for r in runs], float), np.array([r.tokens for r in runs], float)
    loss = true_loss(n, d) * (1 + np.random.default_rng(7).normal(0, 0.01, len(n)))
    a3_lo, a3_hi = exponent_interval(fit(n, d, loss, bootstrap=30))
    a2_lo, a2_hi = isoflop_interval(n, d, loss, resamples=200)
    assert a3_lo <= truth <= a3_hi and a2_lo <= truth <= a2_hi
    assert a2_lo <= a3_hi and a3_lo <= a2_hi  # they agree
    assert a3_hi - a3_lo < 0.15 and a2_hi - a2_lo < 0.25  # and say something


def test_a_sweep_launches_only_the_runs_that_fit_at_once():
    assert runs_at_once({"CPU": 2.0}, TrainConfig(num_workers=1)) == 2
    assert runs_at_once({"CPU": 2.0}, TrainConfig(num_workers=2)) == 1
    assert runs_at_once({"CPU": 16.0, "GPU": 8.0}, TrainConfig(num_workers=2, use_gpu=True)) == 4
    assert runs_at_once({"CPU": 1.0}, TrainConfig(num_workers=2)) == 1  # too small still runs them, one by one
