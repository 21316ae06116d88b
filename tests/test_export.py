"""`pipeline export --format hf`: each model of the tiny pipeline loads in stock
`transformers` and computes what ours computes, from a real DeepSpeed checkpoint
(the GPT's is ZeRO-3 over 2 ranks, the ViT's ZeRO-2, the captioner's ZeRO-1)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from pipeline.data import shards
from pipeline.geometry import PatchLayout
from pipeline.kinds import load_trained, read_model_config
from pipeline.kinds.captioner import CaptionerModelConfig
from pipeline.kinds.vit import ViTModelConfig
from conftest import VENV_BIN

TOLERANCE = 1e-4  # max abs logit difference, fp32


def _export(checkpoint: str, out) -> str:
    done = subprocess.run([str(VENV_BIN / "pipeline"), "export", "--checkpoint", checkpoint, "--format", "hf",
                           "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _ours(stage: dict):
    return load_trained(stage["outputs"]["model_config"], stage["outputs"]["weights"])[2]


def _grid_images(summary, split_dir: str, count: int):
    """(PIL image, written text) of the first `count` samples of a grid or digit split."""
    from PIL import Image

    samples = list(shards.iter_verified(summary["stages"]["shard"]["outputs"][split_dir]))[:count]
    return [(Image.fromarray(s["png"]), s.get("txt", s.get("cls"))) for s in samples]


def test_gpt_exports_as_stock_gpt2_with_its_tokenizer(run_tiny, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

    summary = run_tiny(["pretrain_gpt"])
    stage = summary["stages"]["pretrain_gpt"]
    assert "exported the gpt" in _export(stage["outputs"]["checkpoint"], tmp_path / "gpt")

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "gpt")
    assert isinstance(hf, GPT2LMHeadModel)
    text = "def add(a, b):\n    return a + b  # a line of Python\n"
    ours_ids = Tokenizer.from_file(summary["stages"]["tokenize"]["outputs"]["tokenizer"]).encode(text).ids
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == ours_ids
    with torch.no_grad():
        ours, _ = _ours(stage)(ids)
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max().item() <= TOLERANCE
    assert ours.std().item() > 0.1  # trained logits, not a degenerate constant
    # Greedy generation runs through transformers' own loop and cache.
    out = hf.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5


def test_vit_exports_as_stock_vit_classifier(run_tiny, tmp_path):
    from transformers import AutoImageProcessor, ViTForImageClassification

    from pipeline.preprocess.patchify import patchify

    summary = run_tiny(["pretrain_vit"])
    stage = summary["stages"]["pretrain_vit"]
    _export(stage["outputs"]["checkpoint"], tmp_path / "vit")

    hf = ViTForImageClassification.from_pretrained(tmp_path / "vit")
    processor = AutoImageProcessor.from_pretrained(tmp_path / "vit")
    digits = _grid_images(summary, "mnist_test", 64)
    pixels = processor([im for im, _ in digits], return_tensors="pt").pixel_values
    assert pixels.shape == (64, 1, 28, 28)
    layout = read_model_config(stage["outputs"]["model_config"])[1].patches
    patches = torch.from_numpy(np.stack([patchify(np.asarray(im), layout.patch_size, layout.mean, layout.std)
                                         for im, _ in digits]))
    with torch.no_grad():
        ours, _ = _ours(stage)(patches)
        theirs = hf(pixel_values=pixels).logits
    assert (ours - theirs).abs().max().item() <= TOLERANCE
    labels = torch.tensor([label for _, label in digits])
    assert (theirs.argmax(-1) == labels).float().mean() > 0.5  # the trained classifier, in HF's hands


@pytest.mark.parametrize("args, key", [({"stem_channels": 8}, "stem_channels"), ({"pool": "mean"}, "pool: mean")])
def test_a_vit_the_stock_classifier_cannot_hold_is_refused_by_name(args, key):
    from pipeline.config import TransformerConfig
    from pipeline.export import ExportError
    from pipeline.export.stock import vit
    from pipeline.kinds import KINDS

    cfg = ViTModelConfig(PatchLayout(7, 0.0, 1.0), TransformerConfig(n_layer=1, n_head=2, d_model=16), **args)
    with pytest.raises(ExportError, match=key):
        vit(KINDS["vit"].build(cfg), cfg)


def test_captioner_exports_as_remote_code_that_generates_the_grid(run_tiny, tmp_path):
    from transformers import AutoImageProcessor, AutoModel

    from pipeline.models.captioner import encode_text
    from pipeline.predict import load_captioner, predict
    from pipeline.preprocess.patchify import patchify

    summary = run_tiny(["finetune"])
    stage = summary["stages"]["finetune"]
    _export(stage["outputs"]["checkpoint"], tmp_path / "captioner")

    hf = AutoModel.from_pretrained(tmp_path / "captioner", trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(tmp_path / "captioner")
    grids = _grid_images(summary, "grids_2x2_test", 16)  # one shape: a batch of equal images
    pixels = processor([im for im, _ in grids], return_tensors="pt").pixel_values
    ids = torch.tensor([encode_text(text) for _, text in grids])
    trained = load_captioner(stage["outputs"]["checkpoint"])
    patches = torch.stack([torch.from_numpy(patchify(np.asarray(im), trained.layout.patch_size, trained.layout.mean, trained.layout.std))
                           for im, _ in grids])
    with torch.no_grad():
        ours, _ = trained.model(patches, torch.tensor([[2, 2]] * len(grids)), ids)
        theirs = hf(pixel_values=pixels, decoder_input_ids=ids).logits
    assert (ours - theirs).abs().max().item() <= TOLERANCE

    written = hf.generate(pixels)
    assert written == predict(trained, [np.asarray(im) for im, _ in grids])
    assert all(len(rows) == 2 for rows in written)  # even the tiny model writes 2x2 grids


def test_a_frozen_encoder_is_in_the_consolidated_weights(run_tiny):
    """At ZeRO 1 DeepSpeed leaves frozen parameters out of its optimizer partitions, so
    `zero_to_fp32` alone drops a frozen captioner encoder (`finetune.encoder_lr_scale: 0`,
    as `configs/digits.yaml` trains); what `pipeline export` reads must still be whole."""
    from safetensors.torch import load_file

    from pipeline.train.checkpoint import consolidated_state

    summary = run_tiny(["finetune"], "finetune.encoder_lr_scale=0", "finetune.train.max_steps=6")
    outputs = summary["stages"]["finetune"]["outputs"]
    final, consolidated = load_file(outputs["weights"]), consolidated_state(outputs["checkpoint"])
    assert any(name.startswith("encoder.") for name in final)
    assert set(consolidated) >= set(final)
    for name, want in final.items():
        assert torch.equal(consolidated[name], want), name


@pytest.mark.parametrize("head_shift, pool", [(0, "cls"), (1, "cls"), (1, "mean")])
def test_a_captioner_with_head_logits_exports_with_them(tmp_path, head_shift, pool):
    """The remote-code folder carries `finetune.head_logits`, `head_shift` and the ViT's
    `pool`: the HF model adds the ViT head's logits (averaged over shifted cells) as ours
    does (a random model: the path, not the training, is tested)."""
    from transformers import AutoModel

    from pipeline.export.remote import write_captioner
    from pipeline.models.captioner import encode_text
    from pipeline.models.patches import to_patches
    from test_captioner import tiny_captioner

    model = tiny_captioner(seed=7, head_logits=True, head_shift=head_shift, pool=pool)
    with torch.no_grad():
        model.encoder.head.weight.mul_(50.0)  # head logits large enough to dominate the digits
    encoder = ViTModelConfig(PatchLayout(7, 0.0, 1.0), model.encoder.cfg, pool=pool)
    write_captioner(model, CaptionerModelConfig(encoder, model.cfg, head_logits=True, head_shift=head_shift), str(tmp_path))
    hf = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).eval()
    image = torch.rand(1, 56, 84)
    ids = torch.tensor([encode_text("123\n456")])

    def logits(variant):
        variant.load_state_dict(model.state_dict())
        return variant(to_patches(image[0], 7)[None], torch.tensor([[2, 3]]), ids)[0]

    with torch.no_grad():
        ours = logits(model)
        theirs = hf(pixel_values=image[None], decoder_input_ids=ids).logits
        plain = logits(tiny_captioner(seed=7, pool=pool))
        unshifted = logits(tiny_captioner(seed=7, head_logits=True, pool=pool))
    assert (ours - theirs).abs().max().item() <= TOLERANCE
    assert (ours - plain).abs().max().item() > 1.0  # the head's path is on, in both
    assert ((ours - unshifted).abs().max().item() > 1e-3) == bool(head_shift)  # and the views, where asked


@pytest.mark.parametrize("name", ["gpt", "vit", "captioner"])
def test_a_kind_reads_back_the_folder_it_exports(name, tmp_path):
    """Each kind's Hugging Face adapter both ways: the config and every tensor come back."""
    from pipeline.config import TransformerConfig
    from pipeline.export import stock
    from pipeline.kinds import KINDS
    from pipeline.kinds.gpt import GPTModelConfig

    kind = KINDS[name]
    shape = TransformerConfig(n_layer=2, n_head=2, d_model=16)
    vit = ViTModelConfig(PatchLayout(7, 0.2, 0.4), shape)
    cfg = {"gpt": GPTModelConfig(50, 12, shape), "vit": vit,
           "captioner": CaptionerModelConfig(vit, TransformerConfig(n_layer=1, n_head=2, d_model=24), True, 1)}[name]
    torch.manual_seed(0)
    model = kind.build(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # every tensor its own values: a swapped pair would show
    if name == "gpt":  # the tokenizer export_hf adds is not the point here
        stock.gpt2(model).save_pretrained(tmp_path)
    else:
        kind.export_hf(model, cfg, str(tmp_path), str(tmp_path))
    read_cfg, read_model = kind.import_hf(str(tmp_path))
    assert read_cfg == cfg
    ours, theirs = model.state_dict(), read_model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
