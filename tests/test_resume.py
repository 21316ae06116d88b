"""A run resumed from a mid-way checkpoint ends with exactly the weights of an
uninterrupted one: model, optimizer, scheduler and data position restored (the
shifts come from each sample's key and epoch, so they need no saved RNG)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import resume_train, small_vit_spec

from pipeline.train import checkpoint as ckpt
from pipeline.train.data import ResumeMismatchError
from pipeline.train.launch import fit


@pytest.mark.parametrize("zero_stage", [3, *(pytest.param(s, marks=pytest.mark.slow) for s in (0, 1, 2))])
def test_resumed_run_equals_uninterrupted(run_tiny, tiny_config, tmp_path, zero_stage, request):
    summary = run_tiny(["patchify"])
    train = resume_train(tiny_config, zero_stage)

    def spec(name, resume_from=None, fail_at_step=0, max_failures=0, train=train):
        return small_vit_spec(summary["stages"]["patchify"]["outputs"]["mnist_train"],
                              dataclasses.replace(train, max_failures=max_failures), str(tmp_path / f"{name}.safetensors"),
                              resume_from=resume_from, fail_at_step=fail_at_step)

    if zero_stage == 2:  # trained once, shared with the elastic and killed-worker tests
        full, full_weights = request.getfixturevalue("zero2_reference")
    else:
        full, full_weights = fit(spec("full"), str(tmp_path / "full")), tmp_path / "full.safetensors"
    assert sorted(full["checkpoints_by_step"]) == [6, 12]
    state = ckpt.read_data_state(full["checkpoints_by_step"][6])
    assert state["samples_consumed"] == 6 * 128 and state["epoch"] == 0  # mid-epoch: 768 of 3600 samples
    resumed = fit(spec("resumed", resume_from=full["checkpoints_by_step"][6]), str(tmp_path / "resumed"))
    # It really started at step 6: a run from scratch would also have saved step 6.
    assert sorted(resumed["checkpoints_by_step"]) == [12]

    _assert_same_weights(full_weights, tmp_path / "resumed.safetensors")
    if zero_stage == 1:  # ZeRO-2's weights to the byte: why the configs' ViTs train on the faster ZeRO-1
        _assert_same_weights(request.getfixturevalue("zero2_reference")[1], full_weights)
    # Every rank's ZeRO shard of the last checkpoint, consolidated (`pipeline export`), is
    # the final model that rank 0 gathered and wrote.
    final = load_file(full_weights)
    consolidated = ckpt.consolidated_state(full["checkpoints_by_step"][12])
    assert all(torch.equal(consolidated[name], final[name]) for name in final) and final

    assert full["metrics"]["started_at"] == 0 and resumed["metrics"]["started_at"] == 6
    if zero_stage == 3:
        # The drill fails the last rank at step 9; with one restart allowed, Ray starts a new
        # worker group, which resumes from the step-6 checkpoint through
        # ray.train.get_checkpoint() (the attempt that finished began there) and ends identically.
        # (A failure with no restart left reaching the caller: tests/test_bad_shards.py.)
        restarted = fit(spec("restarted", fail_at_step=9, max_failures=1), str(tmp_path / "restarted"))
        assert sorted(restarted["checkpoints_by_step"]) == [6, 12]
        assert restarted["metrics"]["started_at"] == 6
        _assert_same_weights(full_weights, tmp_path / "restarted.safetensors")
        # Elastic: the same run dir at 1 worker x grad_accum 2 goes through DeepSpeed's ZeRO-3
        # universal load (its shared step tensor made this drift ~1e-3 before load_engine fixed it).
        one_worker = dataclasses.replace(train, num_workers=1, grad_accum=2)
        elastic = fit(spec("elastic", train=one_worker), str(_died_after_step_6(full, tmp_path)))
        assert elastic["metrics"]["started_at"] == 6
        assert elastic["metrics"]["loss"] == pytest.approx(full["metrics"]["loss"], rel=1e-5)


def test_elastic_resume_and_refused_resumes(run_tiny, tiny_config, tmp_path, zero2_reference):
    """Stopped at 2 workers, run again at 1 worker with grad_accum 2: it continues from
    the newest checkpoint with the same global batches, and ends at the uninterrupted
    run's final loss to 1e-4 relative.

    ZeRO-2 here; ZeRO-3's elastic resume is in test_resumed_run_equals_uninterrupted[3]."""
    summary = run_tiny(["patchify"])
    base = resume_train(tiny_config, 2)
    full, _ = zero2_reference

    def spec(name, train, resume_from=None):
        return small_vit_spec(summary["stages"]["patchify"]["outputs"]["mnist_train"], train,
                              str(tmp_path / f"{name}.safetensors"), resume_from=resume_from)

    # The run directory of a 2-worker run that died after its step-6 checkpoint: the
    # reference's, copied without its step-12 checkpoint. Run again on 1 worker (what a
    # user does after losing a node: the stage's fingerprint is the same), `fit` finds
    # the step-6 checkpoint itself, converts it and continues under a new Ray run name.
    one_worker = dataclasses.replace(base, num_workers=1, grad_accum=2)
    elastic = fit(spec("elastic", one_worker), str(_died_after_step_6(full, tmp_path)))
    assert sorted(elastic["checkpoints_by_step"]) == [12]
    assert "/ray-1-workers-from-step-6/" in elastic["checkpoint"]
    # The last step's global batch is the same set of samples (digest of its keys)...
    assert elastic["metrics"]["batch_digest"] == full["metrics"]["batch_digest"]
    # ...and training went the same way: same loss, up to float summation order.
    assert elastic["metrics"]["loss"] == pytest.approx(full["metrics"]["loss"], rel=1e-4)

    checkpoint = full["checkpoints_by_step"][6]
    with pytest.raises(ResumeMismatchError, match="global batch differs .checkpoint 128, this run 64"):
        fit(spec("smaller", dataclasses.replace(base, num_workers=1), checkpoint), str(tmp_path / "smaller"))
    with pytest.raises(ResumeMismatchError, match="data fingerprint differs"):
        fit(spec("reseeded", dataclasses.replace(base, seed=1), checkpoint), str(tmp_path / "reseeded"))


def _died_after_step_6(full: dict, tmp_path: Path) -> Path:
    """The run directory of `full` as if it had died after its step-6 checkpoint: a copy
    without the step-12 one."""
    reference_dir, died = Path(full["checkpoints_by_step"][6]).parents[1], tmp_path / "died"
    shutil.copytree(reference_dir, died)
    shutil.rmtree(died / Path(full["checkpoints_by_step"][12]).relative_to(reference_dir))
    return died


def _assert_same_weights(path_a, path_b):
    a, b = load_file(path_a), load_file(path_b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
