"""`scaling.md`: the one page `pipeline scaling fit` writes beside its plots and logs to
MLflow, for a person deciding what to train next: the constants with their intervals,
approaches 2 and 3 side by side, the held-out runs against the law, and the sizes and
token counts it recommends past the sweep."""

from __future__ import annotations

from datetime import date
from typing import Optional

import numpy as np

from pipeline.scaling.chinchilla import NAMES, ChinchillaFit
from pipeline.scaling.laws import IsoFlop

FACTORS = (10, 100)  # recommendations at these multiples of the largest run's compute


def _interval(values) -> Optional[tuple[float, float]]:
    values = [v for v in values if np.isfinite(v)]
    return (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))) if values else None


def exponent_interval(result: ChinchillaFit) -> Optional[tuple[float, float]]:
    """95% interval of approach 3's N* ∝ C^a, from the bootstrap refits."""
    return _interval([b["beta"] / (b["alpha"] + b["beta"]) for b in result.bootstrap])


def recommendations(result: ChinchillaFit, iso: Optional[IsoFlop], largest: float) -> list[dict]:
    """N* and D* at 10x and 100x the largest run's compute: approach 3 (with the bootstrap
    refits' 95% interval on N*) and approach 2's line."""
    out = []
    for factor in FACTORS:
        flops = factor * largest
        n_opt, d_opt = result.compute_optimal(flops)
        row = {"factor": factor, "flops": flops, "approach3": {"params": float(n_opt), "tokens": float(d_opt)}}
        spread = _interval([ChinchillaFit(**b).compute_optimal(flops)[0] for b in result.bootstrap])
        if spread:
            row["approach3"]["params_ci95"] = list(spread)
        if iso is not None:
            n2 = float(iso.n_opt_at(flops))
            row["approach2"] = {"params": n2, "tokens": flops / (6 * n2)}
        out.append(row)
    return out


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def markdown(out: dict, runs: int, largest: float, plots: list[str], holdout: list[dict], source: str) -> str:
    """The page, from `fit_command`'s result dict."""
    c = out["chinchilla"]
    lines = [f"# Scaling fit: {source}", "",
             f"{runs} runs, the largest at C = {_fmt(largest)} FLOPs (C = 6·N·D, N non-embedding). "
             f"Written by `pipeline scaling fit` on {date.today().isoformat()}.", "",
             "## Chinchilla approach 3: L(N, D) = E + A/N^α + B/D^β", "",
             "| constant | fit | 95% interval |", "|---|---|---|"]
    for name in NAMES:
        lo, hi = c["ci95"].get(name, (float("nan"), float("nan")))
        lines.append(f"| {name} | {c[name]:.4g} | {lo:.4g} .. {hi:.4g} |")
    a3, a3_ci = out["compute_optimal"]["a"], out.get("compute_optimal_a_ci95")
    iso = out.get("isoflop")
    lines += ["", "## N*(C) ∝ C^a: both approaches", "", "| approach | a | 95% interval |", "|---|---|---|",
              f"| 3 (the law's minimum along 6ND = C) | {a3:.3f} | {span(a3_ci)} |"]
    if iso:
        lines.append(f"| 2 (isoFLOP vertices, {len(iso['budgets'])} budgets) | {iso['a']:.3f} | {span(iso.get('a_ci95'))} |")
        if a3_ci and iso.get("a_ci95"):
            agree = iso["a_ci95"][0] <= a3_ci[1] and a3_ci[0] <= iso["a_ci95"][1]
            lines += ["", f"The two intervals {'overlap: the approaches agree' if agree else 'do not overlap: they disagree'}."]
        lines += ["", "| C (FLOPs) | approach 2's N* (the profile's vertex) | approach 3's N* |", "|---|---|---|"]
        lines += [f"| {_fmt(b)} | {_fmt(n)} | {_fmt(a3_n)} |"
                  for b, n, a3_n in zip(iso["budgets"], iso["n_opt"], out["approach3_n_opt"])]
    else:
        lines.append(f"| 2 | not fitted | {out.get('isoflop_error', '')} |")
    if "kaplan" in out:
        k = out["kaplan"]
        lines += ["", f"Kaplan on the compute frontier: L(C) = {k['E']:.4g} + ({_fmt(k['C0'])}/C)^{k['alpha']:.4f}."]
    lines += ["", "## Recommended next runs", "",
              "| compute | approach 3: N* (95% interval) | D* tokens | approach 2: N* | D* tokens |", "|---|---|---|---|---|"]
    for row in out["recommended"]:
        r3, r2 = row["approach3"], row.get("approach2")
        ci = f" ({_fmt(r3['params_ci95'][0])} .. {_fmt(r3['params_ci95'][1])})" if r3.get("params_ci95") else ""
        lines.append(f"| {row['factor']}x = {_fmt(row['flops'])} | {_fmt(r3['params'])}{ci} | {_fmt(r3['tokens'])} | "
                     f"{_fmt(r2['params']) if r2 else '-'} | {_fmt(r2['tokens']) if r2 else '-'} |")
    if holdout:
        lines += ["", "## Held-out runs (not in the fit)", "", "| N | D | C | predicted | measured | error |", "|---|---|---|---|---|---|"]
        for h in holdout:
            lines.append(f"| {_fmt(h['params'])} | {_fmt(h['tokens'])} | {_fmt(6 * h['params'] * h['tokens'])} | "
                         f"{h['predicted']:.4f} | {h['measured']:.4f} | {100 * (h['predicted'] / h['measured'] - 1):+.1f}% |")
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def span(ci) -> str:
    """A 95% interval of an exponent as the page and the fit's text print it."""
    return f"{ci[0]:.3f} .. {ci[1]:.3f}" if ci else "-"
