"""The GPT: a causal decoder pretrained on the token shards, exported as a stock GPT-2."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline import storage
from pipeline.config import TransformerConfig
from pipeline.data.shards import read_manifest
from pipeline.kinds.base import ModelKind
from pipeline.models import flops
from pipeline.models.gpt import GPT


@dataclass
class GPTModelConfig:
    vocab_size: int
    seq_len: int
    shape: TransformerConfig = field(default_factory=TransformerConfig)


class GPTKind(ModelKind):
    name, stage, deps = "gpt", "pretrain_gpt", ("tokenize",)
    config_type = GPTModelConfig
    unit = "tokens"
    fields = {"npy": np.asarray}  # token ids stay uint16 until they reach the device

    def section(self, config):
        return config.pretrain_gpt

    def model_config(self, config, inputs):
        manifest = read_manifest(inputs["tokenize"]["tokens_train"])
        return GPTModelConfig(int(manifest["vocab_size"]), int(manifest["seq_len"]), config.pretrain_gpt.model)

    def shards(self, inputs):
        return inputs["tokenize"]["tokens_train"], inputs["tokenize"]["tokens_val"]

    def finish(self, out_dir, inputs):
        # The model is useless without its tokenizer: the stage directory holds both (`pipeline export`).
        path = storage.join(out_dir, "tokenizer.json")
        storage.write_bytes_atomic(path, storage.read_bytes(inputs["tokenize"]["tokenizer"]))
        return {"tokenizer": path}

    def build(self, cfg: GPTModelConfig):
        return GPT(cfg.vocab_size, cfg.seq_len, cfg.shape)

    def units_per_sample(self, cfg: GPTModelConfig) -> float:
        return float(cfg.seq_len)

    def planned_units_per_sample(self, config) -> float:
        return float(config.tokenize.seq_len)

    def forward(self, model, batch, device, dtype):
        seq = batch["npy"].to(device, non_blocking=True).long()
        logits, loss = model(seq[:, :-1], seq[:, 1:])
        return logits, loss, seq[:, 1:]

    def flops_per_sample(self, spec, model, samples):
        shape = spec.model.shape
        return flops.gpt_flops_per_sequence(flops.matmul_params(model), shape.n_layer, spec.model.seq_len, shape.d_model)

    def export_hf(self, model, cfg, stage_dir, folder):
        from pipeline.export import stock

        stock.write_gpt2(model, stage_dir, folder)
        return "transformers.AutoModelForCausalLM.from_pretrained('{out}') and AutoTokenizer.from_pretrained('{out}')"

    def import_hf(self, folder):
        from transformers import GPT2LMHeadModel

        from pipeline.export import stock

        size, state = stock.gpt_state_from_gpt2(GPT2LMHeadModel.from_pretrained(folder))
        return self._from_state(size, state, folder)


KIND = GPTKind()
