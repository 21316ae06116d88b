"""`pipeline plan`: model-state memory and communication against the ZeRO paper's own
figures, parameter counts against real models, how the plan moves with the cluster's
size, and the presets' communication ceilings."""

from __future__ import annotations

import json

import pytest
from conftest import REPO

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.plan import GiB, Hardware, comm_bytes_per_step, model_state_bytes, plan

PRESETS = REPO / "configs" / "cluster"


@pytest.mark.parametrize("stage, expected_gb", [(0, 120), (1, 31.4), (2, 16.6), (3, 1.88)])
def test_zero_memory_matches_the_paper(stage, expected_gb):
    # Rajbhandari et al. 2020, figure 1: a 7.5B model on 64 GPUs with mixed-precision Adam.
    per_gpu = sum(model_state_bytes(7_500_000_000, stage, "bf16", 64, offload_optimizer=False).values())
    assert per_gpu / 1e9 == pytest.approx(expected_gb, rel=0.01)


@pytest.mark.parametrize("stage, multiple", [(0, 2), (1, 2), (2, 2), (3, 3)])
def test_zero_communication_matches_the_paper(stage, multiple):
    # Rajbhandari et al. 2020, section 7: per step, data parallelism and stages 1-2 move 2Ψ
    # elements through each GPU, stage 3 3Ψ (one micro-batch a step, a large ring).
    psi = 7_500_000_000
    assert comm_bytes_per_step(psi, stage, 1, 4096, "bf16") / 2 == pytest.approx(multiple * psi, rel=1e-3)
    assert comm_bytes_per_step(psi, stage, 1, 1, "bf16") == 0  # one GPU talks to nobody


def test_stage_3_gathers_again_for_every_micro_batch():
    psi, world = 1_000_000_000, 64
    one, four = (comm_bytes_per_step(psi, 3, a, world, "bf16") for a in (1, 4))
    assert four == pytest.approx(4 * one)
    assert comm_bytes_per_step(psi, 1, 4, world, "bf16") == comm_bytes_per_step(psi, 1, 1, world, "bf16")


def test_parameter_count_is_the_real_models(tiny_config):
    from pipeline.models.gpt import GPT

    config = tiny_config()
    p = plan(config, Hardware(nodes=1, gpus_per_node=2), overlap=False)
    real = GPT(config.tokenize.vocab_size, config.tokenize.seq_len, config.pretrain_gpt.model)
    assert p.params_total == sum(t.numel() for t in real.parameters())
    assert plan(load_config(PRESETS / "gpt-124m.yaml"), Hardware(nodes=1), False).params_total == pytest.approx(124e6, rel=0.01)


def test_plan_scales_with_the_cluster():
    config = load_config(PRESETS / "gpt-7b.yaml")
    small, large = plan(config, Hardware(nodes=8), True), plan(config, Hardware(nodes=64), True)
    assert large.tokens_per_s == pytest.approx(8 * small.tokens_per_s, rel=0.01)  # compute-bound: linear
    assert large.usd_to_compute_optimal == pytest.approx(small.usd_to_compute_optimal, rel=0.01)
    assert large.optimizer_gib == pytest.approx(small.optimizer_gib / 8)
    assert large.activations_gib == small.activations_gib and large.checkpoint_gib == small.checkpoint_gib
    assert large.min_shards == 512 * config.pretrain_gpt.train.loader_workers
    # At ZeRO-0 nothing is sharded: the 7B model does not fit one H100, whatever the cluster.
    replicated = plan(load_config(PRESETS / "gpt-7b.yaml", ["pretrain_gpt.train.zero_stage=0"]), Hardware(nodes=64), True)
    assert not replicated.fits and replicated.optimizer_gib == pytest.approx(12 * replicated.params_total / GiB)
    assert replicated.better and "zero_stage 0 ->" in replicated.better["change"]


def test_the_old_7b_layout_was_bound_by_communication_and_the_plan_says_what_lifts_it():
    old = load_config(PRESETS / "gpt-7b.yaml", ["pretrain_gpt.train.zero_stage=3"])
    for overlap, most in ((False, 0.16), (True, 0.25)):
        p = plan(old, Hardware(nodes=64, mfu=0.4), overlap)
        assert p.comm_s > p.compute_s and p.mfu_ceiling < most
        assert p.better and p.better["mfu_ceiling"] >= 0.39 and p.better["total_gib"] <= 80
    # Inside one node NVLink carries it: the same layout is far less bound.
    assert plan(old, Hardware(nodes=1, mfu=0.4), False).mfu_ceiling > 2 * plan(old, Hardware(nodes=64, mfu=0.4), False).mfu_ceiling


@pytest.mark.parametrize("preset", ["gpt-1.3b", "gpt-7b"])
def test_the_large_presets_clear_40_percent_as_configured(preset, capsys):
    """At the preset's own world size, stage and the overlap its ZeRO config sets."""
    assert main(["plan", str(PRESETS / f"{preset}.yaml"), "--json", "--mfu", "0.4"]) == 0
    out = json.loads(capsys.readouterr().out)
    config = load_config(PRESETS / f"{preset}.yaml")
    assert out["nodes"] * out["gpus_per_node"] == config.pretrain_gpt.train.num_workers
    assert out["fits"] and out["mfu_ceiling"] >= 0.399 and out["better"] is None


def test_cli(capsys):
    runs = []
    for price in ("2", "4"):
        assert main(["plan", str(PRESETS / "gpt-124m.yaml"), "--nodes", "1", "--json", "--usd-per-gpu-hour", price]) == 0
        runs.append(json.loads(capsys.readouterr().out))
    assert runs[0]["nodes"] == 1 and runs[0]["zero_stage"] == 1 and runs[0]["fits"]
    assert runs[1]["usd_to_compute_optimal"] == pytest.approx(2 * runs[0]["usd_to_compute_optimal"])
    assert runs[1]["days_to_compute_optimal"] == runs[0]["days_to_compute_optimal"]
    assert main(["plan", str(PRESETS / "gpt-124m.yaml"), "--nodes", "0"]) == 2
    assert "--nodes" in capsys.readouterr().err
    assert main(["plan", str(PRESETS / "gpt-124m.yaml"), "--gpus-per-node", "3"]) == 2
    assert "num_workers=8 is not a whole number of 3-GPU nodes" in capsys.readouterr().err
