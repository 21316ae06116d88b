"""Small pure functions: grid scoring, FLOPs, the LR schedule, packing, fingerprints."""

import numpy as np
import pytest

from pipeline.config import TrainConfig, load_config
from pipeline.evaluate import score_grids, unigram_entropy
from pipeline.models import flops
from pipeline.preprocess.tokenize import pack_sequences
from pipeline.train.engine import lr_lambda

from conftest import SMOKE


def test_score_grids():
    s = score_grids(["12\n3_", "12\n34", "1"], ["12\n3_", "72\n34", "12\n34"])
    # digits: 3 + 4 + 4 = 11; right: 3 + 3 + 1 = 7. One blank, right. One exact match of three.
    assert s["captioner_per_digit_accuracy"] == pytest.approx(7 / 11)
    assert s["captioner_blank_accuracy"] == 1.0
    assert s["captioner_exact_match"] == pytest.approx(1 / 3)


def test_unigram_entropy():
    assert unigram_entropy(np.array([1, 1, 2, 2])) == pytest.approx(np.log(2))
    assert unigram_entropy(np.array([5, 5, 5])) == 0.0


def test_flops_formula():
    assert flops.flops_per_token(1000, 2, 64, 32) == 6 * 1000 + 12 * 2 * 64 * 32
    assert flops.vit_flops_per_image(1000, 2, 16, 32) == 17 * (6 * 1000 + 12 * 2 * 17 * 32)


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
