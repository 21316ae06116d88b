from pathlib import Path

import pytest

from pipeline.config import ConfigError, config_from_dict, load_config

from conftest import SMOKE


def test_smoke_config_loads_with_types():
    config = load_config(SMOKE)
    assert config.pretrain_gpt.train.zero_stage == 3
    assert isinstance(config.pretrain_vit.train.lr, float)
    assert config.data.grids.rows == 2


@pytest.mark.parametrize(
    "data, key",
    [
        ({"pretrain_gpt": {"model": {"n_layers": 2}}}, "pretrain_gpt.model.n_layers"),
        ({"pretrain_gpt": {"train": {"lr": "fast"}}}, "pretrain_gpt.train.lr"),
        ({"pretrain_vit": {"train": {"zero_stage": 4}}}, "pretrain_vit.train.zero_stage"),
        ({"data": {"grids": {"rows": 11}}}, "data.grids.rows"),
        ({"data": {"text": {"source": "web"}}}, "data.text.source"),
        ({"data": {"text": {"source": "hf"}}}, "data.text.hf_dataset"),
        ({"finetune": {"decoder": {"d_model": 100, "n_head": 3}}}, "finetune.decoder.d_model"),
        ({"tokenize": {"vocab_size": True}}, "tokenize.vocab_size"),
        ({"patchify": {"patch_size": 5}}, "patchify.patch_size"),
        ({"pretrain_gpt": {"train": {"min_lr": 1.0, "lr": 0.1}}}, "pretrain_gpt.train.min_lr"),
        ({"pretrain_gpt": 3}, "pretrain_gpt"),
        ({"data": {"grids": {"train_count": 0}}}, "data.grids.train_count"),
        ({"pretrain_vit": {"model": {"n_head": 0}}}, "pretrain_vit.model.n_head"),
        ({"finetune": {"head_shift": 4, "head_logits": True}}, "finetune.head_shift"),
        ({"finetune": {"head_shift": 1}}, "finetune.head_logits"),
        ({"pretrain_vit": {"pool": "max"}}, "pretrain_vit.pool"),
    ],
)
def test_bad_config_names_the_key(data, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert key in str(err.value)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        config_from_dict({"pretrain_gpt": {"train": {"max_step": 3}}})


def test_overrides_are_typed_and_validated():
    config = load_config(SMOKE, ["pretrain_gpt.train.max_steps=70", "data.text.paths=[a.txt, b.txt]"])
    assert config.pretrain_gpt.train.max_steps == 70
    assert config.data.text.paths == ["a.txt", "b.txt"]
    assert load_config(SMOKE, ["finetune.train.lr=1e-2"]).finetune.train.lr == 1e-2  # YAML 1.1 reads it as a string
    with pytest.raises(ConfigError, match="finetune.train.lr must be a number, got 'fast'"):
        load_config(SMOKE, ["finetune.train.lr=fast"])
    with pytest.raises(ConfigError, match="pretrain_gpt.train.max_steps"):
        load_config(SMOKE, ["pretrain_gpt.train.max_steps=seven"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(SMOKE, ["pretrain_gpt.train.max_steps"])


def test_cli_rejects_bad_config_before_any_work(tmp_path, capsys):
    from pipeline.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain_vit:\n  train:\n    zero_stag: 3\n")
    assert main(["run", str(bad), "--workdir", str(tmp_path / "w")]) == 2
    assert "pretrain_vit.train.zero_stag" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


RUN_CONFIGS = [p for p in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml") if p.parent.name != "scaling"]


@pytest.mark.parametrize("path", sorted(RUN_CONFIGS), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    # YAML 1.1 reads `989.0e12` as a string: a preset nobody loaded once carried that.
    config = load_config(path)
    assert config.pretrain_gpt.train.peak_flops_per_worker > 1e9


@pytest.mark.parametrize("name", ["gpt-cpu.yaml", "vit-cpu.yaml"])
def test_sweep_files_load(name):
    from pipeline.scaling.sweep import load_sweep, point_config

    sweep = load_sweep(Path(__file__).resolve().parents[1] / "configs" / "scaling" / name)
    assert len(sweep.sizes) >= 4 and len(sweep.budgets) >= 3
    base = load_config(sweep.base, sweep.overrides)  # its base and overrides make a valid run config
    params = [12 * s.n_layer * s.d_model ** 2 for s in sweep.sizes]
    assert max(params) >= 10 * min(params)
    narrow, wide = (getattr(point_config(base, sweep, s, sweep.budgets[0]), sweep.stage).train for s in (sweep.sizes[0], sweep.sizes[-1]))
    assert narrow.lr > wide.lr and narrow.min_lr > wide.min_lr  # lr ∝ 1/width across the sweep


def test_bad_sweep_files_name_the_key(tmp_path):
    from pipeline.scaling.sweep import load_sweep

    head = "name: x\nbase: configs/smoke.yaml\nexperiment: e\n"
    for body, key in [("sizes: [{n_layer: 1, n_head: 3, d_model: 32}, {}]\ntokens: [1000]\n", r"sizes\[0\].d_model"),
                      ("sizes: [{}, {}]\nimages: [1000]\n", "images is not a budget of a pretrain_gpt sweep"),
                      ("stage: pretrain_vit\nsizes: [{}, {}]\n", "images must list positive budgets"),
                      ("sizes: [{}, {}]\ntokens: [1000]\nlr_reference_width: 0\n", "lr_reference_width")]:
        bad = tmp_path / "sweep.yaml"
        bad.write_text(head + body)
        with pytest.raises(ConfigError, match=key):
            load_sweep(bad)


def test_run_time_settings_leave_the_stage_fingerprint_alone():
    """Compiling, recomputing or more loader processes reuse (and resume) the same stage;
    a setting that changes the math makes a new one."""
    from pipeline.dag import fingerprint
    from pipeline.stages import STAGES

    stage = STAGES["pretrain_gpt"]

    def of(*overrides):
        return fingerprint(stage, load_config(SMOKE, list(overrides)), {"tokenize": "t"})

    plain = of()
    assert of("pretrain_gpt.train.compile=true", "pretrain_gpt.train.activation_checkpointing=selective",
              "pretrain_gpt.train.loader_workers=3", "pretrain_gpt.train.peak_flops_per_worker=1e15") == plain
    assert of("pretrain_gpt.train.lr=2e-3") != plain
    # the same global batch on fewer workers (a cluster that lost a node) is the same stage;
    # another global batch is another model
    smoke = load_config(SMOKE).pretrain_gpt.train
    assert smoke.num_workers == 2 and smoke.grad_accum == 1
    assert of("pretrain_gpt.train.num_workers=1", "pretrain_gpt.train.grad_accum=2", "pretrain_gpt.train.log_every=7") == plain
    assert of("pretrain_gpt.train.num_workers=1", f"pretrain_gpt.train.micro_batch_size={2 * smoke.micro_batch_size}") == plain
    assert of("pretrain_gpt.train.num_workers=1") != plain
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        of("pretrain_gpt.train.activation_checkpointing=some")
