"""`pipeline plan`: model-state memory against the ZeRO paper's own figures, parameter
counts against real models, and how the plan moves with the cluster's size."""

from __future__ import annotations

import json

import pytest
from conftest import REPO

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.plan import GiB, model_state_bytes, plan

PRESETS = REPO / "configs" / "cluster"


@pytest.mark.parametrize("stage, expected_gb", [(0, 120), (1, 31.4), (2, 16.6), (3, 1.88)])
def test_zero_memory_matches_the_paper(stage, expected_gb):
    # Rajbhandari et al. 2020, figure 1: a 7.5B model on 64 GPUs with mixed-precision Adam.
    per_gpu = sum(model_state_bytes(7_500_000_000, stage, "bf16", 64, offload_optimizer=False).values())
    assert per_gpu / 1e9 == pytest.approx(expected_gb, rel=0.01)


def test_parameter_count_is_the_real_models(tiny_config):
    from pipeline.models.gpt import GPT

    config = tiny_config()
    p = plan(config, 1, 2, 0.4, 80)
    real = GPT(config.tokenize.vocab_size, config.tokenize.seq_len, config.pretrain_gpt.model)
    assert p.params_total == sum(t.numel() for t in real.parameters())
    assert plan(load_config(PRESETS / "gpt-124m.yaml"), 1, 8, 0.4, 80).params_total == pytest.approx(124e6, rel=0.01)


def test_plan_scales_with_the_cluster():
    config = load_config(PRESETS / "gpt-7b.yaml")  # ZeRO-3
    small, large = plan(config, 1, 8, 0.4, 80), plan(config, 8, 8, 0.4, 80)
    assert large.tokens_per_s == pytest.approx(8 * small.tokens_per_s)
    assert large.days_to_compute_optimal == pytest.approx(small.days_to_compute_optimal / 8)
    assert large.optimizer_gib == pytest.approx(small.optimizer_gib / 8) and large.weights_gib < small.weights_gib
    assert large.activations_gib == small.activations_gib and large.checkpoint_gib == small.checkpoint_gib
    assert not small.fits or small.total_gib < 80
    assert large.min_shards == 64 * config.pretrain_gpt.train.loader_workers
    # At ZeRO-0 nothing is sharded: the 7B model does not fit one H100, whatever the cluster.
    replicated = plan(load_config(PRESETS / "gpt-7b.yaml", ["pretrain_gpt.train.zero_stage=0"]), 64, 8, 0.4, 80)
    assert not replicated.fits and replicated.optimizer_gib == pytest.approx(12 * replicated.params_total / GiB)


def test_cli(capsys):
    assert main(["plan", str(PRESETS / "gpt-124m.yaml"), "--nodes", "1", "--gpus-per-node", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["nodes"] == 1 and out["zero_stage"] == 1 and out["fits"]
    assert main(["plan", str(PRESETS / "gpt-124m.yaml"), "--nodes", "0", "--gpus-per-node", "8"]) == 2
    assert "--nodes" in capsys.readouterr().err
