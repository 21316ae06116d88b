"""What a model kind is: everything the pipeline needs to know about one kind of
model, in one place (torchtitan's ModelSpec, levanter's registered model configs).

A kind holds its typed model config (saved beside the weights as a versioned
`model_config.json` and read back into the same dataclass), how the model is built,
which stage trains it on which shards, its training task (the shard fields a batch
holds, augmentation, forward and loss, optimizer groups, FLOPs per sample and the
unit a run counts) and its Hugging Face adapter. The stages, the training loop,
evaluation, prediction and export ask the kind; none of them branches on its name.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch

from pipeline import storage
from pipeline.keys import Param
from pipeline.models.layers import full_shape
from pipeline.train.checkpoint import CheckpointError

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from pipeline.train.spec import TrainSpec

IGNORE = -100  # a target that counts for neither loss nor accuracy
MODEL_CONFIG_FORMAT = 1  # of model_config.json; bump when a model config's fields change meaning

Inputs = dict[str, dict[str, Any]]  # upstream stage name -> its outputs


class ModelConfigError(CheckpointError):
    """A model_config.json this version cannot read."""


def read_saved(path: str) -> tuple[str, Any]:
    """(kind name, config mapping) of a model_config.json, its format checked."""
    saved = storage.read_json(path)
    found = saved.get("format") if isinstance(saved, dict) else None
    if found != MODEL_CONFIG_FORMAT:
        raise ModelConfigError(f"{path}: model config format {found!r}, this version reads {MODEL_CONFIG_FORMAT} "
                               "(written by another version: train the stage again)")
    return saved.get("kind"), saved.get("config")


class ModelKind:
    name: str  # as saved in model_config.json: "gpt", "vit", "captioner"
    stage: str  # the stage that trains it
    deps: tuple[str, ...]  # the stages whose outputs that stage reads
    config_type: type  # the typed model config
    unit: str = "images"  # what a run counts: tokens or images
    fields: dict[str, Callable] = {}  # shard member -> decoder: what a training batch holds

    # ------------------------------------------------------------- the stage

    def section(self, config: "RunConfig") -> Any:
        """The run config's section for this kind's stage (its `train`, its model shape)."""
        raise NotImplementedError

    def model_config(self, config: "RunConfig", inputs: Inputs) -> Any:
        """The typed model config this run trains, from the run config and the stage's inputs."""
        raise NotImplementedError

    def shards(self, inputs: Inputs) -> tuple[str, str]:
        """The training and validation shard directories among the inputs' outputs."""
        raise NotImplementedError

    def starting_weights(self, config: "RunConfig", inputs: Inputs) -> dict[str, str]:
        """Safetensors the model starts from, by part (`initialise` loads them). Empty: fresh."""
        return {}

    def finish(self, out_dir: str, inputs: Inputs) -> dict[str, str]:
        """Extra outputs of the training stage, written beside the weights."""
        return {}

    # ------------------------------------------------------------- the saved config

    def write_config(self, path: str, cfg: Any) -> None:
        storage.write_json_atomic(path, {"format": MODEL_CONFIG_FORMAT, "kind": self.name, "config": asdict(cfg)})

    def read_config(self, path: str) -> Any:
        """This kind's typed model config from a model_config.json; another kind's is refused."""
        return self.config_from(*read_saved(path), path)

    def config_from(self, name: str, data: Any, path: str) -> Any:
        """This kind's typed model config from `read_saved`'s (kind name, mapping) of `path`."""
        from pipeline.config import ConfigError, dataclass_from_dict

        if name != self.name:
            raise ModelConfigError(f"{path}: holds a {name} model config, not a {self.name}")
        try:
            return dataclass_from_dict(self.config_type, data, "config")
        except ConfigError as e:
            raise ModelConfigError(f"{path}: {e}") from None

    # ------------------------------------------------------------- the model

    def build(self, cfg: Any) -> torch.nn.Module:
        raise NotImplementedError

    def initialise(self, model: torch.nn.Module, start: dict[str, str], check_only: bool = False) -> None:
        """Load `starting_weights` into a freshly built model; with `check_only`, only
        check that they fit (the driver does, on a meta-device model, before workers start)."""
        if start:
            raise ValueError(f"a {self.name} model starts from no saved weights, got {sorted(start)}")

    # ------------------------------------------------------------- the training task

    def units_per_sample(self, cfg: Any) -> float:
        """How many of `unit` one sample holds, by the model config."""
        return 1.0

    def planned_units_per_sample(self, config: "RunConfig") -> float:
        """The same, by a run config alone, before any stage ran (sweeps plan budgets)."""
        return 1.0

    def transform(self, spec: "TrainSpec") -> Optional[Callable]:
        """Augmentation of a training batch, keyed by (seed, epoch, sample key); None: none."""
        return None

    def forward(self, model, batch: dict[str, Any], device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, loss, targets); targets equal to IGNORE count for neither."""
        raise NotImplementedError

    def flops_per_sample(self, spec: "TrainSpec", model: torch.nn.Module, samples: Iterator[dict[str, Any]]) -> float:
        """Training FLOPs of one sample; `samples`: the first training shard's, decoded."""
        raise NotImplementedError

    def lr_group(self, spec: "TrainSpec", name: str) -> tuple[int, float]:
        """Parameter `name`'s optimizer group (groups in order 0, 1, ...) and that
        group's learning-rate multiplier (0 freezes it)."""
        return 0, 1.0

    def param_groups(self, spec: "TrainSpec", model: torch.nn.Module) -> list[dict[str, Any]]:
        """AdamW groups: no weight decay on 1-D parameters (biases, norms, the class
        token's and cell biases' vectors); each group at its learning-rate scale, and a
        scale of 0 freezes its parameters."""
        groups: dict[tuple[bool, int, float], list] = {}
        seen = set()
        for name, p in model.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            groups.setdefault((len(full_shape(p)) >= 2, *self.lr_group(spec, name)), []).append(p)
        train, out = spec.train, []
        for (decay, _, scale), params in sorted(groups.items()):
            if scale == 0:
                for p in params:
                    p.requires_grad_(False)
                continue
            out.append({"params": params, "weight_decay": train.weight_decay if decay else 0.0, "lr": train.lr * scale})
        return out

    # ------------------------------------------------------------- Hugging Face

    def export_hf(self, model: torch.nn.Module, cfg: Any, stage_dir: str, folder: str) -> str:
        """Write a Hugging Face model folder; return how to load it (`{out}` for its path)."""
        raise NotImplementedError(f"no Hugging Face export for a {self.name} model")

    def import_hf(self, folder: str) -> tuple[Any, torch.nn.Module]:
        """(model config, model) from a folder `export_hf` wrote (or one of the same form)."""
        raise NotImplementedError(f"no Hugging Face import for a {self.name} model")

    def _from_state(self, size: dict, state: dict[str, torch.Tensor], folder: str) -> tuple[Any, torch.nn.Module]:
        """The typed config of `size` (a model config's mapping) and a model holding `state`."""
        from pipeline.config import dataclass_from_dict
        from pipeline.train.checkpoint import load_state

        cfg = dataclass_from_dict(self.config_type, size, "config")
        model = self.build(cfg)
        load_state(model, state, folder)
        return cfg, model.eval()


def param_counts(model: torch.nn.Module) -> dict[str, int]:
    """What a run logs of its model's size: all parameters, and those outside lookup tables."""
    from pipeline.models.layers import count_params

    total = count_params(model)
    return {Param.PARAMS_TOTAL: total, Param.PARAMS_NON_EMBEDDING: total - model.embedding_params()}
