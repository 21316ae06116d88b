"""`pipeline scaling fit --points FILE.csv`: Chinchilla's law fitted to runs from anywhere."""

from __future__ import annotations

import csv
import json

import numpy as np

from pipeline.scaling.chinchilla import NAMES, ChinchillaFit, FitError, fit

COLUMNS = ("params", "tokens", "loss")


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


def result_json(result: ChinchillaFit) -> dict:
    return {"chinchilla": result.as_dict(), "compute_optimal": result.exponents()}


def format_fit(result: ChinchillaFit) -> str:
    lines = [f"Chinchilla approach 3 on {result.points} runs: L(N, D) = E + A/N^alpha + B/D^beta",
             f"  {'':<6} {'fit':>12} {'95% interval':>27}"]
    for name in NAMES:
        lo, hi = result.ci95.get(name, (float("nan"), float("nan")))
        lines.append(f"  {name:<6} {getattr(result, name):>12.4g} {lo:>13.4g} .. {hi:<11.4g}")
    exps = result.exponents()
    lines.append(f"compute-optimal allocation: N* ∝ C^{exps['a']:.3f}, D* ∝ C^{exps['b']:.3f}")
    return "\n".join(lines)


def fit_points(path: str, bootstrap: int, as_json: bool) -> str:
    result = fit(*read_points(path), bootstrap=bootstrap)
    return json.dumps(result_json(result)) if as_json else format_fit(result)
