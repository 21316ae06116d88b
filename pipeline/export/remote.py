"""The captioner as a Hugging Face custom-code folder (`trust_remote_code=True`).

No stock class holds it: its encoder runs the ViT on each 28x28 cell, its memory
carries row/column tags and edge tokens, and its decoder has a cursor and a
cell-under-cursor attention bonus. So the folder ships the model's own code: the
files of `pipeline/models` (which import nothing outside themselves) and a thin
`PreTrainedModel` around them, `remote_modeling.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from importlib import resources

from safetensors.torch import save_file

from pipeline.export.stock import image_processor
from pipeline.geometry import CELL

MODEL_FILES = ("layers.py", "recompute.py", "patches.py", "vit.py", "captioner.py")  # of pipeline.models
MODELING = "modeling_thousandwords.py"
PREFIX = "captioner."  # the wrapper's attribute holding our model


def write_captioner(model, cfg, folder: str) -> None:
    """`cfg`: the captioner's model config (pipeline.kinds.captioner.CaptionerModelConfig)."""
    for name in MODEL_FILES:
        _copy_source("pipeline.models", name, os.path.join(folder, name))
    _copy_source("pipeline.export", "remote_modeling.py", os.path.join(folder, MODELING))
    encoder = cfg.encoder
    config = {
        "model_type": "thousandwords_grid_captioner",
        "architectures": ["GridCaptioner"],
        "auto_map": {"AutoConfig": f"{MODELING[:-3]}.GridCaptionerConfig", "AutoModel": f"{MODELING[:-3]}.GridCaptioner"},
        "encoder_shape": dataclasses.asdict(encoder.shape),
        "decoder_shape": dataclasses.asdict(cfg.decoder),
        "cell": CELL,
        "patch_size": encoder.patches.patch_size,
        "stem_channels": encoder.stem_channels,
        "pool": encoder.pool,
        "head_logits": cfg.head_logits,
        "head_shift": cfg.head_shift,
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    # Tied weights under both names: transformers' loader reads each name it expects.
    state = {PREFIX + k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    image_processor(encoder.patches).save_pretrained(folder)


def _copy_source(package: str, name: str, target: str) -> None:
    with open(target, "wb") as f:
        f.write((resources.files(package) / name).read_bytes())
