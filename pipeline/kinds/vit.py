"""The ViT: single digits' patches to a class, pretrained on the digit shards and
exported as a stock `ViTForImageClassification` (when it has that form)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from pipeline.config import TransformerConfig
from pipeline.geometry import CELL, NUM_CLASSES, PatchLayout
from pipeline.kinds.base import ModelKind
from pipeline.models import flops
from pipeline.models.vit import build_vit


@dataclass
class ViTModelConfig:
    patches: PatchLayout = field(default_factory=PatchLayout)
    shape: TransformerConfig = field(default_factory=TransformerConfig)
    num_classes: int = NUM_CLASSES
    stem_channels: int = 0  # 0: a linear patch projection (see PretrainViTConfig.stem_channels)
    pool: Literal["cls", "mean"] = "cls"  # what the head reads (see PretrainViTConfig.pool)


def as_float32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32)


class ViTKind(ModelKind):
    name, stage, deps = "vit", "pretrain_vit", ("patchify",)
    config_type = ViTModelConfig
    fields = {"npy": as_float32, "cls": int}

    def section(self, config):
        return config.pretrain_vit

    def model_config(self, config, inputs):
        cfg = config.pretrain_vit
        return ViTModelConfig(config.patchify.layout(), cfg.model, NUM_CLASSES, cfg.stem_channels, cfg.pool)

    def shards(self, inputs):
        return inputs["patchify"]["mnist_train"], inputs["patchify"]["mnist_val"]

    def build(self, cfg: ViTModelConfig):
        return build_vit(CELL, cfg.patches.patch_size, cfg.num_classes, cfg.shape, cfg.stem_channels, cfg.pool)

    def transform(self, spec):
        from pipeline.train.augment import KeyedAffine, KeyedShift

        section, layout = spec.section, spec.model.patches
        if section.augment.active():  # an affine distortion replaces the plain shift
            return KeyedAffine(section.augment, spec.train.seed, layout.patch_size, layout.background)
        if section.max_shift:
            return KeyedShift(spec.train.seed, layout.patch_size, section.max_shift, layout.background)
        return None

    def forward(self, model, batch, device, dtype):
        labels = batch["cls"].to(device, non_blocking=True)
        logits, loss = model(batch["npy"].to(device, dtype, non_blocking=True), labels)
        return logits, loss, labels

    def flops_per_sample(self, spec, model, samples):
        shape = spec.model.shape
        stem, stem_params = model.stem_flops(trained=True)
        return stem + flops.vit_flops_per_image(flops.matmul_params(model) - stem_params, flops.matmul_params(model.head),
                                                shape.n_layer, model.num_patches, shape.d_model)

    def export_hf(self, model, cfg, stage_dir, folder):
        from pipeline.export import stock

        stock.write_vit(model, cfg, folder)
        return ("transformers.ViTForImageClassification.from_pretrained('{out}') and "
                "AutoImageProcessor.from_pretrained('{out}')")

    def import_hf(self, folder):
        from transformers import ViTForImageClassification

        from pipeline.export import stock

        size, state = stock.vit_state_from_vit(ViTForImageClassification.from_pretrained(folder))
        size["patches"] = normalisation_of(folder, size.pop("patch_size"))
        return self._from_state(size, state, folder)


def normalisation_of(folder: str, patch_size: int) -> dict:
    """A patch layout's mapping from an exported folder's image processor (its mean and std)."""
    from pipeline import storage

    processor = storage.read_json(f"{folder}/preprocessor_config.json")
    return {"patch_size": patch_size, "mean": processor["image_mean"][0], "std": processor["image_std"][0]}


KIND = ViTKind()
