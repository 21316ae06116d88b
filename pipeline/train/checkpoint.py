"""Checkpoints without pickle on the load path.

DeepSpeed checkpoints (every rank's ZeRO shard) carry training state for
resume and are read with `torch.load(weights_only=True)`. Final weights are
safetensors, which is what every downstream stage loads.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import torch
from safetensors.torch import load_file, save_file

from pipeline import storage

TAG = "state"  # one DeepSpeed tag per checkpoint directory: Ray versions the directories
# A training stage's directory holds its consolidated weights and model config; its
# checkpoints lie a few levels below it (Ray Train's run and checkpoint folders).
WEIGHTS, MODEL_CONFIG = "model.safetensors", "model_config.json"
LEVELS_UP = 4


class CheckpointError(ValueError):
    """A directory that does not hold what a command needs of a training stage."""


def deepspeed_safe_globals() -> list:
    """The only non-tensor classes DeepSpeed's checkpoints hold (checked for ZeRO 0-3)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def load_weights_only(path: str, map_location=None, **_ignored):
    """torch.load of a DeepSpeed checkpoint file, tensors and DeepSpeed's few classes only."""
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        return _torch_load(path, map_location=map_location, weights_only=True)


_torch_load = torch.load  # the real one, also while `weights_only_torch_load` is active


@contextlib.contextmanager
def weights_only_torch_load():
    """For DeepSpeed's own readers (zero_to_fp32) that call torch.load(weights_only=False):
    inside this block torch.load unpickles nothing but tensors and DeepSpeed's classes."""
    torch.load = load_weights_only
    try:
        yield
    finally:
        torch.load = _torch_load


def _weights_only_loads(engine) -> None:
    """Make DeepSpeed's checkpoint engine refuse to unpickle arbitrary objects."""
    engine.checkpoint_engine.load = load_weights_only


DATA_STATE = "data_state.json"


def save_engine(engine, directory: str, data_state: dict, rank: int) -> None:
    """Every rank's DeepSpeed shard; rank 0 adds the data counter (plain JSON, readable by the driver)."""
    engine.save_checkpoint(directory, tag=TAG, client_state={"step": data_state["step"]})
    if rank == 0:
        storage.write_json_atomic(os.path.join(directory, DATA_STATE), data_state)


def read_data_state(directory: str) -> dict:
    path = storage.join(directory, DATA_STATE)
    if not storage.exists(path):
        raise FileNotFoundError(f"{directory} holds no {DATA_STATE}: not a checkpoint this pipeline wrote")
    return storage.read_json(path)


def _torch_optimizer(engine):
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside ZeRO's wrapper


def _param_groups(engine) -> list[dict]:
    return _torch_optimizer(engine).param_groups


def load_engine(engine, directory: str) -> None:
    _weights_only_loads(engine)
    # DeepSpeed's universal load copies param group 0's hyperparameters onto every group:
    # groups with their own weight decay or learning-rate scale would silently lose them.
    own = [{k: v for k, v in group.items() if k != "params"} for group in _param_groups(engine)]
    path, _ = engine.load_checkpoint(directory, tag=TAG)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint with tag '{TAG}' under {directory}")
    if engine.load_universal_checkpoint():
        for group, settings, lr in zip(_param_groups(engine), own, engine.lr_scheduler.get_last_lr()):
            group.update(settings, lr=lr)  # lr: where the restored schedule stands
        # DeepSpeed's ZeRO-3 universal load (0.19) puts one `step` tensor object into the state
        # of every sub-group; AdamW increments it in place once per sub-group, so with two
        # groups the step count ran twice as fast and Adam's bias correction went wrong from
        # the first update (the ~1e-3 drift an elastic ZeRO-3 resume had). One tensor each:
        for state in _torch_optimizer(engine).state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def export_weights(engine, zero_stage: int, path: str, rank: int) -> None:
    """Full weights as safetensors, written by rank 0 (ZeRO-3 gathers them first)."""
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero_stage == 3 else contextlib.nullcontext()
    with gather:
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, "model.safetensors")
                save_file(unique_state(module), local)
                with open(local, "rb") as f:
                    storage.write_bytes_atomic(path, f.read())


def unique_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers, each once (a tied weight under its first name), as
    standalone contiguous tensors: ZeRO keeps parameters as views of flat buffers."""
    named = list(module.named_parameters()) + list(module.named_buffers())
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in named}


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """A safetensors file, local or on object storage."""
    if storage.is_local(path):
        return load_file(path)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "model.safetensors")
        with open(local, "wb") as f:
            f.write(storage.read_bytes(path))
        return load_file(local)


def check_fit(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str, subset: bool = False) -> None:
    """Every tensor of `state` is one of `module`'s (tied weights under their first name),
    of the same shape; without `subset`, all of them are there. Works on a meta-device module."""
    expected = {name: t.shape for name, t in [*module.named_parameters(), *module.named_buffers()]}
    unexpected = sorted(set(state) - set(expected))
    missing = [] if subset else sorted(set(expected) - set(state))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    misshapen = [f"{k} {tuple(v.shape)}, the model's {tuple(expected[k])}" for k, v in state.items() if v.shape != expected[k]]
    if misshapen:
        raise ValueError(f"{path} does not fit the model: {'; '.join(misshapen[:3])}")


def load_weights(module: torch.nn.Module, path: str, subset: bool = False) -> None:
    """Load safetensors into `module` (see `check_fit`); with `subset` the file may hold
    only some of its tensors (a text-only GPT starting a captioner's decoder)."""
    load_state(module, read_weights(path), path, subset)


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str, subset: bool = False) -> None:
    """Load `state` (from `where`) into `module` once `check_fit` passes."""
    check_fit(module, state, where, subset)
    module.load_state_dict(state, strict=False)  # tied aliases are absent by design


def consolidated_state(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """The full fp32 weights in a DeepSpeed checkpoint this pipeline wrote, whatever its
    ZeRO stage and world size: ZeRO 1-3 rebuilt from every rank's optimizer partition
    by DeepSpeed's zero_to_fp32, ZeRO 0 read from the model state. Nothing is unpickled."""
    import glob
    import io

    with storage.local_copy(checkpoint_dir) as local:
        tagged = os.path.join(local, TAG)
        model_states = sorted(glob.glob(os.path.join(tagged, "*model_states.pt")))
        if not model_states:
            raise CheckpointError(f"{checkpoint_dir}: no DeepSpeed checkpoint in it ({TAG}/*model_states.pt)")
        with weights_only_torch_load(), contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 narrates
            if glob.glob(os.path.join(tagged, "*_optim_states.pt")):
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                state = get_fp32_state_dict_from_zero_checkpoint(local, tag=TAG)
                # At ZeRO 1 DeepSpeed keeps frozen parameters (a captioner's frozen
                # encoder) out of the optimizer and of the consolidation; they never
                # change, and the model state holds them whole.
                module = torch.load(model_states[0], map_location="cpu")["module"]
                state.update({name: t for name, t in module.items() if name not in state})
            else:
                state = torch.load(model_states[0], map_location="cpu")["module"]
    return {name: t.float() if t.is_floating_point() else t for name, t in state.items()}


def find_trained(directory: str, names: tuple[str, ...] = (MODEL_CONFIG, WEIGHTS)) -> tuple[str, ...]:
    """The paths of `names` (by default the model config and final weights) in the
    training stage directory that `directory` (a checkpoint or the stage's own
    directory) belongs to."""
    here = directory.rstrip("/")
    for _ in range(LEVELS_UP + 1):
        paths = tuple(storage.join(here, name) for name in names)
        if all(storage.exists(p) for p in paths):
            return paths
        if "/" not in here.strip("/"):
            break
        here = here.rsplit("/", 1)[0]
    raise CheckpointError(f"{directory}: no {' and '.join(names)} here or in the training stage directory "
                          "above it; pass a training stage's checkpoint (stages.<stage>.outputs.checkpoint)")
