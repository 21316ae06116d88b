"""The other scaling laws the scaling stage fits, besides Chinchilla's approach 3
(`chinchilla.py`):

- Chinchilla's approach 2: isoFLOP profiles. Runs of one compute budget are a
  curve of loss against log N; a parabola's vertex gives that budget's optimal
  size, and N_opt(C) ∝ C^a is a line through the vertices in log-log.
- Kaplan et al. 2020 on the compute frontier: L(C) = E + (C0/C)^alpha, where the
  frontier is the lowest loss any run reached at each compute (from the per-step
  curves, so a small model's early steps can sit on it too).
- Zhai et al. 2022's saturating form for ViTs: err(C) = a·(C + d)^(-b) + c.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from pipeline.scaling.chinchilla import FitError


@dataclass
class IsoFlop:
    budgets: np.ndarray  # compute of each profile
    n_opt: np.ndarray  # its parabola's vertex
    a: float  # N_opt ∝ C^a
    b: float  # D_opt ∝ C^b (= 1 - a, since C = 6·N·D)

    def n_opt_at(self, flops):
        """N* on the line through the vertices (an extrapolation past the budgets)."""
        k = float(np.mean(np.log(self.n_opt) - self.a * np.log(self.budgets)))
        return np.exp(k) * np.asarray(flops, float) ** self.a


def group_by_compute(params, tokens, rel_tol: float = 0.05) -> list[list[int]]:
    """Indices of runs grouped by compute 6·N·D, equal within `rel_tol` of a group's smallest."""
    compute = 6 * np.asarray(params, float) * np.asarray(tokens, float)
    groups: list[list[int]] = []
    for i in np.argsort(compute):
        if groups and compute[i] <= compute[groups[-1][0]] * (1 + rel_tol):
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    return groups


def isoflop_profiles(params, tokens, loss, rel_tol: float = 0.05) -> IsoFlop:
    """Group runs by compute (6·N·D, equal within `rel_tol`), fit loss = p(log N) with a
    parabola per group of 3 or more sizes, and a line through the vertices."""
    n, d, l = (np.asarray(v, float) for v in (params, tokens, loss))
    compute = 6 * n * d
    budgets, vertices = [], []
    for group in group_by_compute(n, d, rel_tol):
        if len(np.unique(n[group])) < 3:
            continue
        x = np.log(n[group])
        curvature, slope, _ = np.polyfit(x, l[group], 2)
        if curvature <= 0:
            continue  # no minimum inside this profile
        vertex = -slope / (2 * curvature)
        if not x.min() <= vertex <= x.max():
            continue  # the optimum lies outside the sizes tried: an extrapolation, not a measurement
        budgets.append(float(np.mean(compute[group])))
        vertices.append(float(np.exp(vertex)))
    if len(budgets) < 2:
        raise FitError("isoFLOP profiles need 2 or more compute budgets, each with 3+ model sizes around its optimum")
    a, _ = np.polyfit(np.log(budgets), np.log(vertices), 1)
    return IsoFlop(np.array(budgets), np.array(vertices), float(a), float(1 - a))


def isoflop_interval(params, tokens, loss, resamples: int, seed: int = 0, rel_tol: float = 0.05) -> tuple[float, float]:
    """95% interval of approach 2's exponent a: runs resampled with replacement within each
    compute budget (so every budget keeps its runs' count), the profiles refitted; a
    resample whose profiles no longer fit (a vertex outside its sizes) is left out."""
    n, d, l = (np.asarray(v, float) for v in (params, tokens, loss))
    groups = group_by_compute(n, d, rel_tol)
    rng = np.random.default_rng(seed)
    found = []
    for _ in range(resamples):
        pick = np.concatenate([rng.choice(group, len(group)) for group in groups])
        try:
            found.append(isoflop_profiles(n[pick], d[pick], l[pick], rel_tol).a)
        except (FitError, np.linalg.LinAlgError, ValueError):
            continue
    if len(found) < max(10, resamples // 2):
        raise FitError(f"approach 2's interval: only {len(found)} of {resamples} resamples could be fitted")
    return float(np.percentile(found, 2.5)), float(np.percentile(found, 97.5))


def compute_frontier(curves: list[tuple[np.ndarray, np.ndarray]], points: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """The lowest loss any run reached with at most C FLOPs, at `points` computes spread
    log-evenly over the range the runs cover. `curves`: (flops, loss) per run."""
    if not curves:
        raise FitError("no training curves to take a compute frontier from")
    flops = np.concatenate([np.asarray(c, float) for c, _ in curves])
    losses = np.concatenate([np.asarray(v, float) for _, v in curves])
    grid = np.geomspace(flops.min(), flops.max(), points)
    frontier = np.array([losses[flops <= c].min() for c in grid])
    return grid, frontier


@dataclass
class KaplanFit:
    E: float
    C0: float
    alpha: float

    def loss(self, flops):
        return self.E + (self.C0 / np.asarray(flops, float)) ** self.alpha


def fit_kaplan(flops, loss) -> KaplanFit:
    """L(C) = E + (C0/C)^alpha by least squares on log L, with E >= 0."""
    c, l = np.asarray(flops, float), np.asarray(loss, float)
    if len(c) < 4:
        raise FitError(f"{len(c)} frontier points cannot determine 3 constants well: give at least 4")
    scale = np.log(c).mean()  # fit log C0 relative to the data's scale, for conditioning

    def residuals(theta):
        e, log_c0, alpha = theta
        return np.log(e + np.exp(alpha * (log_c0 + scale - np.log(c)))) - np.log(l)

    best = None
    for e0 in (0.0, 0.5 * l.min(), 0.9 * l.min()):
        for alpha0 in (0.05, 0.2, 0.5):
            r = least_squares(residuals, [e0, 0.0, alpha0], bounds=([0.0, -50.0, 1e-3], [l.min(), 50.0, 3.0]))
            if best is None or r.cost < best.cost:
                best = r
    e, log_c0, alpha = best.x
    return KaplanFit(float(e), float(np.exp(log_c0 + scale)), float(alpha))


@dataclass
class SaturatingFit:
    a: float
    b: float
    c: float
    d: float

    def error(self, flops):
        return self.a * (np.asarray(flops, float) + self.d) ** (-self.b) + self.c


def fit_saturating(flops, error) -> SaturatingFit:
    """Zhai et al.'s err(C) = a·(C + d)^(-b) + c, by least squares on log err; C is
    rescaled to its median for conditioning, and the constants reported in FLOPs."""
    c, e = np.asarray(flops, float), np.asarray(error, float)
    if len(c) < 5:
        raise FitError(f"{len(c)} points cannot determine 4 constants: give at least 5")
    unit = float(np.median(c))
    x = c / unit

    def residuals(theta):
        log_a, b, floor, d = theta
        return np.log(np.exp(log_a) * (x + d) ** (-b) + floor) - np.log(e)

    best = None
    for b0 in (0.1, 0.5, 1.0):
        for floor0 in (0.0, 0.5 * e.min()):
            r = least_squares(residuals, [np.log(e.max()), b0, floor0, 0.0],
                              bounds=([-30.0, 1e-3, 0.0, 0.0], [30.0, 5.0, e.min(), 10.0 * x.max()]))
            if best is None or r.cost < best.cost:
                best = r
    log_a, b, floor, d = best.x
    # a·(x + d)^(-b) with x = C/unit is (a·unit^b)·(C + d·unit)^(-b).
    return SaturatingFit(float(np.exp(log_a) * unit ** b), float(b), float(floor), float(d * unit))
