"""The captioner: the pretrained ViT reads each cell of a grid image, a causal decoder
with cross-attention writes the digits row by row. Fine-tuned on the grid shards,
exported as a Hugging Face folder with its own code (`trust_remote_code=True`)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from pipeline import storage
from pipeline.config import TransformerConfig
from pipeline.geometry import CELL
from pipeline.kinds.base import IGNORE, ModelKind
from pipeline.kinds.vit import KIND as VIT
from pipeline.kinds.vit import ViTModelConfig, as_float32, normalisation_of
from pipeline.models import flops
from pipeline.models.captioner import MAX_TEXT_LEN, PAD, build_captioner, encode_text


@dataclass
class CaptionerModelConfig:
    encoder: ViTModelConfig = field(default_factory=ViTModelConfig)  # the pretrained ViT's own config
    decoder: TransformerConfig = field(default_factory=lambda: TransformerConfig(n_layer=2))
    head_logits: bool = False  # see FinetuneConfig.head_logits
    head_shift: int = 0  # see FinetuneConfig.head_shift


def padded_text_ids(text: str) -> np.ndarray:
    ids = encode_text(text)
    return np.asarray(ids + [PAD] * (MAX_TEXT_LEN + 2 - len(ids)), dtype=np.int64)


def grid_shape(meta: dict) -> np.ndarray:
    return np.asarray([meta["rows"], meta["cols"]], dtype=np.int64)


ENCODER = "encoder."  # the pretrained ViT's parameters, by name


class CaptionerKind(ModelKind):
    name, stage, deps = "captioner", "finetune", ("patchify", "pretrain_vit")
    config_type = CaptionerModelConfig
    fields = {"npy": as_float32, "txt": padded_text_ids, "json": grid_shape}

    def section(self, config):
        return config.finetune

    def model_config(self, config, inputs):
        encoder = VIT.read_config(inputs["pretrain_vit"]["model_config"])
        cfg = config.finetune
        return CaptionerModelConfig(encoder, cfg.decoder, cfg.head_logits, cfg.head_shift)

    def shards(self, inputs):
        return inputs["patchify"]["grids_train"], inputs["patchify"]["grids_val"]

    def starting_weights(self, config, inputs):
        cfg, start = config.finetune, {}
        if cfg.encoder_init == "pretrained":
            start["encoder"] = inputs["pretrain_vit"]["weights"]
        if cfg.init_decoder:
            start["decoder"] = storage.absolute(cfg.init_decoder)  # workers start elsewhere
        return start

    def build(self, cfg: CaptionerModelConfig):
        enc = cfg.encoder
        return build_captioner(CELL, enc.patches.patch_size, enc.shape, cfg.decoder, enc.stem_channels, enc.pool,
                               cfg.head_logits, cfg.head_shift)

    def initialise(self, model, start, check_only=False):
        from pipeline.train.checkpoint import check_fit, load_weights, read_weights

        unknown = sorted(set(start) - {"encoder", "decoder"})
        if unknown:
            raise ValueError(f"a captioner starts from an encoder and a decoder, not {unknown}")
        if check_only:  # the encoder is the pipeline's own ViT; a decoder file comes from the user
            if "decoder" in start:
                check_fit(model, read_weights(start["decoder"]), start["decoder"], subset=True)
            return
        if "encoder" in start:
            load_weights(model.encoder, start["encoder"])
        if "decoder" in start:  # a text-only GPT of the decoder's shape: what it has of the decoder
            load_weights(model, start["decoder"], subset=True)

    def transform(self, spec):
        from pipeline.train.augment import KeyedAffine

        augment, layout = spec.section.augment, spec.model.encoder.patches
        return KeyedAffine(augment, spec.train.seed, layout.patch_size, layout.background) if augment.active() else None

    def forward(self, model, batch, device, dtype):
        ids = batch["txt"].to(device, non_blocking=True)
        length = int((ids != PAD).sum(1).max())
        ids = ids[:, :length]
        shapes = batch["json"].to(device)
        logits, loss = model(batch["npy"].to(device, dtype, non_blocking=True), shapes, ids[:, :-1], ids[:, 1:])
        targets = ids[:, 1:].masked_fill(ids[:, 1:] == PAD, IGNORE)
        return logits, loss, targets

    def lr_group(self, spec, name):
        return (1, spec.section.encoder_lr_scale) if name.startswith(ENCODER) else (0, 1.0)

    def flops_per_sample(self, spec, model, samples):
        """The mean over the first shard's grids (up to 256): grids of mixed shapes cost
        what their cells and text cost."""
        decoder = spec.model.decoder
        enc = model.encoder
        trained = spec.section.encoder_lr_scale > 0
        stem, stem_params = enc.stem_flops(trained)
        head_params = flops.matmul_params(enc.head)
        enc_params = flops.matmul_params(enc) - head_params - stem_params  # the head reads class tokens only
        per_cell = stem + ((6.0 if trained else 2.0) * head_params if model.head_logits else 0.0)
        memory_params = flops.matmul_params(model.memory_proj) + sum(flops.matmul_params(b.cross_attn.kv) for b in model.blocks)
        decoder_params = flops.matmul_params(model) - flops.matmul_params(enc)
        costs = []
        for sample in itertools.islice(samples, 256):
            rows, cols = sample["json"]["rows"], sample["json"]["cols"]
            text_len = len(encode_text(sample["txt"])) - 1  # predicted positions
            costs.append(flops.captioner_flops_per_sample(
                enc_params, enc.cfg.n_layer, enc.cfg.d_model, enc.num_patches + 1, rows, rows * cols, trained,
                decoder_params - memory_params, memory_params, decoder.n_layer, decoder.d_model, text_len,
            ) + per_cell * rows * cols)
        return sum(costs) / len(costs)

    def export_hf(self, model, cfg, stage_dir, folder):
        from pipeline.export import remote

        remote.write_captioner(model, cfg, folder)
        return "transformers.AutoModel.from_pretrained('{out}', trust_remote_code=True); model.generate(pixel_values)"

    def import_hf(self, folder):
        from safetensors.torch import load_file

        from pipeline.export.remote import PREFIX

        config = storage.read_json(f"{folder}/config.json")
        encoder = {"patches": normalisation_of(folder, config["patch_size"]), "shape": config["encoder_shape"],
                   "stem_channels": config["stem_channels"], "pool": config["pool"]}
        size = {"encoder": encoder, "decoder": config["decoder_shape"], "head_logits": config["head_logits"],
                "head_shift": config["head_shift"]}
        state = {k[len(PREFIX):]: v for k, v in load_file(f"{folder}/model.safetensors").items()}
        state.pop("lm_head.weight", None)  # tied to tok_emb.weight, saved under both names
        return self._from_state(size, state, folder)


KIND = CaptionerKind()
