"""The model kinds, and the typed `model_config.json` saved beside each trained model.

A fifth kind is one module beside these (a `ModelKind` and its model config) and
one line in KINDS; the training stage, its loop, export and `pipeline batches`
find it here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline import storage
from pipeline.kinds import captioner, gpt, vit
from pipeline.kinds.base import IGNORE, ModelKind

__all__ = ["IGNORE", "KINDS", "ModelKind", "build_saved", "by_stage", "kind_of", "load_trained", "read_model_config",
           "write_model_config"]

KINDS: dict[str, ModelKind] = {k.name: k for k in (gpt.KIND, vit.KIND, captioner.KIND)}

MODEL_CONFIG_FORMAT = 1  # bump when a model config's fields change meaning


class ModelConfigError(ValueError):
    """A model_config.json this version cannot read."""


def by_stage() -> dict[str, ModelKind]:
    """Training stage name -> the kind it trains."""
    return {k.stage: k for k in KINDS.values()}


def kind_of(name: str) -> ModelKind:
    if name not in KINDS:
        raise ModelConfigError(f"unknown model kind {name!r} (known: {', '.join(KINDS)})")
    return KINDS[name]


def write_model_config(path: str, kind: ModelKind, cfg: Any) -> None:
    storage.write_json_atomic(path, {"format": MODEL_CONFIG_FORMAT, "kind": kind.name, "config": dataclasses.asdict(cfg)})


def read_model_config(path: str) -> tuple[ModelKind, Any]:
    """The kind and its typed model config, as `write_model_config` saved them."""
    from pipeline.config import ConfigError, dataclass_from_dict

    saved = storage.read_json(path)
    if not isinstance(saved, dict) or saved.get("format") != MODEL_CONFIG_FORMAT:
        found = saved.get("format") if isinstance(saved, dict) else None
        raise ModelConfigError(f"{path}: model config format {found!r}, this version reads {MODEL_CONFIG_FORMAT} "
                               "(written by another version: train the stage again)")
    kind = kind_of(saved.get("kind"))
    try:
        return kind, dataclass_from_dict(kind.config_type, saved.get("config"), "config")
    except ConfigError as e:
        raise ModelConfigError(f"{path}: {e}") from None


def build_saved(path: str):
    """(kind, config, an untrained model) of the shape a model_config.json describes."""
    kind, cfg = read_model_config(path)
    return kind, cfg, kind.build(cfg)


def load_trained(model_config_path: str, weights_path: str):
    """(kind, config, the trained model in eval mode) from a stage's saved config and safetensors."""
    from pipeline.train.checkpoint import load_weights

    kind, cfg, model = build_saved(model_config_path)
    load_weights(model, weights_path)
    return kind, cfg, model.eval()
