"""The two pictures of a fit: loss against compute (every run's validation curve,
the compute frontier, Kaplan's law on it and Chinchilla's law at the compute-optimal
size) and isoFLOP profiles (loss against model size at fixed compute, with the
fitted law's slice through each budget and its minimum)."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from pipeline.plotting import png, pyplot
from pipeline.scaling.chinchilla import ChinchillaFit
from pipeline.scaling.laws import group_by_compute
from pipeline.scaling.runs import TrainingRun


def _size_colors(params: np.ndarray):
    plt = pyplot()
    logs = np.log(params)
    span = max(logs.max() - logs.min(), 1e-9)
    return lambda n: plt.cm.viridis(0.9 * (np.log(n) - logs.min()) / span)


def loss_vs_flops(params, tokens, loss, runs: list[TrainingRun], frontier: Optional[tuple[np.ndarray, np.ndarray]],
                  laws: dict[str, Callable[[np.ndarray], np.ndarray]]) -> bytes:
    """A PNG: log-log validation loss against training FLOPs, with `laws` (label: loss at
    compute C) drawn out to 10x the largest run."""
    plt = pyplot()
    n, d, l = (np.asarray(v, float) for v in (params, tokens, loss))
    flops = 6 * n * d if not runs else np.array([r.flops for r in runs])
    color = _size_colors(n)
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        ax.plot(*run.curve, color=color(run.params), alpha=0.6, lw=1)
    ax.scatter(flops, l, c=[color(x) for x in n], s=25, zorder=3, label="runs (final validation loss)")
    grid = np.geomspace(flops.min() / 2, 10 * flops.max(), 100)
    if frontier is not None:
        ax.plot(*frontier, "k--", lw=1.5, label="compute frontier")
    for (label, law), line in zip(laws.items(), ("tab:red", "tab:blue", "tab:green")):
        ax.plot(grid, law(grid), color=line, lw=1.5, label=label)
    ax.axvline(flops.max(), color="grey", lw=0.8, ls=":")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel="validation loss",
           title="loss against compute (colour: model size)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return png(fig)


def isoflop_points(runs: list[TrainingRun], budgets: np.ndarray) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """For each budget, (N, loss) of every run whose validation curve passed it, the loss
    interpolated in log-log between the curve's evaluations."""
    out = {}
    for c in budgets:
        sizes, losses = [], []
        for run in runs:
            flops, val = run.curve
            if len(flops) and flops.min() <= c <= flops.max():
                sizes.append(run.params)
                losses.append(float(np.exp(np.interp(np.log(c), np.log(flops), np.log(val)))))
        out[float(c)] = (np.array(sizes, float), np.array(losses))
    return out


def isoflop(fit: ChinchillaFit, params, tokens, loss, runs: list[TrainingRun], budgets: int = 4) -> bytes:
    """A PNG. Left: loss against N at fixed compute (from the runs' curves, or from runs of equal
    final compute without them) with the fitted law's slice. Right: N*(C)."""
    plt = pyplot()
    n, d, l = (np.asarray(v, float) for v in (params, tokens, loss))
    if runs:
        finals = 6 * n * d
        profiles = isoflop_points(runs, np.geomspace(finals.min(), finals.max(), budgets))
    else:
        profiles = {float(np.mean(6 * n[g] * d[g])): (n[g], l[g]) for g in group_by_compute(n, d)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = plt.cm.plasma(np.linspace(0.05, 0.85, len(profiles)))
    sizes = np.geomspace(n.min() / 3, n.max() * 3, 100)
    empirical = []
    for color, (c, (ns, ls)) in zip(colors, sorted(profiles.items())):
        left.plot(sizes, fit.loss(sizes, c / (6 * sizes)), color=color, lw=1, alpha=0.8)
        n_opt, d_opt = fit.compute_optimal(c)
        left.plot(n_opt, fit.loss(n_opt, d_opt), "*", color=color, ms=12, mec="k")
        if len(ns):
            left.plot(ns, ls, "o", color=color, label=f"C = {c:.2g}")
            empirical.append((c, ns[np.argmin(ls)]))
    left.set(xscale="log", xlabel="non-embedding parameters N", ylabel="validation loss",
             title="isoFLOP profiles (lines: fitted law, ★: its N*)")
    left.grid(alpha=0.3, which="both")
    left.legend(fontsize=8)
    grid = np.geomspace(min(profiles) / 2, max(profiles) * 10, 50)
    right.plot(grid, fit.compute_optimal(grid)[0], color="tab:blue", label=f"approach 3: N* ∝ C^{fit.exponents()['a']:.2f}")
    if empirical:
        right.plot(*zip(*empirical), "ko", label="best run at each budget")
    right.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="N*", title="compute-optimal size")
    right.grid(alpha=0.3, which="both")
    right.legend(fontsize=8)
    return png(fig)
