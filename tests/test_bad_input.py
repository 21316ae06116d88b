"""Bad input at the command line: each case is one clear line on stderr that names
the problem, a non-zero exit, no traceback (that takes --debug), nothing written.
Together with the fuzz of the config loader (test_config_fuzz.py) this covers the
unknown keys, wrong types, bad sizes, missing and unreadable files and impossible
workdirs a user types."""

from __future__ import annotations

import pytest
from conftest import REPO, SMOKE

from pipeline.cli import main

DIGITS = REPO / "configs" / "digits.yaml"
TINY_GPT = ('{"format": 1, "kind": "gpt", "config": {"vocab_size": 16, "seq_len": 4, '
            '"shape": {"n_layer": 1, "n_head": 1, "d_model": 8, "dropout": 0.0}}}')
CASES = [
    # (name, extra files {name: text}, argv with {tmp} for the test's directory, what the line must say)
    ("unknown key in the file", {"c.yaml": "pretrain_gpt:\n  model: {n_layers: 2}\n"}, ["run", "{tmp}/c.yaml"], "pretrain_gpt.model.n_layers"),
    ("a typo gets a suggestion", {}, ["run", str(SMOKE), "pretrain_gpt.train.max_step=3"], "did you mean 'max_steps'"),
    ("wrong type", {}, ["run", str(SMOKE), "pretrain_gpt.train.lr=fast"], "pretrain_gpt.train.lr"),
    ("bool for an int", {}, ["run", str(SMOKE), "tokenize.vocab_size=true"], "tokenize.vocab_size"),
    ("negative size", {}, ["run", str(SMOKE), "pretrain_gpt.model.n_layer=-1"], "pretrain_gpt.model.n_layer"),
    ("zero size", {}, ["run", str(SMOKE), "tokenize.seq_len=0"], "tokenize.seq_len"),
    ("zero batch", {}, ["run", str(SMOKE), "finetune.train.micro_batch_size=0"], "finetune.train.micro_batch_size"),
    ("heads do not divide the width", {}, ["run", str(SMOKE), "pretrain_vit.model.n_head=5"], "pretrain_vit.model"),
    ("negative shift", {}, ["run", str(SMOKE), "pretrain_vit.max_shift=-1"], "pretrain_vit.max_shift"),
    ("grid too large", {}, ["run", str(SMOKE), "data.grids.rows=11"], "data.grids.rows"),
    ("fewest rows above the most", {}, ["run", str(SMOKE), "data.grids.min_rows=5", "data.grids.rows=3"], "data.grids.min_rows"),
    ("evaluation grids that train", {}, ["run", str(SMOKE), "data.eval_grids=[{name: a, train_count: 5}]"], "data.eval_grids[0].train_count must be 0"),
    ("evaluation grids named grids", {}, ["run", str(SMOKE), "data.eval_grids=[{name: grids, train_count: 0}]"], "data.eval_grids[0].name"),
    ("override into a list the config lacks", {}, ["run", str(SMOKE), "data.eval_grids.0.name=x"], "data.eval_grids must be a list"),
    ("override past a list's end", {}, ["run", str(DIGITS), "data.eval_grids.3.name=x"], "'3' is not an index of eval_grids (it has 1 entries)"),
    ("text decoder that is not there", {}, ["run", str(DIGITS), "finetune.init_decoder={tmp}/none.safetensors"], "finetune.init_decoder: no file"),
    ("unknown target stage", {}, ["run", str(SMOKE), "targets=[evaluat]"], "targets: unknown stage 'evaluat'"),
    ("rotation out of range", {}, ["run", str(SMOKE), "finetune.augment.rotate=90"], "finetune.augment.rotate"),
    ("zero stage 4", {}, ["run", str(SMOKE), "pretrain_gpt.train.zero_stage=4"], "pretrain_gpt.train.zero_stage"),
    ("min_lr above lr", {}, ["run", str(SMOKE), "pretrain_gpt.train.min_lr=1.0"], "pretrain_gpt.train.min_lr"),
    ("unknown source", {}, ["run", str(SMOKE), "data.text.source=web"], "data.text.source"),
    ("hf source without a dataset", {}, ["run", str(SMOKE), "data.text.source=hf"], "data.text.hf_dataset"),
    ("idx source without its files", {}, ["run", str(SMOKE), "data.mnist.source=idx", "data.mnist.labels=x"], "data.mnist.images is required"),
    ("negative training digits", {}, ["run", str(SMOKE), "data.mnist.train_digits=-3"], "data.mnist.train_digits must be >= 0"),
    ("override without =", {}, ["run", str(SMOKE), "--workdir", "{tmp}/w", "pretrain_gpt.train.max_steps"], "unrecognized argument"),
    ("override of a value as a section", {}, ["run", str(SMOKE), "tokenize.seq_len.x=1"], "seq_len"),
    ("missing config file", {}, ["run", "{tmp}/nope.yaml"], "nope.yaml"),
    ("config path is a directory", {}, ["run", "{tmp}"], "{tmp}"),
    ("config is not YAML", {"c.yaml": "a: [1, 2\n"}, ["run", "{tmp}/c.yaml"], "c.yaml"),
    ("config is a list", {"c.yaml": "- 1\n- 2\n"}, ["run", "{tmp}/c.yaml"], "c.yaml"),
    ("workdir cannot be created", {}, ["run", str(SMOKE), "--workdir", "/proc/thousandwords/w"], "workdir /proc/thousandwords/w cannot be created"),
    ("bad --steps", {}, ["batches", str(SMOKE), "--stage", "pretrain_gpt", "--steps", "5"], "--steps must look like A:B"),
    ("steps from zero", {}, ["batches", str(SMOKE), "--stage", "pretrain_gpt", "--steps", "0:3"], "steps start at 1"),
    ("no such training stage", {}, ["batches", str(SMOKE), "--stage", "shard", "--steps", "1:3"], "--stage must be one of"),
    ("points file missing", {}, ["scaling", "fit", "--points", "{tmp}/p.csv"], "p.csv"),
    ("points without a loss column", {"p.csv": "params,tokens\n1,2\n"}, ["scaling", "fit", "--points", "{tmp}/p.csv"], "no column loss"),
    ("points that are not numbers", {"p.csv": "params,tokens,loss\n1,2,x\n"}, ["scaling", "fit", "--points", "{tmp}/p.csv"], "p.csv:2"),
    ("too few points", {"p.csv": "params,tokens,loss\n1e6,1e9,3\n2e6,1e9,2.9\n"}, ["scaling", "fit", "--points", "{tmp}/p.csv"], "at least 5"),
    ("sweep with one size", {"s.yaml": f"name: s\nbase: {SMOKE}\nexperiment: e\nsizes: [{{}}]\ntokens: [1000]\n"},
     ["scaling", "sweep", "{tmp}/s.yaml"], "at least 2 model sizes"),
    ("export of a missing checkpoint", {}, ["export", "--checkpoint", "{tmp}/nope", "--out", "{tmp}/o"], "{tmp}/nope: no such checkpoint directory"),
    ("export of a folder of no stage", {}, ["export", "--checkpoint", "{tmp}", "--out", "{tmp}/o"], "no model_config.json here or in the training stage"),
    ("export of a stage without DeepSpeed state", {"model_config.json": TINY_GPT}, ["export", "--checkpoint", "{tmp}", "--out", "{tmp}/o"],
     "{tmp}: no DeepSpeed checkpoint in it"),
    ("export of a stage an older version trained", {"model_config.json": '{"kind": "gpt", "model_args": {}}'},
     ["export", "--checkpoint", "{tmp}", "--out", "{tmp}/o"], "model config format None, this version reads 1"),
    ("export over a folder with files", {"o/keep.txt": "mine"}, ["export", "--checkpoint", "{tmp}", "--out", "{tmp}/o"],
     "--out {tmp}/o exists and is not an empty directory"),
    ("export to an unknown format", {}, ["export", "--checkpoint", "{tmp}", "--format", "onnx", "--out", "{tmp}/o"], "invalid choice: 'onnx'"),
    ("compose of a row that is not digits", {}, ["compose", "--digits", "{tmp}", "--out", "{tmp}/g.png", "12", "3x"], "row 2 '3x': 'x' is not a digit"),
    ("compose of eleven columns", {}, ["compose", "--digits", "{tmp}", "--out", "{tmp}/g.png", "0" * 11], "row 1 '00000000000' has 11 cells"),
    ("compose over an existing image", {"g.png": "x"}, ["compose", "--digits", "{tmp}", "--out", "{tmp}/g.png", "12"], "{tmp}/g.png exists"),
    ("report of a workdir that has no runs", {}, ["report", "--workdir", "{tmp}"], "report: no tracking store at {tmp}/mlflow.db"),
    ("negative prediction point", {"p.csv": "params,tokens,loss\n" + "".join(f"{n},{d},{3 + 1 / n + 1 / d}\n" for n in (1e6, 2e6, 4e6) for d in (1e9, 2e9))},
     ["scaling", "predict", "--points", "{tmp}/p.csv", "--params", "-5", "--tokens", "1e9", "--bootstrap", "0"], "must be positive"),
]


@pytest.mark.parametrize("name, files, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(name, files, argv, expected, tmp_path, capsys):
    for file, text in files.items():
        (tmp_path / file).parent.mkdir(exist_ok=True)
        (tmp_path / file).write_text(text)
    before = set(tmp_path.rglob("*"))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    assert code not in (0, None)
    err = capsys.readouterr().err.strip().splitlines()
    if "unrecognized" in expected or "invalid choice" in expected:  # argparse prints its usage line first
        err = err[-1:]
    assert len(err) == 1, err
    assert expected.replace("{tmp}", str(tmp_path)) in err[0] and "Traceback" not in err[0]
    assert set(tmp_path.rglob("*")) == before  # nothing written, not even a workdir


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception):
        main(["--debug", "run", str(tmp_path / "nope.yaml")])
