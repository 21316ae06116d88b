"""Small pure functions: grid scoring, FLOPs, the LR schedule, packing, fingerprints."""

import numpy as np
import pytest

from pipeline.compose import ComposeError, compose
from pipeline.config import TrainConfig, load_config
from pipeline.evaluate import unigram_entropy
from pipeline.models.captioner import decode_ids
from pipeline.pictures import confusion
from pipeline.scoring import accuracy_by, score_grids
from pipeline.scoring import by_shape as by_shape_name
from pipeline.preprocess.tokenize import pack_sequences
from pipeline.train.engine import lr_lambda

from conftest import SMOKE


def test_score_grids():
    s = score_grids(["12\n3_", "12\n34", "1"], ["12\n3_", "72\n34", "12\n34"])
    # digits: 3 + 4 + 4 = 11; right: 3 + 3 + 1 = 7. One blank, right. One exact match of three.
    assert s["captioner_per_digit_accuracy"] == pytest.approx(7 / 11)
    assert s["captioner_blank_accuracy"] == 1.0
    assert s["captioner_per_cell_accuracy"] == pytest.approx(8 / 12)
    assert s["captioner_exact_match"] == pytest.approx(1 / 3)
    assert s["captioner_shape_error_rate"] == pytest.approx(1 / 3)  # "1" for a 2x2 grid


@pytest.mark.parametrize("written, right, cells, shape_ok", [
    ("127\n34", 4, 5, False),       # an over-long row: one extra cell
    ("12\n34\n99", 4, 6, False),   # an extra row of two cells
    ("1\n34", 3, 4, False),         # a short row: one missing cell
    ("12", 2, 4, False),            # a missing row
    ("127\n3", 3, 5, False),        # one cell moved to the row above: one extra, one missing
    ("1?\n34", 3, 4, True),         # a stray PAD or BOS where a digit belongs
    ("12?\n34", 4, 5, False),       # ...and after a row's last cell
    ("72\n34", 3, 4, True),
    ("12\n34", 4, 4, True),
])
def test_every_missing_extra_or_stray_cell_is_one_error(written, right, cells, shape_ok):
    s = score_grids([written], ["12\n34"])
    assert s["captioner_per_cell_accuracy"] == pytest.approx(right / cells)
    assert s["captioner_per_digit_accuracy"] == pytest.approx(right / cells)  # no blanks: every cell is a digit or extra
    assert s["captioner_exact_match"] == float(written == "12\n34")
    assert s["captioner_shape_error_rate"] == float(not shape_ok)
    by_shape = accuracy_by([written], ["12\n34"], by_shape_name)
    assert by_shape == {"2x2": pytest.approx(right / cells)}
    counts = confusion([written], ["12\n34"])
    assert counts.sum() == cells and np.trace(counts[:10, :10]) == right
    assert counts[-1].sum() == cells - 4  # the row of cells the writing added


def test_stray_special_tokens_are_written_not_dropped():
    from pipeline.models.captioner import BOS, EOS, PAD, STRAY, encode_text

    ids = encode_text("12\n34")[1:]  # without BOS
    assert decode_ids(ids) == "12\n34"
    assert decode_ids([*ids[:1], PAD, *ids[1:]]) == f"1{STRAY}2\n34"
    assert decode_ids([*ids[:3], BOS, *ids[3:]]) == f"12\n{STRAY}34"
    assert decode_ids([*ids, PAD, PAD]) == "12\n34"  # padding after EOS is not text
    assert decode_ids(ids[:-1]) == "12\n34" and EOS not in ids[:-1]  # cut off before EOS: what was written


def test_compose_draws_each_cell_from_its_class_and_never_reuses_a_digit():
    labels = np.array([3, 1, 3, 0, 1, 3, 0])
    images = (np.arange(len(labels), dtype=np.uint8) + 1)[:, None, None] * np.ones((1, 28, 28), np.uint8)  # digit i is all i+1
    picture, used = compose(images, labels, ["31_", "303"])
    assert picture.shape == (56, 84)
    assert [labels[i] for i in used] == [3, 1, 3, 0, 3] and len(set(used)) == 5  # class order, each digit once
    cells = picture.reshape(2, 28, 3, 28).transpose(0, 2, 1, 3)
    assert [int(c.max()) for c in cells.reshape(6, 28, 28)] == [1, 2, 0, 3, 4, 6]  # blank stays dark
    assert compose(images, labels, ["3"], skip=1)[1] == [2]
    with pytest.raises(ComposeError, match="holds 3 digits of class 3"):
        compose(images, labels, ["3333"])
    with pytest.raises(ComposeError, match="--skip -1"):
        compose(images, labels, ["3"], skip=-1)
    with pytest.raises(ComposeError, match="a grid is a rectangle"):
        compose(images, labels, ["31", "3"])


def test_unigram_entropy():
    assert unigram_entropy(np.array([1, 1, 2, 2])) == pytest.approx(np.log(2))
    assert unigram_entropy(np.array([5, 5, 5])) == 0.0


def _measured_step_flops(model, run_step) -> float:
    """Matmul FLOPs of one forward + backward, counted by torch (attention through the
    math kernel, which the counter sees on CPU; causal attention counted in full, as
    the formula does)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run_step()
    return counter.get_total_flops()


@pytest.mark.parametrize("kind, encoder_lr_scale, stem", [("gpt", None, 0), ("vit", None, 0), ("vit", None, 16),
                                                          ("captioner", 0.1, 0), ("captioner", 0.0, 0), ("captioner", 0.1, 16)])
def test_logged_flops_are_what_torch_counts(kind, encoder_lr_scale, stem):
    """Each task's FLOPs per sample against torch's FlopCounterMode on one training step
    of the smoke models (a frozen captioner encoder runs forward only)."""
    import torch

    from pipeline.geometry import PatchLayout
    from pipeline.kinds import KINDS
    from pipeline.kinds.captioner import CaptionerModelConfig
    from pipeline.kinds.gpt import GPTModelConfig
    from pipeline.kinds.vit import ViTModelConfig
    from pipeline.models.captioner import encode_text
    from pipeline.train.spec import TrainSpec

    cfg = load_config(SMOKE, [f"finetune.encoder_lr_scale={encoder_lr_scale or 0.0}"])
    batch = 4
    vit = ViTModelConfig(PatchLayout(7, 0.0, 1.0), cfg.pretrain_vit.model, stem_channels=stem)
    model_cfg, section = {
        "gpt": (GPTModelConfig(4096, 128, cfg.pretrain_gpt.model), cfg.pretrain_gpt),
        "vit": (vit, cfg.pretrain_vit),
        "captioner": (CaptionerModelConfig(vit, cfg.finetune.decoder), cfg.finetune),
    }[kind]
    spec = TrainSpec(kind=kind, model=model_cfg, section=section, train_data="", deepspeed={}, weights_out="")
    torch.manual_seed(0)
    model = KINDS[kind].build(model_cfg)
    KINDS[kind].param_groups(spec, model)  # freezes a captioner encoder whose learning-rate scale is 0
    first = iter([None])
    if kind == "gpt":
        seq = torch.randint(0, 4096, (batch, 129))
        step = lambda: model(seq[:, :-1], seq[:, 1:])[1].backward()  # noqa: E731
    elif kind == "vit":
        x, y = torch.randn(batch, 16, 49), torch.randint(0, 10, (batch,))
        step = lambda: model(x, y)[1].backward()  # noqa: E731
    else:
        rows, cols, text = 2, 3, "12_\n345"
        first = iter([{"json": {"rows": rows, "cols": cols}, "txt": text}])
        ids = torch.tensor([encode_text(text)] * batch)
        patches = torch.randn(batch, rows * cols * 16, 49)
        shapes = torch.tensor([[rows, cols]] * batch)
        step = lambda: model(patches, shapes, ids[:, :-1], ids[:, 1:])[1].backward()  # noqa: E731
    measured = _measured_step_flops(model, step)
    logged = batch * KINDS[kind].flops_per_sample(spec, model, first)
    assert logged == pytest.approx(measured, rel=0.01)


def test_lr_schedule_warms_up_then_decays_to_min():
    t = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    f = lr_lambda(t)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(10, 110))


def test_pack_sequences():
    out = list(pack_sequences([[1, 2, 3], [4, 5], [6, 7, 8, 9]], eot_id=0, length=4))
    assert out == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]


def test_fingerprints_follow_the_config():
    from pipeline.dag import fingerprint
    from pipeline.stages import STAGES

    def fps(overrides):
        config = load_config(SMOKE, overrides)
        out = {}
        for name, stage in STAGES.items():
            out[name] = fingerprint(stage, config, {d: out[d] for d in stage.deps})
        return out

    base, changed = fps([]), fps(["patchify.patch_size=4"])
    differ = {k for k in base if base[k] != changed[k]}
    assert differ == {"patchify", "pretrain_vit", "finetune", "evaluate"}
    assert fps(["ray.num_cpus=4", "tracking.experiment=x"]) == base  # where it runs is not what it makes


def test_secrets_never_reach_mlflow_params():
    from pipeline.tracking import params_for_mlflow

    params = params_for_mlflow({
        "data": {"text": {"hf_token": "hf_abcdef", "hf_dataset": "org/set"}},
        "storage": {"aws": {"secret_access_key": "wJalrXUtnFEMI", "access_key_id": "AKIAEXAMPLE"}},
        "tracking": {"uri": "http://alice:s3cret@mlflow.internal:5000", "password": ""},
        "tokenize": {"vocab_size": 1024, "tokens": 5},
        "digit_keys": ["000001"],
    })
    assert params["data.text.hf_token"] == "***" and params["data.text.hf_dataset"] == "org/set"
    assert params["storage.aws.secret_access_key"] == "***" and params["storage.aws.access_key_id"] == "***"
    assert params["tracking.uri"] == "http://alice:***@mlflow.internal:5000"
    assert params["tracking.password"] == ""  # nothing to hide, and saying so hides nothing
    assert params["tokenize.vocab_size"] == "1024" and params["tokenize.tokens"] == "5"
    assert params["digit_keys"] == "['000001']"
    assert not any(secret in " ".join(params.values()) for secret in ("hf_abcdef", "wJalrXUtnFEMI", "s3cret", "AKIAEXAMPLE"))


def test_printed_and_saved_config_hides_secrets():
    import yaml

    from pipeline.tracking import config_yaml, redacted

    config = load_config(SMOKE, ["tracking.uri=http://alice:s3cret@mlflow.internal:5000"])
    text = config_yaml(config)
    assert "s3cret" not in text and yaml.safe_load(text)["tracking"]["uri"] == "http://alice:***@mlflow.internal:5000"
    assert yaml.safe_load(text)["pretrain_gpt"]["train"]["zero_stage"] == config.pretrain_gpt.train.zero_stage
    nested = redacted({"sources": [{"name": "a", "api_key": "k-123"}], "hf_token": "hf_x", "tokens": 5})
    assert nested == {"sources": [{"name": "a", "api_key": "***"}], "hf_token": "***", "tokens": 5}


@pytest.mark.parametrize("key", ["hf_token", "hfToken", "HF_TOKEN", "apiKey", "x-api-key", "aws_secret_access_key",
                                 "AWS_SECRET_ACCESS_KEY", "db.password", "dbPassword", "gcpCredentials", "auth.secret"])
def test_a_key_that_names_a_secret_is_redacted_whatever_its_case(key):
    from pipeline.tracking import params_for_mlflow, redacted

    assert redacted({key: "v-123"}) == {key: "***"}
    assert "v-123" not in str(params_for_mlflow({"outer": {key: "v-123"}}))


@pytest.mark.parametrize("key", ["tokens", "tokenize", "tokenizer", "max_tokens", "digit_keys", "keyed_shift", "vocab_size"])
def test_keys_that_only_look_like_secrets_keep_their_values(key):
    from pipeline.tracking import redacted

    assert redacted({key: 7}) == {key: 7}


def test_passwords_in_urls_and_secrets_in_lists_of_dicts_never_reach_mlflow_params():
    from pipeline.tracking import params_for_mlflow, redacted

    assert redacted("http://alice:pa/ss@w0rd@mlflow.internal:5000/x") == "http://alice:***@mlflow.internal:5000/x"
    assert redacted("postgresql://:hunter2@db:5432/mlflow") == "postgresql://:***@db:5432/mlflow"
    assert redacted("http://mlflow.internal:5000/api") == "http://mlflow.internal:5000/api"
    params = params_for_mlflow({"sources": [{"name": "hub", "hfToken": "hf_abc"}, {"uri": "s3://u:k3y/x@bucket/p"}],
                                "credentials": {"user": "u", "pw": "plain"}})
    text = str(params)
    assert "hf_abc" not in text and "k3y" not in text and "plain" not in text
    assert params["credentials"] == "***" and "hub" in params["sources"]


def test_progress_off_a_terminal_is_plain_periodic_lines(capsys):
    from pipeline.progress import progress

    with progress(5, "shard grids", "shard", every=3600) as bar:  # capsys: stderr is not a terminal
        for _ in range(5):
            bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("shard grids: 5/5 shards") and "\r" not in lines[0]
    with progress(3, "x", "run", every=0) as bar:
        for _ in range(3):
            bar.update(1)
    assert [line.split(",")[0] for line in capsys.readouterr().err.splitlines()] == ["x: 1/3 runs", "x: 2/3 runs", "x: 3/3 runs"]


def test_every_command_and_option_is_explained_in_help():
    import argparse

    from pipeline.cli import build_parser

    unexplained = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    if not sub.description:
                        unexplained.append(f"{path} {name}")
                    walk(sub, f"{path} {name}")
            elif not action.help:
                unexplained.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "pipeline")
    assert not unexplained, unexplained
