"""Shared fixtures: a real local Ray cluster and tiny pipeline workdirs.

The tiny config is the smoke config scaled down so that every stage runs in
seconds. Two session workdirs, each shared by the tests that use it (upstream
stages are cache hits there, whichever test ran them first):
- `run_tiny`: real Ray and a real MLflow store, for what trains, evaluates, or
  checks Ray or MLflow;
- `run_local`: the data stages in this process (`LocalFanOut`) with an
  `InMemoryTracker`, for tests of what those stages write.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from pathlib import Path

import pytest

# Hugging Face: nothing from the hub, and remote code cached in a throwaway place.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="tw-hf-"))

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
VENV_BIN = Path(sys.executable).parent

TINY_OVERRIDES = [
    # the flagship's grids in miniature (configs/digits.yaml): ragged training grids with
    # blanks, and fixed 2x2 grids without blanks, evaluated only
    "data.grids.train_count=256",
    "data.grids.test_count=64",
    "data.grids.samples_per_shard=128",
    "data.grids.min_rows=1",
    "data.grids.min_cols=1",
    "data.grids.rows=3",
    "data.grids.cols=3",
    "data.grids.blank_prob=0.2",
    "data.eval_grids=[{name: 2x2, rows: 2, cols: 2, blank_prob: 0.0, train_count: 0, val_count: 32, test_count: 64}]",
    "data.text.max_bytes=400000",
    "data.text.docs_per_shard=40",
    "tokenize.vocab_size=1024",
    "tokenize.seq_len=64",
    "pretrain_gpt.train.max_steps=30",
    "pretrain_gpt.train.warmup_steps=3",
    "pretrain_gpt.train.log_every=5",
    # smoke.yaml trains the ViT and the captioner under ZeRO-1; the tiny ViT stays on ZeRO-2 so
    # that the export and stage tests still read a ZeRO-2 checkpoint
    "pretrain_vit.train.zero_stage=2",
    "pretrain_vit.train.max_steps=40",
    "pretrain_vit.train.warmup_steps=4",
    "pretrain_vit.train.log_every=5",
    "finetune.train.max_steps=30",
    "finetune.train.warmup_steps=3",
    "finetune.train.log_every=5",
    "evaluate.max_val_sequences=200",
]


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from pipeline.runner import start_local_ray

    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    start_local_ray(2, _temp_dir=f"/tmp/tw-ray-{os.getpid()}", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_config():
    from pipeline.config import load_config

    return lambda *extra: load_config(SMOKE, TINY_OVERRIDES + list(extra))


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def run_local(tiny_config, tmp_path_factory):
    """Run data stages of the tiny pipeline in this process, without Ray or MLflow,
    in a workdir of their own; returns the summary."""
    from pipeline.fanout import LocalFanOut
    from pipeline.runner import run_pipeline
    from pipeline.tracking import InMemoryTracker

    workdir = str(tmp_path_factory.mktemp("tiny-local"))

    def run(targets, *extra):
        return run_pipeline(tiny_config(*extra), targets, workdir, tracker=InMemoryTracker(), fan_out=LocalFanOut())

    run.workdir = workdir
    return run


@pytest.fixture(scope="session")
def run_tiny(ray_cluster, tiny_config, tiny_workdir):
    """Run stages of the tiny pipeline in the shared workdir; returns the summary."""
    from pipeline.runner import run_pipeline

    def run(targets, *extra):
        return run_pipeline(tiny_config(*extra), targets, tiny_workdir)

    return run


def stage_fingerprint(stage: str, path: str) -> str:
    """The fingerprint a stage's output `path` lies under (`<workdir>/<stage>/<fingerprint>/...`)."""
    return path.split(f"/{stage}/")[1].split("/")[0]


def small_vit_spec(train_data: str, train, weights_out: str, **extra):
    """A TrainSpec of a small ViT (2 layers of 64) on `train_data` with one-pixel shifts,
    for tests that drive `train.launch.fit` directly."""
    from pipeline.config import PretrainViTConfig, TransformerConfig
    from pipeline.geometry import PatchLayout
    from pipeline.kinds.vit import ViTModelConfig
    from pipeline.train.engine import load_zero_config
    from pipeline.train.spec import TrainSpec

    shape = TransformerConfig(n_layer=2, n_head=4, d_model=64)
    return TrainSpec(kind="vit", model=ViTModelConfig(PatchLayout(), shape), train_data=train_data,
                     section=PretrainViTConfig(model=shape, train=train, max_shift=1),
                     deepspeed=load_zero_config(train.zero_stage), weights_out=weights_out, **extra)


def resume_train(tiny_config, zero_stage: int, **changes):
    """The small ViT's training in the resume and fault tests: 12 steps of 2 workers x 64,
    checkpoints at steps 6 and 12."""
    return dataclasses.replace(tiny_config().pretrain_vit.train, zero_stage=zero_stage, max_steps=12, warmup_steps=2,
                               log_every=4, checkpoint_every=6, loader_workers=2, **changes)


@pytest.fixture(scope="session")
def zero2_reference(run_tiny, tiny_config, tmp_path_factory):
    """One uninterrupted ZeRO-2 run of `resume_train`, trained once for the tests whose
    resumed, elastic or killed runs must end where it ends: (fit's result, weights path)."""
    from pipeline.train.launch import fit

    data = run_tiny(["patchify"])["stages"]["patchify"]["outputs"]["mnist_train"]
    root = tmp_path_factory.mktemp("zero2-reference")
    weights = root / "full.safetensors"
    return fit(small_vit_spec(data, resume_train(tiny_config, 2), str(weights)), str(root / "full")), weights
