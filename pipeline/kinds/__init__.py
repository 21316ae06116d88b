"""The model kinds, and the typed `model_config.json` saved beside each trained model.

A fourth kind is one module beside these (a `ModelKind` and its model config) and
one line in KINDS; the training stage, its loop, export and `pipeline batches`
find it here.
"""

from __future__ import annotations

from typing import Any

from pipeline.kinds import captioner, gpt, vit
from pipeline.kinds.base import IGNORE, ModelConfigError, ModelKind, read_saved

__all__ = ["IGNORE", "KINDS", "ModelConfigError", "ModelKind", "build_saved", "by_stage", "kind_of", "load_trained",
           "read_model_config"]

KINDS: dict[str, ModelKind] = {k.name: k for k in (gpt.KIND, vit.KIND, captioner.KIND)}


def by_stage() -> dict[str, ModelKind]:
    """Training stage name -> the kind it trains."""
    return {k.stage: k for k in KINDS.values()}


def kind_of(name: str) -> ModelKind:
    if name not in KINDS:
        raise ModelConfigError(f"unknown model kind {name!r} (known: {', '.join(KINDS)})")
    return KINDS[name]


def read_model_config(path: str) -> tuple[ModelKind, Any]:
    """The kind and its typed model config, as `ModelKind.write_config` saved them."""
    name, data = read_saved(path)  # read once
    kind = kind_of(name)
    return kind, kind.config_from(name, data, path)


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
