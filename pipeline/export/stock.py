"""Our GPT and ViT as stock `transformers` models.

Both are the classic pre-LN architectures: the GPT is GPT-2 with exact GELU and our
sizes, the ViT is ViT with one input channel. Only the parameter names and two
layouts differ: our attention keeps q apart from a fused k,v projection, and GPT-2's
Conv1D stores a linear layer's weight transposed. The stock model is built from its
config and loaded strictly, so a missing or misshapen tensor fails the export.
"""

from __future__ import annotations


import torch

from pipeline import storage

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which our models use


def _linear(prefix: str, linear: torch.nn.Linear, transposed: bool = False) -> dict[str, torch.Tensor]:
    weight = linear.weight.t() if transposed else linear.weight
    return {f"{prefix}.weight": weight, f"{prefix}.bias": linear.bias}


def _norm(prefix: str, norm: torch.nn.LayerNorm) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": norm.weight, f"{prefix}.bias": norm.bias}


def _load_strict(hf_model, state: dict[str, torch.Tensor]):
    hf_model.load_state_dict({k: v.detach().contiguous() for k, v in state.items()}, strict=True)
    return hf_model.eval()


def gpt2(model) -> "transformers.GPT2LMHeadModel":  # noqa: F821
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.cfg
    config = GPT2Config(
        vocab_size=model.vocab_size, n_positions=model.seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layer,
        n_head=cfg.n_head, activation_function="gelu", layer_norm_epsilon=LAYER_NORM_EPS,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None,
    )
    state = {"transformer.wte.weight": model.tok_emb.weight, "transformer.wpe.weight": model.pos_emb.weight,
             "lm_head.weight": model.tok_emb.weight, **_norm("transformer.ln_f", model.ln_f)}
    for i, block in enumerate(model.blocks):
        h, attn = f"transformer.h.{i}", block.attn
        state |= _norm(f"{h}.ln_1", block.ln_1) | _norm(f"{h}.ln_2", block.ln_2)
        state[f"{h}.attn.c_attn.weight"] = torch.cat([attn.q.weight, attn.kv.weight]).t()  # q, k, v
        state[f"{h}.attn.c_attn.bias"] = torch.cat([attn.q.bias, attn.kv.bias])
        state |= _linear(f"{h}.attn.c_proj", attn.proj, transposed=True)
        state |= _linear(f"{h}.mlp.c_fc", block.mlp.fc, transposed=True)
        state |= _linear(f"{h}.mlp.c_proj", block.mlp.out, transposed=True)
    return _load_strict(GPT2LMHeadModel(config), state)


def write_gpt2(model, stage_dir: str, folder: str) -> None:
    """The model and, from the stage directory, its tokenizer (AutoTokenizer loads it)."""
    from transformers import PreTrainedTokenizerFast

    from pipeline.preprocess.tokenize import END_OF_TEXT
    from pipeline.train.checkpoint import CheckpointError

    tokenizer_path = storage.join(stage_dir, "tokenizer.json")
    if not storage.exists(tokenizer_path):
        raise CheckpointError(f"{stage_dir}: no tokenizer.json beside the GPT (a stage from before exports "
                              "existed: run pretrain_gpt again)")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_tokenizer(tokenizer_path), eos_token=END_OF_TEXT,
                                        bos_token=END_OF_TEXT, model_max_length=model.seq_len)
    hf_model = gpt2(model)
    hf_model.config.bos_token_id = hf_model.config.eos_token_id = tokenizer.eos_token_id
    hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _tokenizer(path: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(storage.read_bytes(path).decode("utf-8"))


def vit(model, cfg) -> "transformers.ViTForImageClassification":  # noqa: F821
    """`cfg`: the ViT's model config (pipeline.kinds.vit.ViTModelConfig)."""
    from transformers import ViTConfig, ViTForImageClassification

    from pipeline.export import ExportError

    if cfg.stem_channels:
        raise ExportError("a ViT with a conv stem (pretrain_vit.stem_channels > 0) has no stock "
                          "ViTForImageClassification form; train it with stem_channels 0 to export it")
    if cfg.pool != "cls":
        raise ExportError("a ViT whose head reads the mean of its patch tokens (pretrain_vit.pool: mean) has no "
                          "stock ViTForImageClassification form (its head reads the class token); train it with "
                          "pool: cls to export it")
    shape, p = model.cfg, cfg.patches.patch_size
    config = ViTConfig(
        hidden_size=shape.d_model, num_hidden_layers=shape.n_layer, num_attention_heads=shape.n_head,
        intermediate_size=4 * shape.d_model, hidden_act="gelu", layer_norm_eps=LAYER_NORM_EPS, qkv_bias=True,
        hidden_dropout_prob=shape.dropout, attention_probs_dropout_prob=shape.dropout,
        image_size=int(round(model.num_patches ** 0.5)) * p, patch_size=p, num_channels=1,
        num_labels=model.num_classes, id2label={i: str(i) for i in range(model.num_classes)},
        label2id={str(i): i for i in range(model.num_classes)},
    )
    embed = model.embed
    state = {
        "vit.embeddings.cls_token": embed.cls_token,
        "vit.embeddings.position_embeddings": embed.pos_emb,
        # a patch's pixels in raster order = a (1, p, p) convolution kernel
        "vit.embeddings.patch_embeddings.projection.weight": embed.proj.weight.view(shape.d_model, 1, p, p),
        "vit.embeddings.patch_embeddings.projection.bias": embed.proj.bias,
        **_norm("vit.layernorm", model.ln_f), **_linear("classifier", model.head),
    }
    for i, block in enumerate(model.blocks):
        h, attn, d = f"vit.layers.{i}", block.attn, shape.d_model
        k, v = attn.kv.weight.split(d), attn.kv.bias.split(d)
        state |= _linear(f"{h}.attention.q_proj", attn.q) | _linear(f"{h}.attention.o_proj", attn.proj)
        state |= {f"{h}.attention.k_proj.weight": k[0], f"{h}.attention.k_proj.bias": v[0],
                  f"{h}.attention.v_proj.weight": k[1], f"{h}.attention.v_proj.bias": v[1]}
        state |= _norm(f"{h}.layernorm_before", block.ln_1) | _norm(f"{h}.layernorm_after", block.ln_2)
        state |= _linear(f"{h}.mlp.fc1", block.mlp.fc) | _linear(f"{h}.mlp.fc2", block.mlp.out)
    return _load_strict(ViTForImageClassification(config), state)


def image_processor(layout):
    """Pixels 0-255 to what the model reads (a `geometry.PatchLayout`'s normalisation):
    scaled to 0-1, normalised, never resized."""
    from transformers import ViTImageProcessorPil  # the Pillow one: the torch one wants torchvision

    return ViTImageProcessorPil(do_resize=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                             image_mean=[layout.mean], image_std=[layout.std])


def write_vit(model, cfg, folder: str) -> None:
    vit(model, cfg).save_pretrained(folder)
    image_processor(cfg.patches).save_pretrained(folder)


# --------------------------------------------------------------------------- from Hugging Face


def _unlinear(state: dict, ours: str, theirs: str, transposed: bool = False) -> dict[str, torch.Tensor]:
    weight = state[f"{theirs}.weight"]
    return {f"{ours}.weight": weight.t() if transposed else weight, f"{ours}.bias": state[f"{theirs}.bias"]}


def _unnorm(state: dict, ours: str, theirs: str) -> dict[str, torch.Tensor]:
    return {f"{ours}.weight": state[f"{theirs}.weight"], f"{ours}.bias": state[f"{theirs}.bias"]}


def gpt_state_from_gpt2(hf_model) -> tuple[dict, dict[str, torch.Tensor]]:
    """(our GPT's shape and size, its state dict) from a `GPT2LMHeadModel`: the inverse of `gpt2`."""
    config, state = hf_model.config, hf_model.state_dict()
    d = config.n_embd
    size = {"vocab_size": config.vocab_size, "seq_len": config.n_positions,
            "shape": {"n_layer": config.n_layer, "n_head": config.n_head, "d_model": d, "dropout": config.resid_pdrop}}
    ours = {"tok_emb.weight": state["transformer.wte.weight"], "pos_emb.weight": state["transformer.wpe.weight"],
            **_unnorm(state, "ln_f", "transformer.ln_f")}
    for i in range(config.n_layer):
        h, b = f"transformer.h.{i}", f"blocks.{i}"
        qkv, qkv_bias = state[f"{h}.attn.c_attn.weight"].t(), state[f"{h}.attn.c_attn.bias"]
        ours |= _unnorm(state, f"{b}.ln_1", f"{h}.ln_1") | _unnorm(state, f"{b}.ln_2", f"{h}.ln_2")
        ours |= {f"{b}.attn.q.weight": qkv[:d], f"{b}.attn.q.bias": qkv_bias[:d],
                 f"{b}.attn.kv.weight": qkv[d:], f"{b}.attn.kv.bias": qkv_bias[d:]}
        ours |= _unlinear(state, f"{b}.attn.proj", f"{h}.attn.c_proj", transposed=True)
        ours |= _unlinear(state, f"{b}.mlp.fc", f"{h}.mlp.c_fc", transposed=True)
        ours |= _unlinear(state, f"{b}.mlp.out", f"{h}.mlp.c_proj", transposed=True)
    return size, {k: v.detach().contiguous() for k, v in ours.items()}


def vit_state_from_vit(hf_model) -> tuple[dict, dict[str, torch.Tensor]]:
    """(our ViT's shape and size, its state dict) from a `ViTForImageClassification`: the inverse of `vit`."""
    config, state = hf_model.config, hf_model.state_dict()
    d, p = config.hidden_size, config.patch_size
    size = {"patch_size": p, "num_classes": config.num_labels,
            "shape": {"n_layer": config.num_hidden_layers, "n_head": config.num_attention_heads, "d_model": d,
                      "dropout": config.hidden_dropout_prob}}
    ours = {"embed.cls_token": state["vit.embeddings.cls_token"],
            "embed.pos_emb": state["vit.embeddings.position_embeddings"],
            "embed.proj.weight": state["vit.embeddings.patch_embeddings.projection.weight"].reshape(d, p * p),
            "embed.proj.bias": state["vit.embeddings.patch_embeddings.projection.bias"],
            **_unnorm(state, "ln_f", "vit.layernorm"), **_unlinear(state, "head", "classifier")}
    for i in range(config.num_hidden_layers):
        h, b = f"vit.layers.{i}", f"blocks.{i}"
        ours |= _unlinear(state, f"{b}.attn.q", f"{h}.attention.q_proj") | _unlinear(state, f"{b}.attn.proj", f"{h}.attention.o_proj")
        ours[f"{b}.attn.kv.weight"] = torch.cat([state[f"{h}.attention.k_proj.weight"], state[f"{h}.attention.v_proj.weight"]])
        ours[f"{b}.attn.kv.bias"] = torch.cat([state[f"{h}.attention.k_proj.bias"], state[f"{h}.attention.v_proj.bias"]])
        ours |= _unnorm(state, f"{b}.ln_1", f"{h}.layernorm_before") | _unnorm(state, f"{b}.ln_2", f"{h}.layernorm_after")
        ours |= _unlinear(state, f"{b}.mlp.fc", f"{h}.mlp.fc1") | _unlinear(state, f"{b}.mlp.out", f"{h}.mlp.fc2")
    return size, {k: v.detach().contiguous() for k, v in ours.items()}
