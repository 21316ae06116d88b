"""`pipeline scaling design`: a GPT sweep laid out as Chinchilla's isoFLOP profiles
(Hoffmann et al. 2022, approach 2).

At each of several compute budgets C (evenly spaced in log C), `sizes` model sizes
evenly spaced in log N around a first guess of the compute-optimal N*(C), from
N*/spread to N*·spread, each trained on D = C / (6N) tokens (N: non-embedding
parameters, as the fits count them). Every budget is then one curve of loss against
N with its minimum inside it, which is what approach 2 fits and what approach 3 needs
to pin down N*(C). The first guess comes from a prior: the law fitted to an earlier
sweep's runs, or a ratio of tokens to parameters (Chinchilla's 20 by default).

Shapes come from one family, `d_model / n_layer` near `aspect` (d_model in steps of
16, the depths either side of d_model / aspect; head size 32, or 16 where 32 does not
divide), so that sizes differ in scale more than in shape. The token
count of each point is rounded to whole optimizer steps of the base config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from datetime import date
from typing import Callable, Optional

import numpy as np

from pipeline.config import TransformerConfig, dataclass_from_dict
from pipeline.scaling.chinchilla import FitError
from pipeline.scaling.sweep import SweepConfig, _base, load_sweep, samples_per_step

MIN_STEPS = 10  # a run shorter than this is mostly warm-up: its loss says little about its size


@dataclass
class DesignedRun:
    size: TransformerConfig
    params: int  # non-embedding
    tokens: int
    budget: float  # the compute C this run belongs to
    guess: float  # the budget's first guess of N*

    @property
    def flops(self) -> float:
        return 6.0 * self.params * self.tokens


def ratio_prior(tokens_per_param: float) -> Callable[[float], float]:
    """N*(C) if compute-optimal runs train `tokens_per_param` tokens per parameter: C = 6·N·(r·N)."""
    return lambda flops: math.sqrt(flops / (6.0 * tokens_per_param))


def shapes_of(d_model: int, aspect: float) -> list[TransformerConfig]:
    """The family's shapes of width `d_model`: the depths either side of d_model / aspect."""
    head = 32 if d_model % 32 == 0 else 16
    depths = sorted({max(1, math.floor(d_model / aspect)), max(1, math.ceil(d_model / aspect))})
    return [TransformerConfig(n_layer=n_layer, n_head=d_model // head, d_model=d_model) for n_layer in depths]


def ladder(count: Callable[[TransformerConfig], int], aspect: float, largest: float) -> list[tuple[TransformerConfig, int]]:
    """The family's shapes (d_model in steps of 16) and their N, smallest first, up to the
    first width with a shape past `largest` parameters; of shapes within 3% in N, the first."""
    found: list[tuple[TransformerConfig, int]] = []
    d_model = 16
    while not found or max(params for _, params in found) <= largest:
        found += [(shape, count(shape)) for shape in shapes_of(d_model, aspect)]
        d_model += 16
    out: list[tuple[TransformerConfig, int]] = []
    for shape, params in sorted(found, key=lambda pair: pair[1]):
        if not out or params > out[-1][1] * 1.03:
            out.append((shape, params))
    return out


def sizes_around(shapes: list[tuple[TransformerConfig, int]], guess: float, sizes: int,
                 spread: float) -> list[tuple[TransformerConfig, int]]:
    """`sizes` distinct shapes nearest (in log N) to targets evenly spaced in log N from
    guess/spread to guess·spread; a target whose nearest shape is taken gets the next free one."""
    logs = np.log([params for _, params in shapes])
    targets = math.log(guess) + np.linspace(-1.0, 1.0, sizes) * math.log(spread)
    taken: list[int] = []
    for target in targets:
        order = np.argsort(np.abs(logs - target), kind="stable")
        free = [int(i) for i in order if i not in taken and (not taken or i > taken[-1])]
        if not free:
            raise FitError(f"no {sizes} distinct model sizes around N = {guess:.3g}: widen --spread or lower --sizes")
        taken.append(free[0])
    return [shapes[i] for i in taken]


def design(budgets: list[float], sizes: int, spread: float, aspect: float, prior: Callable[[float], float],
           count: Callable[[TransformerConfig], int], tokens_per_step: int) -> list[DesignedRun]:
    if sizes < 5:
        raise FitError(f"--sizes must be >= 5 (an isoFLOP profile needs sizes on both sides of its minimum), got {sizes}")
    if spread <= 1:
        raise FitError(f"--spread must be > 1 (sizes from N*/spread to N*·spread), got {spread}")
    guesses = [prior(c) for c in budgets]
    shapes = ladder(count, aspect, max(guesses) * spread * 2)
    runs = []
    for budget, guess in zip(budgets, guesses):
        for shape, params in sizes_around(shapes, guess, sizes, spread):
            steps = round(budget / (6.0 * params) / tokens_per_step)
            if steps < MIN_STEPS:
                raise FitError(f"at C = {budget:.3g} FLOPs a model of N = {params:,} trains {steps} steps of "
                               f"{tokens_per_step:,} tokens, fewer than {MIN_STEPS}: raise --compute or lower --spread")
            runs.append(DesignedRun(shape, params, steps * tokens_per_step, budget, guess))
    return runs


def gpt_counter(vocab_size: int, seq_len: int) -> Callable[[TransformerConfig], int]:
    """N (non-embedding parameters) of a GPT of a shape, counted on the meta device."""
    import torch

    from pipeline.keys import Param
    from pipeline.kinds.base import param_counts
    from pipeline.kinds.gpt import KIND, GPTModelConfig

    def count(shape: TransformerConfig) -> int:
        with torch.device("meta"):
            return param_counts(KIND.build(GPTModelConfig(vocab_size, seq_len, shape)))[Param.PARAMS_NON_EMBEDDING]

    return count


def to_yaml(sweep: SweepConfig, runs: list[DesignedRun], how: str) -> str:
    """The sweep file: the template's settings, then one point per run, each with its
    compute and its size against the budget's first guess in a comment."""
    import yaml

    head = {k: v for k, v in dataclasses.asdict(sweep).items()
            if k in ("name", "base", "experiment", "stage", "overrides", "evaluations", "lr_reference_width") and v is not None}
    lines = [f"# Written by `{how}` on {date.today().isoformat()}:",
             f"# {len({r.budget for r in runs})} compute budgets x {len(runs) // len({r.budget for r in runs})} sizes "
             "(isoFLOP profiles; pipeline/scaling/design.py says how).",
             yaml.safe_dump(head, sort_keys=False).rstrip(), "points:"]
    for budget in sorted({r.budget for r in runs}):
        group = [r for r in runs if r.budget == budget]
        lines.append(f"  # C = {budget:.3g} FLOPs, first guess N* = {group[0].guess:,.0f}")
        for r in group:
            s = r.size
            lines.append(f"  - {{size: {{n_layer: {s.n_layer}, n_head: {s.n_head}, d_model: {s.d_model}}}, budget: {r.tokens}}}"
                         f"  # N = {r.params:,} ({r.params / r.guess:.2f} N*), 6ND = {r.flops:.3g}")
    return "\n".join(lines) + "\n"


def design_command(template: str, compute: tuple[float, float], budgets: int, sizes: int, spread: float,
                   aspect: float, name: Optional[str], tokens_per_param: Optional[float],
                   prior: Optional[Callable[[float], float]], out: str, how: str) -> str:
    """Write the designed sweep to `out` (refusing to overwrite) and return its table.
    Without a `prior`, the first guess trains `tokens_per_param` tokens per parameter
    (None: the plan's Chinchilla ratio, `plan.TOKENS_PER_PARAM`)."""
    import os

    import yaml

    from pipeline import storage
    from pipeline.plan import TOKENS_PER_PARAM

    lo, hi = compute
    if not 0 < lo <= hi:
        raise FitError(f"--compute must be two positive FLOP counts, smallest first, got {lo:g} {hi:g}")
    if budgets < 2:
        raise FitError(f"--budgets must be >= 2 (a line through the budgets' optima needs two), got {budgets}")
    if os.path.exists(out):
        raise FitError(f"--out {out} exists: choose a new file")
    sweep = load_sweep(template)
    if sweep.stage != "pretrain_gpt":
        raise FitError(f"{template}: an isoFLOP design is for pretrain_gpt sweeps (C = 6ND), not {sweep.stage}")
    base = _base(sweep, sweep.name)
    sweep = dataclasses.replace(sweep, name=name or f"{sweep.name}-isoflop")
    runs = design(list(np.geomspace(lo, hi, budgets)), sizes, spread, aspect, prior or ratio_prior(tokens_per_param or TOKENS_PER_PARAM),
                  gpt_counter(base.tokenize.vocab_size, base.tokenize.seq_len), samples_per_step(base, sweep.stage))
    text = to_yaml(sweep, runs, how)
    dataclass_from_dict(SweepConfig, yaml.safe_load(text), "")  # what it writes, it reads back
    storage.write_bytes_atomic(out, text.encode())
    rows = [f"{'C (FLOPs)':>10} {'layers':>6} {'d_model':>7} {'N':>12} {'N/N*':>5} {'tokens':>12}"]
    rows += [f"{r.budget:>10.3g} {r.size.n_layer:>6} {r.size.d_model:>7} {r.params:>12,} {r.params / r.guess:>5.2f} {r.tokens:>12,}"
             for r in runs]
    return "\n".join(rows) + f"\n{len(runs)} runs, {sum(r.flops for r in runs):.3g} FLOPs in all; written to {out}"

