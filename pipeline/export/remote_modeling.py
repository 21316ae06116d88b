"""A thousandwords grid captioner as a Hugging Face model.

This file is not imported by the pipeline: `pipeline export` copies it, with the
model files it imports, into an exported folder, where transformers loads it:

    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(folder)
    pixel_values = processor(Image.open("grid.png"), return_tensors="pt").pixel_values
    model.generate(pixel_values)  # [["37", "_1"]]: each grid's rows, '_' a blank cell

Images: grayscale, light digits on dark, 28x28-pixel cells, 1 to 10 a side; the
size says the rows and columns. `generate` also takes a list of (1, H, W) tensors
of different shapes.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import Seq2SeqLMOutput

from .captioner import build_captioner
from .patches import to_patches


class GridCaptionerConfig(PretrainedConfig):
    model_type = "thousandwords_grid_captioner"

    # not `encoder`/`decoder`: transformers reads attributes of those names as sub-configs
    def __init__(self, encoder_shape: dict | None = None, decoder_shape: dict | None = None, cell: int = 28,
                 patch_size: int = 7, stem_channels: int = 0, pool: str = "cls", head_logits: bool = False,
                 head_shift: int = 0, **kwargs):
        shape = {"n_layer": 2, "n_head": 4, "d_model": 96, "dropout": 0.0}
        self.encoder_shape, self.decoder_shape = encoder_shape or dict(shape), decoder_shape or dict(shape)
        self.cell, self.patch_size, self.stem_channels, self.pool = cell, patch_size, stem_channels, pool
        self.head_logits, self.head_shift = head_logits, head_shift
        super().__init__(**kwargs)


class GridCaptioner(PreTrainedModel):
    config_class = GridCaptionerConfig
    main_input_name = "pixel_values"
    _tied_weights_keys = {"captioner.lm_head.weight": "captioner.tok_emb.weight"}

    def __init__(self, config: GridCaptionerConfig):
        super().__init__(config)
        self.captioner = build_captioner(config.cell, config.patch_size, SimpleNamespace(**config.encoder_shape),
                                         SimpleNamespace(**config.decoder_shape), config.stem_channels, config.pool,
                                         config.head_logits, config.head_shift)
        self.post_init()

    def _init_weights(self, module):
        pass  # the wrapped model initialises itself; trained weights replace it all

    def _patches_and_shapes(self, pixel_values) -> tuple[torch.Tensor, torch.Tensor]:
        images = list(pixel_values) if isinstance(pixel_values, (list, tuple)) else list(pixel_values.unbind(0))
        cell, p = self.config.cell, self.config.patch_size
        for image in images:
            if image.dim() != 3 or image.shape[0] != 1 or image.shape[1] % cell or image.shape[2] % cell:
                raise ValueError(f"each image must be (1, H, W) with H and W multiples of {cell}, got {tuple(image.shape)}")
        patches = torch.nn.utils.rnn.pad_sequence([to_patches(im[0], p) for im in images], batch_first=True)
        shapes = torch.tensor([[im.shape[1] // cell, im.shape[2] // cell] for im in images], device=patches.device)
        return patches, shapes

    def forward(self, pixel_values, decoder_input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs):
        """Teacher-forced logits of the written grid's ids (see captioner.encode_text)."""
        patches, shapes = self._patches_and_shapes(pixel_values)
        logits, loss = self.captioner(patches, shapes, decoder_input_ids, labels)
        return Seq2SeqLMOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(self, pixel_values, use_cache: bool = True, **kwargs) -> list[list[str]]:
        """Greedy: each grid's rows, a digit or '_' per cell."""
        patches, shapes = self._patches_and_shapes(pixel_values)
        return [text.split("\n") for text in self.captioner.generate(patches, shapes, use_cache=use_cache)]
