"""A training step outside logging steps reads nothing back from the device.

A host sync (`.item()`, `float(tensor)`, `.cpu()`: aten::_local_scalar_dense; or
the accelerator's `synchronize`) stalls the CPU until a GPU drains its queue, and a
step whose kernels are queued by a busy CPU then runs at the CPU's pace. The real
loop pieces (the trainer's `train_step` and its callbacks) run on a real DeepSpeed
engine, ZeRO-1 in bf16, and every sync of one non-logging step is caught with the
stack that asked for it. DeepSpeed's own step keeps one: its check that the gradient
norm is finite, before clipping. With DeepSpeed's bf16 overflow scan off, a NaN in the
weights must stop the run at the next logging step, with an error that says what to do.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import traceback

import numpy as np

from localcluster import free_port

LOG_EVERY = 5
DEEPSPEED_NORM_CHECK = "is_invalid_grad_norm"


def _write_tokens(directory: str, vocab: int, seq_len: int, samples: int) -> None:
    from pipeline.data.shards import write_manifest, write_shard

    rng = np.random.default_rng(0)
    info = write_shard(os.path.join(directory, "tokens-0.tar"),
                       ({"__key__": f"{i}", "npy": rng.integers(0, vocab, seq_len + 1).astype(np.uint16)}
                        for i in range(samples)))
    write_manifest(directory, [info], {"npy": "token ids"}, "test", seq_len=seq_len, vocab_size=vocab)


def _count(port: int, directory: str) -> None:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    from deepspeed.accelerator import get_accelerator

    from pipeline.config import PretrainGPTConfig, TrainConfig, TransformerConfig
    from pipeline.kinds import KINDS
    from pipeline.kinds.gpt import GPTModelConfig
    from pipeline.train import loop
    from pipeline.train.data import TrainingData
    from pipeline.train.engine import build_model, deepspeed_config, init_distributed, initialize, load_zero_config
    from pipeline.train.spec import TrainSpec

    init_distributed(use_gpu=False)
    tokens = os.path.join(directory, "tokens")
    _write_tokens(tokens, 512, 32, 64)
    shape = TransformerConfig(n_layer=2, n_head=4, d_model=64)
    train = TrainConfig(num_workers=1, zero_stage=1, precision="bf16", micro_batch_size=4, grad_accum=2, max_steps=20,
                        warmup_steps=1, log_every=LOG_EVERY, loader_workers=0)
    spec = TrainSpec(kind="gpt", model=GPTModelConfig(512, 32, shape), section=PretrainGPTConfig(shape, train),
                     train_data=tokens, deepspeed=load_zero_config(1), weights_out="")
    kind = KINDS["gpt"]
    ds_config = deepspeed_config(spec.deepspeed, train, 1)
    model = build_model(kind, spec, ds_config)
    engine, _, scheduler = initialize(model, kind.param_groups(spec, model), train, ds_config)
    data = TrainingData.open(tokens, train, 1)
    run = loop.Run(spec, kind, engine, scheduler, data, 0, 1, torch.device("cpu"), torch.bfloat16, 1.0, False)
    callbacks = [loop.FaultDrill(), loop.MetricsLogger(run), loop.Validator(run), loop.StopWatcher(), loop.Checkpointer()]
    batches = iter(data.loader(0, 0, train.max_steps, kind.fields, None, train))

    syncs: list[str] = []

    class Syncs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                syncs.append(" <- ".join(f"{os.path.basename(f.filename)}:{f.name}" for f in traceback.extract_stack()[-8:-1]))
            return func(*args, **(kwargs or {}))

    accelerator = get_accelerator()
    synchronize = accelerator.synchronize

    def counted_synchronize(*args, **kwargs):  # counts, then does what it did
        syncs.append("accelerator.synchronize")
        return synchronize(*args, **kwargs)

    accelerator.synchronize = counted_synchronize
    found = {}
    engine.train()
    for step in range(1, LOG_EVERY + 1):
        syncs.clear()
        with Syncs():
            loss, digest = loop.train_step(run, batches)
            for callback in callbacks:
                callback.after_step(run, step, loss, digest)
        found[step] = list(syncs)

    # Without DeepSpeed's bf16 overflow scan a non-finite gradient is applied: the next
    # logging step must stop the run, not log NaN and go on.
    with torch.no_grad():
        engine.module.lm_head.weight.view(-1)[0] = float("nan")  # tied: the embedding too
    stopped = ""
    try:
        for step in range(LOG_EVERY + 1, 2 * LOG_EVERY + 1):
            loss, digest = loop.train_step(run, batches)
            for callback in callbacks:
                callback.after_step(run, step, loss, digest)
    except FloatingPointError as error:
        stopped = f"{step}: {error}"
    with open(os.path.join(directory, "syncs.json"), "w") as f:
        json.dump({"syncs": found, "stopped": stopped}, f)


def test_a_step_outside_logging_reads_nothing_back_and_a_nan_loss_stops_the_run(tmp_path):
    process = multiprocessing.get_context("spawn").Process(target=_count, args=(free_port(), str(tmp_path)))
    process.start()
    process.join(timeout=300)
    assert process.exitcode == 0
    saved = json.loads((tmp_path / "syncs.json").read_text())
    found = {int(k): v for k, v in saved["syncs"].items()}
    for step in range(2, LOG_EVERY):  # step 1 builds the optimizer's state
        ours = [s for s in found[step] if DEEPSPEED_NORM_CHECK not in s]
        assert ours == [], f"step {step} syncs outside DeepSpeed's norm check: {ours}"
        # one per micro-batch's engine.step (grad_accum 2): DeepSpeed steps the optimizer on the last only
        assert len(found[step]) <= 2, found[step]
    # The counter sees syncs where there are some: the logging step reads the loss back.
    assert any("after_step" in s for s in found[LOG_EVERY])
    assert saved["stopped"].startswith(f"{2 * LOG_EVERY}: [gpt] step {2 * LOG_EVERY}: training loss is nan"), saved
    assert "pretrain_gpt.train.lr" in saved["stopped"]
