"""Property-based fuzz of the config loader (hypothesis): any value under any key,
and unknown keys anywhere, either load into a valid config or fail with one
ConfigError naming where the problem is. Never another exception, never a config
that passed validation and holds nonsense."""

from __future__ import annotations

import dataclasses
import math

import yaml
from conftest import SMOKE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import ConfigError, config_from_dict
from pipeline.tracking import flatten

BASE = yaml.safe_load(SMOKE.read_text())
LEAVES = sorted(flatten(dataclasses.asdict(config_from_dict(BASE))))
SECTIONS = sorted({k.rsplit(".", 1)[0] for k in LEAVES if "." in k})

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-10**9, 10**9), st.sampled_from([0, -1, 1, 2, 3, 7, 11, 28, 4096]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.5, 1e-12, 1.5, 1e9, math.inf, -math.inf, math.nan]),
    st.text(max_size=6), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _with(key: str, value) -> dict:
    data = yaml.safe_load(SMOKE.read_text())
    node = data
    *path, last = key.split(".")
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value
    return data


def _sane(config) -> None:
    """What any config that passed validation must hold, whatever it was fuzzed with."""
    for name in ("pretrain_gpt", "pretrain_vit", "finetune"):
        section = getattr(config, name)
        model = section.decoder if name == "finetune" else section.model
        assert model.n_layer >= 1 and model.n_head >= 1 and model.d_model % model.n_head == 0
        train = section.train
        assert train.max_steps >= 1 and train.micro_batch_size >= 1 and train.num_workers >= 1
        assert math.isfinite(train.lr) and 0 < train.min_lr <= train.lr
    assert config.tokenize.seq_len >= 2 and config.tokenize.vocab_size >= 257
    assert 0 <= config.pretrain_vit.max_shift < 14


def _loads_or_names_its_section(key: str, value) -> None:
    try:
        config = config_from_dict(_with(key, value))
    except ConfigError as e:
        message = str(e)
        section = key.rsplit(".", 1)[0] if "." in key else key
        assert "\n" not in message and section in message, (key, value, message)
        return
    _sane(config)


# derandomize: CI explores the same 600 cases every run (a new seed: --hypothesis-seed=N)
@settings(max_examples=600, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(LEAVES), value=JUNK)
def test_any_value_under_any_key_loads_or_names_its_section(key, value):
    _loads_or_names_its_section(key, value)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(section=st.sampled_from(SECTIONS), name=st.from_regex(r"[a-z][a-z_]{0,12}", fullmatch=True))
def test_unknown_keys_are_named(section, name):
    if f"{section}.{name}" in LEAVES or any(k.startswith(f"{section}.{name}.") for k in LEAVES):
        return
    try:
        config_from_dict(_with(f"{section}.{name}", 1))
    except ConfigError as e:
        assert f"{section}.{name}" in str(e)
    else:
        raise AssertionError(f"unknown key {section}.{name} was accepted")


EDGES = [None, True, 0, -1, 0.0, -0.5, math.inf, -math.inf, math.nan, "", "a\nb", [], {}, {"": 0}, [1, "x"]]


def test_every_key_against_every_edge_value():
    """The deterministic half of the fuzz: each key with each edge value, so a rare
    combination (lr = .inf passed validation once) cannot hide behind sampling."""
    for key in LEAVES:
        for value in EDGES:
            _loads_or_names_its_section(key, value)
