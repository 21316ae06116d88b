"""The captioner on grids of mixed shapes: padding changes nothing, the KV cache
changes nothing, the decoder's cursor counts cells; `pipeline predict` refuses
images outside the grid convention with one line naming the file."""

import subprocess

import numpy as np
import pytest
import torch

from pipeline.config import TransformerConfig
from pipeline.data.loader import collate
from pipeline.models.captioner import FIRST_CELL, FIRST_DIGIT, SURE, Captioner, encode_text
from pipeline.models.patches import shifted, to_patches
from pipeline.models.vit import ViT
from pipeline.predict import ImageError, read_grid_image

from conftest import VENV_BIN

SHAPES = [(1, 1), (3, 5), (10, 10), (2, 2)]


def tiny_captioner(seed: int = 0, head_logits: bool = False, head_shift: int = 0, pool: str = "cls") -> Captioner:
    torch.manual_seed(seed)
    encoder = ViT(16, 49, 10, TransformerConfig(n_layer=1, n_head=2, d_model=16), pool=pool)
    return Captioner(encoder, TransformerConfig(n_layer=2, n_head=2, d_model=24), patch_grid=4,
                     head_logits=head_logits, head_shift=head_shift).eval()


def _grid(rows: int, cols: int, rng) -> tuple[torch.Tensor, str]:
    patches = torch.from_numpy(rng.standard_normal((rows * cols * 16, 49)).astype(np.float32))
    text = "\n".join("".join(str(d) for d in rng.integers(0, 10, cols)) for _ in range(rows))
    return patches, text


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_the_captioner_reads_each_cell_as_its_vit_head_does(pool):
    """The cell logits the captioner adds are the ViT's own logits for the cell, with the
    head reading what it was trained on (`pretrain_vit.pool`), and the pools differ."""
    model = tiny_captioner(head_logits=True, pool=pool)
    patches, _ = _grid(2, 3, np.random.default_rng(0))
    shapes = torch.tensor([[2, 3]])
    with torch.no_grad():
        memory = model.encode(patches[None], shapes)
        own, _ = model.encoder(model.cells(patches[None], shapes))
        model.encoder.pool = "mean" if pool == "cls" else "cls"
        other, _ = model.encoder(model.cells(patches[None], shapes))
    torch.testing.assert_close(memory.cell_logits[0, :6], own)
    assert (own - other).abs().max() > 1e-3


@pytest.mark.parametrize("head_logits", [False, True])
def test_a_batch_of_mixed_shapes_gives_each_grid_its_own_logits(head_logits):
    model = tiny_captioner(head_logits=head_logits)
    rng = np.random.default_rng(0)
    grids = [_grid(r, c, rng) for r, c in SHAPES]
    ids = [torch.tensor(encode_text(t)) for _, t in grids]
    batch = collate([{"__key__": str(i), "npy": p.numpy(), "ids": np.pad(x.numpy(), (0, 120 - len(x)))}
                     for i, ((p, _), x) in enumerate(zip(grids, ids))], {"npy": None, "ids": None})
    assert batch["npy"].shape == (4, 1600, 49)  # padded to the 10x10 grid's patches
    shapes = torch.tensor(SHAPES)
    together, _ = model(batch["npy"], shapes, batch["ids"][:, :111])
    for i, ((patches, _), x) in enumerate(zip(grids, ids)):
        alone, _ = model(patches[None], shapes[i : i + 1], x[None])
        torch.testing.assert_close(together[i, : len(x)], alone[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("head_logits", [False, True])
def test_kv_cache_decodes_what_full_recomputation_decodes(head_logits):
    model = tiny_captioner(seed=3, head_logits=head_logits)
    with torch.no_grad():  # a bias towards cells, so an untrained model writes long texts
        model.lm_head.weight[4:] += 0.05
    rng = np.random.default_rng(1)
    grids = [_grid(r, c, rng)[0] for r, c in SHAPES]
    padded = torch.nn.utils.rnn.pad_sequence(grids, batch_first=True)
    cached = model.generate(padded, torch.tensor(SHAPES))
    assert cached == model.generate(padded, torch.tensor(SHAPES), use_cache=False)
    assert max(len(t) for t in cached) > 20


def test_head_logits_add_the_encoder_head_on_the_cell_being_written_to_the_digits_only():
    with_head, without = tiny_captioner(seed=5, head_logits=True), tiny_captioner(seed=5)
    rows, cols = 3, 4
    patches, text = _grid(rows, cols, np.random.default_rng(2))
    ids = torch.tensor([encode_text(text)])
    shapes = torch.tensor([[rows, cols]])
    with torch.no_grad():
        added = with_head(patches[None], shapes, ids[:, :-1])[0] - without(patches[None], shapes, ids[:, :-1])[0]
        cells = with_head.cells(patches[None], shapes)
        head = with_head.encoder(cells)[0]  # (cells, 10), row order
    added = added[0]  # position t predicts ids[t + 1]
    cell = 0
    for t, next_id in enumerate(ids[0, 1:].tolist()):
        if next_id >= FIRST_CELL:  # writing a cell: its own head logits on the digits, nothing else
            torch.testing.assert_close(added[t, FIRST_DIGIT:], head[cell], atol=1e-5, rtol=1e-5)
            assert added[t, :FIRST_DIGIT].abs().max() < 1e-6
            cell += 1
        else:  # a newline or the end: past a row's last cell, where no cell is read
            assert added[t].abs().max() < 1e-6
    assert cell == rows * cols


def test_shifted_moves_a_pixel_one_step_each_way_and_repeats_the_edge():
    image = torch.zeros(1, 5, 6)
    image[0, 2, 3] = 1.0
    image[0, :, 0] = 0.5  # the left edge column
    moved = shifted(image, 1)
    where = [tuple(torch.nonzero(view[0] == 1.0)[0].tolist()) for view in moved]
    assert sorted(where) == sorted([(2, 2), (2, 4), (1, 3), (3, 3)])
    assert all(view.shape == image.shape for view in moved)
    right = next(v for v, w in zip(moved, where) if w == (2, 4))
    assert bool((right[0, :, :2] == 0.5).all())  # the edge moved inwards is repeated
    assert all(bool((v[0, :, -1] == 0.0).all()) for v in moved)  # never wrapped around


def test_head_shift_averages_the_head_over_cells_moved_a_pixel_at_test_time_only():
    """The added digit logits, in eval mode, are the mean of the head on the cell and on
    the cell moved one pixel each way (built here with np.roll on cells whose border is
    background, where rolling and shifting agree); in training mode, or where the head
    is sure, the head once. (A random head is sure of nothing.)"""
    rows, cols = 2, 3
    rng = np.random.default_rng(4)
    cells = np.zeros((rows * cols, 28, 28), np.float32)
    cells[:, 4:24, 4:24] = rng.standard_normal((rows * cols, 20, 20))
    image = torch.from_numpy(cells.reshape(rows, cols, 28, 28).transpose(0, 2, 1, 3).reshape(rows * 28, cols * 28).copy())
    patches, shapes = to_patches(image, 7)[None], torch.tensor([[rows, cols]])
    ids = torch.tensor([encode_text("123\n456")])
    shifting, once = tiny_captioner(seed=6, head_logits=True, head_shift=1), tiny_captioner(seed=6, head_logits=True)
    plain = tiny_captioner(seed=6)

    def added(model):
        with torch.no_grad():
            return model(patches, shapes, ids[:, :-1])[0][0] - plain(patches, shapes, ids[:, :-1])[0][0]

    moved = [np.roll(cells, step, axis) for axis in (1, 2) for step in (-1, 1)]
    with torch.no_grad():
        views = [shifting.encoder(to_patches(torch.from_numpy(v), 7))[0] for v in (cells, *moved)]
    mean = torch.stack(views).mean(0)
    at_cells = [t for t, next_id in enumerate(ids[0, 1:].tolist()) if next_id >= FIRST_CELL]
    torch.testing.assert_close(added(shifting)[at_cells, FIRST_DIGIT:], mean, atol=1e-5, rtol=1e-5)
    assert (added(shifting) - added(once)).abs().max() > 1e-3  # the views changed something
    shifting.train(), once.train(), plain.train()
    torch.testing.assert_close(added(shifting), added(once))
    shifting.eval(), once.eval(), plain.eval()
    with torch.no_grad():  # a head sure of every cell: nothing is read again
        for model in (shifting, once):
            model.encoder.head.weight.mul_(1e4)
    assert bool((shifting.encoder(to_patches(torch.from_numpy(cells), 7))[0].softmax(-1).amax(-1) > SURE).all())
    torch.testing.assert_close(added(shifting), added(once))


def test_cursor_counts_rows_and_cells_since_the_last_newline():
    ids = torch.tensor([encode_text("12_\n3\n45")[:-1]])  # BOS 1 2 _ \n 3 \n 4 5
    row, col = Captioner.cursor(ids)
    assert row.tolist() == [[0, 0, 0, 0, 1, 1, 2, 2, 2]]
    assert col.tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2]]


def _save(path, array, mode=None):
    from PIL import Image

    Image.fromarray(array, mode).save(path)
    return str(path)


@pytest.mark.parametrize("make, says", [
    (lambda p: _save(p, np.zeros((56, 50), np.uint8)), "width 50 px is not a whole number of 28-pixel cells"),
    (lambda p: _save(p, np.zeros((28 * 11, 28), np.uint8)), "height 308 px is 11 cells; at most 10"),
    (lambda p: _save(p, np.zeros((28, 28, 3), np.uint8)), "a RGB image; grids are grayscale"),
    (lambda p: _save(p, np.full((28, 56), 250, np.uint8)), "mostly light"),
    (lambda p: (p.write_bytes(b"\x89PNG\r\n\x1a\n truncated"), str(p))[1], "not a readable image"),
    (lambda p: str(p.parent / "missing.png"), "no such file"),
])
def test_images_outside_the_convention_are_refused_by_name(tmp_path, make, says):
    path = make(tmp_path / "grid.png")
    with pytest.raises(ImageError, match=says) as e:
        read_grid_image(path)
    assert str(e.value).startswith(path)


def test_a_grid_image_reads_as_its_pixels(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 60, (84, 140), dtype=np.uint8)
    assert np.array_equal(read_grid_image(_save(tmp_path / "g.png", pixels)), pixels)


def test_predict_cli_refuses_a_bad_image_or_checkpoint_in_one_line(tmp_path):
    good = _save(tmp_path / "good.png", np.zeros((28, 56), np.uint8))
    bad = _save(tmp_path / "wide.png", np.zeros((28, 30), np.uint8))

    def predict(*images):
        out = subprocess.run([str(VENV_BIN / "pipeline"), "predict", "--checkpoint", str(tmp_path), *images],
                             capture_output=True, text=True)
        assert out.returncode == 2 and out.stdout == ""
        return out.stderr.strip().splitlines()

    assert predict(good, bad) == [f"predict: {bad}: width 30 px is not a whole number of 28-pixel cells"]
    assert predict(good) == [f"predict: {tmp_path}: no model_config.json and model.safetensors here or in the "
                             "training stage directory above it; pass a training stage's checkpoint "
                             "(stages.<stage>.outputs.checkpoint)"]


def _affine():
    from pipeline.config import AugmentConfig
    from pipeline.train.augment import KeyedAffine

    return KeyedAffine(AugmentConfig(rotate=15, shear=10, scale=0.1, shift=3), seed=0, patch_size=7, background=-0.1307 / 0.3081)


def test_affine_distortion_is_keyed_by_sample_and_epoch_and_stays_in_its_cell():
    from pipeline.preprocess.patchify import patchify

    rng = np.random.default_rng(0)
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 10:18] = rng.integers(100, 255, (16, 8))
    grid = np.zeros((56, 84), np.uint8)
    grid[28:, 28:56] = digit  # one digit, in row 1 column 1 of a 2x3 grid
    as_patches = lambda image: torch.from_numpy(patchify(image, 7, 0.1307, 0.3081))  # noqa: E731
    batch = {"__key__": ["a", "b"], "npy": torch.nn.utils.rnn.pad_sequence([as_patches(grid), as_patches(digit)], batch_first=True),
             "json": torch.tensor([[2, 3], [1, 1]])}
    out = _affine()(batch, np.array([0, 0]))["npy"]
    background = as_patches(np.zeros((56, 84), np.uint8))
    cells = out[0].view(2, 4, 3, 4, 49)
    untouched = [(r, c) for r in range(2) for c in range(3) if (r, c) != (1, 1)]
    for r, c in untouched:  # what moved out of the digit's cell went nowhere else
        torch.testing.assert_close(cells[r, :, c], background.view(2, 4, 3, 4, 49)[r, :, c])
    assert not torch.allclose(cells[1, :, 1], as_patches(grid).view(2, 4, 3, 4, 49)[1, :, 1])
    assert torch.equal(out[1, 16:], batch["npy"][1, 16:])  # the padding after a 1x1 grid stays as it was
    alone = _affine()({k: v[1:] for k, v in batch.items()}, np.array([0]))["npy"]
    torch.testing.assert_close(alone[0, :16], out[1, :16])  # same key, same epoch: same distortion in any batch
    next_epoch = _affine()({k: v[1:] for k, v in batch.items()}, np.array([1]))["npy"]
    assert not torch.allclose(next_epoch[0, :16], out[1, :16])


def test_a_text_only_gpt_starts_the_decoder_and_a_misfit_is_named(tmp_path):
    """`finetune.init_decoder`: a GPT of the decoder's shape and vocabulary gives the decoder
    its embeddings, self-attention, MLPs and final norm; cross-attention stays as it was."""
    from safetensors.torch import save_file

    from pipeline.models.captioner import MAX_TEXT_LEN, VOCAB
    from pipeline.models.gpt import GPT
    from pipeline.train.checkpoint import load_weights, unique_state

    shape = TransformerConfig(n_layer=2, n_head=2, d_model=24)
    torch.manual_seed(1)
    text_model = GPT(len(VOCAB), MAX_TEXT_LEN + 1, shape)
    path = str(tmp_path / "text.safetensors")
    save_file(unique_state(text_model), path)

    captioner = tiny_captioner()
    cross_before = captioner.blocks[0].cross_attn.q.weight.clone()
    load_weights(captioner, path, subset=True)
    for name, want in unique_state(text_model).items():
        assert torch.equal(captioner.get_parameter(name), want), name
    assert torch.equal(captioner.lm_head.weight, text_model.tok_emb.weight)  # still tied
    assert torch.equal(captioner.blocks[0].cross_attn.q.weight, cross_before)

    save_file(unique_state(GPT(len(VOCAB), 64, shape)), path)  # too few positions
    with pytest.raises(ValueError, match=r"pos_emb.weight \(64, 24\), the model's \(111, 24\)"):
        load_weights(tiny_captioner(), path, subset=True)
    with pytest.raises(ValueError, match="missing"):  # a whole model must be whole
        load_weights(tiny_captioner(), str(tmp_path / "text.safetensors"))


def test_the_captioner_returns_its_cross_attention_masked_and_biased_as_it_decodes():
    """Weights the model itself computed: they reproduce its logits, padding of a smaller
    grid in the batch gets none, and the cursor's bonus puts a cell's weight on that cell."""
    model = tiny_captioner(seed=3)
    rng = np.random.default_rng(0)
    (big, big_text), (small, small_text) = _grid(2, 3, rng), _grid(1, 2, rng)
    patches = torch.nn.utils.rnn.pad_sequence([big, small], batch_first=True)
    shapes = torch.tensor([[2, 3], [1, 2]])
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(encode_text(t)) for t in (big_text, small_text)], batch_first=True)
    with torch.no_grad():
        weights = model.cross_attention(patches, shapes, ids)
        memory = model.encode(patches, shapes)
        plain = model.decode(memory, ids)
        kept: list = []
        assert torch.allclose(model.decode(memory, ids, cross_weights=kept), plain, atol=1e-5)
    assert weights.shape == (2, 2, 2, ids.shape[1], memory.tokens.shape[1])  # blocks, grids, heads, T, S
    assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-5)
    real = 1 * 2 + 1  # the small grid's cells and its one edge token; the rest of the memory is padding
    assert weights[:, 1, :, :, real:].abs().max() == 0 and weights[:, 0].min() > 0
    # The first position of the big grid writes cell (0, 0): memory token 0 has the bonus.
    first = weights[:, 0, :, 0]  # blocks, heads, S
    assert (first.argmax(-1) == 0).all()
