"""Sources other than the embedded ones, on local data the tests make (no hub at test time):
text from a Hugging Face dataset or local files, digits from a local image folder or
IDX files (and MNIST's own 60,000 training digits in `../shared/data/mnist`, when there).
The driver plans parts from metadata; each part is read on its own."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from PIL import Image

from pipeline.config import MnistConfig, TextConfig
from pipeline.data import idx
from pipeline.data.sources import (
    SourceError,
    folder_digit_samples,
    idx_digit_samples,
    load_mnist,
    plan_idx,
    plan_image_folder,
    plan_text_parts,
    read_text_part,
)


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    rows = [f"document number {i} " * 20 for i in range(30)]
    pq.write_table(pa.table({"content": rows, "id": list(range(30))}), folder / "train.parquet", row_group_size=10)
    (tmp_path / "a.txt").write_text("alpha " * 100)
    (tmp_path / "b.txt").write_text("beta " * 100)
    return tmp_path, rows


def _read_all(cfg):
    return [[text for _, text in read_text_part(cfg, part)] for part in plan_text_parts(cfg, seed=0)]


def test_hf_dataset_is_read_in_disjoint_parts(corpus, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root, rows = corpus
    cfg = TextConfig(source="hf", hf_dataset=str(root / "corpus"), text_field="content", max_bytes=4000, hf_parts=2)
    parts = _read_all(cfg)
    assert len(parts) == 2 and all(parts)
    assert not set(parts[0]) & set(parts[1]) and set(parts[0] + parts[1]) <= set(rows)
    for texts in parts:  # each part stops once past its share of max_bytes
        assert 2000 <= sum(len(t) for t in texts) < 2000 + len(rows[0])


@pytest.mark.parametrize("wanted, parts", [(3, 3), (8, 8), (20, 8)])  # 4 files of 2 row groups each
def test_each_hf_part_streams_only_its_own_files_or_row_groups(tmp_path, monkeypatch, wanted, parts):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "data").mkdir()
    rows = {}
    for f in range(4):
        texts = [f"file {f} row {i} " * 10 for i in range(6)]
        rows.update({t: f for t in texts})
        pq.write_table(pa.table({"text": texts}), tmp_path / "data" / f"train-0000{f}-of-00004.parquet", row_group_size=3)
    cfg = TextConfig(source="hf", hf_dataset=str(tmp_path), hf_config=None, max_bytes=10**9, hf_parts=wanted)
    read = _read_all(cfg)
    assert len(read) == parts and all(read)
    assert sorted(t for part in read for t in part) == sorted(rows)  # every row once: no part streams another's
    if wanted <= 4:  # at least as many files as parts: each file is read whole by one part
        assert all(sum(any(rows[t] == f for t in part) for part in read) == 1 for f in range(4))


def test_hf_loader_names_a_missing_field(corpus, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    root, _ = corpus
    cfg = TextConfig(source="hf", hf_dataset=str(root / "corpus"), hf_parts=1)
    with pytest.raises(SourceError, match="no field 'text'"):
        _read_all(cfg)


def test_local_files_txt_and_parquet_row_groups(corpus):
    root, rows = corpus
    cfg = TextConfig(source="files", paths=[str(root / "*.txt"), str(root / "corpus/train.parquet")],
                     text_field="content", docs_per_shard=1)
    plan = plan_text_parts(cfg, seed=0)
    assert [p.files or p.row_groups for p in plan] == [(str(root / "a.txt"),), (str(root / "b.txt"),), (0, 1, 2)]
    assert sum(_read_all(cfg), []) == ["alpha " * 100, "beta " * 100, *rows]
    # max_bytes is met from metadata: the first row group already passes 700 bytes.
    small = TextConfig(source="files", paths=[str(root / "corpus/train.parquet")], text_field="content", max_bytes=700)
    assert _read_all(small) == [rows[:10]]


def test_local_files_errors_name_the_problem(corpus):
    root, _ = corpus
    with pytest.raises(SourceError, match="matches no file"):
        plan_text_parts(TextConfig(source="files", paths=[str(root / "*.md")]), seed=0)
    with pytest.raises(SourceError, match="no column 'body'"):
        _read_all(TextConfig(source="files", paths=[str(root / "corpus/train.parquet")], text_field="body"))


@pytest.fixture
def digit_folder(tmp_path):
    """25 real MNIST digits per class, one sub-folder per class."""
    images, labels = load_mnist()
    root = tmp_path / "digits"
    for label in range(10):
        (root / str(label)).mkdir(parents=True)
        for n, i in enumerate(np.flatnonzero(labels == label)[:25]):
            Image.fromarray(images[i]).save(root / str(label) / f"img{n:03d}.png")
    return root


def test_image_folder_per_class(digit_folder):
    splits = plan_image_folder(MnistConfig(source="folder", folder=str(digit_folder)))
    assert {s: len(v) for s, v in splits.items()} == {"train": 18 * 10, "val": 2 * 10, "test": 5 * 10}
    assert all(label == int(path.split("/")[-2]) for items in splits.values() for path, label in items)
    samples = list(folder_digit_samples(splits["test"][:3], first=0))
    assert [s["cls"] for s in samples] == [0, 0, 0]
    assert np.array_equal(samples[0]["png"], np.asarray(Image.open(splits["test"][0][0])))


def test_image_folder_with_a_labels_file(digit_folder, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    lines = ["filename,label"]
    for label in range(10):
        for p in sorted((digit_folder / str(label)).iterdir()):
            name = f"{label}_{p.name}"
            p.rename(flat / name)
            lines.append(f"{name},{label}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    splits = plan_image_folder(MnistConfig(source="folder", folder=str(flat), labels_file=str(tmp_path / "labels.csv")))
    assert len(splits["train"]) == 180 and {label for _, label in splits["val"]} == set(range(10))

    (tmp_path / "bad.csv").write_text("filename,label\n0_img000.png,12\n")
    with pytest.raises(SourceError, match=r"bad.csv:1: expected 'filename,label' with a label 0-9"):
        plan_image_folder(MnistConfig(source="folder", folder=str(flat), labels_file=str(tmp_path / "bad.csv")))


@pytest.mark.parametrize("make, message", [
    (lambda p: Image.new("RGB", (28, 28)).save(p), "a RGB image; digits must be grayscale"),
    (lambda p: Image.new("L", (28, 30)).save(p), "28x30 pixels; digits must be 28x28"),
    (lambda p: p.write_bytes(b"not an image"), "not a readable image"),
])
def test_bad_images_are_named(tmp_path, make, message):
    path = tmp_path / "x.png"
    make(path)
    with pytest.raises(SourceError, match=f"x.png: {message}"):
        list(folder_digit_samples([(str(path), 3)], first=0))


def _shard_locally(config, workdir) -> dict:
    """The shard stage in this process (its Ray tasks: `test_stages.test_ray_tasks_write_what_the_local_fan_out_writes`)."""
    from pipeline.fanout import LocalFanOut
    from pipeline.runner import run_pipeline
    from pipeline.tracking import InMemoryTracker

    return run_pipeline(config, ["shard"], str(workdir), tracker=InMemoryTracker(), fan_out=LocalFanOut())


def test_shard_stage_reads_an_image_folder(digit_folder, tmp_path, tiny_config):
    from pipeline.data import shards

    config = tiny_config("data.mnist.source=folder", f"data.mnist.folder={digit_folder}", "data.mnist.samples_per_shard=64")
    summary = _shard_locally(config, tmp_path / "work")
    out = summary["stages"]["shard"]["outputs"]
    train = list(shards.iter_verified(out["mnist_train"]))
    assert len(train) == 180 and len(shards.shard_entries(out["mnist_train"])) == 3
    assert sorted({s["cls"] for s in train}) == list(range(10))
    test_files = {s["json"]["file"] for s in shards.iter_verified(out["mnist_test"])}
    assert len(test_files) == 50 and not test_files & {s["json"]["file"] for s in train}


# --------------------------------------------------------------------------- cluster presets, offline

PRESETS = "configs/cluster"


@pytest.mark.parametrize("preset", ["gpt-124m.yaml", "gpt-1.3b.yaml", "gpt-7b.yaml"])
def test_text_presets_stream_hub_parquet(preset, tmp_path, monkeypatch):
    """The presets' FineWeb-Edu settings (split, text field) on parquet laid out as the hub's."""
    from conftest import REPO

    from pipeline.config import load_config

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = [f"educational text number {i}. " * 30 for i in range(40)]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"text": rows, "id": [str(i) for i in range(40)]}),
                   tmp_path / "data" / "train-00000-of-00001.parquet", row_group_size=8)
    config = load_config(REPO / PRESETS / preset, [f"data.text.hf_dataset={tmp_path}", "data.text.hf_config=null",
                                                   "data.text.max_bytes=1000000000", "data.text.hf_parts=3"])
    parts = _read_all(config.data.text)
    assert len(parts) == 3 and sorted(t for part in parts for t in part) == sorted(rows)


def test_digits_preset_shards_hub_mnist_from_local_parquet(tmp_path, monkeypatch, tiny_config):
    """`ylecun/mnist`'s layout (train/test parquet, an Image feature, labels) through the
    digits preset's source settings and the real shard stage: test digits from the test
    split, validation every 10th train example, grids from the train split's digits."""
    import datasets
    from conftest import REPO

    from pipeline.config import load_config
    from pipeline.data import shards

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    images, labels = load_mnist()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    hub = tmp_path / "mnist"
    for split, index in (("train", range(0, 5000, 25)), ("test", range(7, 5000, 100))):
        table = {"image": [Image.fromarray(images[i]) for i in index], "label": [int(labels[i]) for i in index]}
        datasets.Dataset.from_dict(table, features=features).to_parquet(hub / "data" / f"{split}-00000-of-00001.parquet")

    tiny = tiny_config()  # only to borrow its small text settings
    config = load_config(REPO / PRESETS / "digits-mnist.yaml", [
        f"data.mnist.hf_dataset={hub}", "data.mnist.hf_parts=2", f"data.text.max_bytes={tiny.data.text.max_bytes}",
        "data.grids.train_count=40", "data.grids.val_count=10", "data.grids.test_count=10"])
    out = _shard_locally(config, tmp_path / "work")["stages"]["shard"]["outputs"]
    digits = {split: list(shards.iter_verified(out[f"mnist_{split}"])) for split in ("train", "val", "test")}
    assert {k: len(v) for k, v in digits.items()} == {"train": 180, "val": 20, "test": 50}
    assert all(s["__key__"].startswith("hf-test-") for s in digits["test"])
    by_pixels = {images[i].tobytes(): int(labels[i]) for i in range(5000)}
    assert all(by_pixels[s["png"].tobytes()] == s["cls"] for split in digits.values() for s in split)
    train_keys = {s["__key__"] for s in digits["train"]}
    for grid in shards.iter_verified(out["grids_train"]):
        assert {k for row in grid["json"]["digit_keys"] for k in row} <= train_keys


# --------------------------------------------------------------------------- IDX files

SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"


def _write_idx(path, array, compress=False):
    """An IDX file as MNIST's are written: big-endian magic (0x0803 images, 0x0801 labels),
    one 32-bit size per dimension, the uint8 values."""
    import gzip
    import struct

    magic = 0x0800 + array.ndim
    data = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return str(path)


@pytest.fixture
def idx_files(tmp_path):
    """The first 1,000 embedded digits as IDX files: images gzipped, labels not."""
    images, labels = load_mnist()
    order = np.random.default_rng(0).permutation(len(labels))[:1000]  # mixed classes, as MNIST's file order is
    return (_write_idx(tmp_path / "images.idx.gz", images[order], compress=True),
            _write_idx(tmp_path / "labels.idx", labels[order]), images[order], labels[order])


def test_idx_files_split_class_by_class_and_read_back_exactly(idx_files):
    images_path, labels_path, images, labels = idx_files
    splits = plan_idx(MnistConfig(source="idx", images=images_path, labels=labels_path))
    counts = np.bincount(labels, minlength=10)
    # of each class, in file order: the last 10% test, the 10% before them validation
    assert len(splits["test"]) == sum(round(n * 0.1) for n in counts)
    assert len(splits["val"]) == sum(round(n * 0.2) - round(n * 0.1) for n in counts)
    assert len(splits["train"]) + len(splits["val"]) + len(splits["test"]) == 1000
    for split, items in splits.items():
        assert [i for i, _ in items] == sorted(i for i, _ in items)  # file order kept: no class-sorted shards
        assert {label for _, label in items} == set(range(10)), split
    for c in range(10):
        members = np.flatnonzero(labels == c)
        test = [i for i, label in splits["test"] if label == c]
        assert test == members[len(members) - round(len(members) * 0.1):].tolist()
    samples = list(idx_digit_samples(images_path, splits["val"][:5]))
    assert [s["__key__"] for s in samples] == [f"idx-{i:05d}" for i, _ in splits["val"][:5]]
    assert all(np.array_equal(s["png"], images[i]) and s["cls"] == labels[i] for s, (i, _) in zip(samples, splits["val"]))
    limited = plan_idx(MnistConfig(source="idx", images=images_path, labels=labels_path, train_digits=100))
    assert limited["train"] == splits["train"][:100] and limited["test"] == splits["test"]


@pytest.mark.parametrize("damage, message", [
    (lambda img, lab: (_write_idx(img.parent / "i", np.zeros((3, 27, 28))), lab), "i: images of 28x27 pixels"),
    (lambda img, lab: (lab, lab), "labels.idx: magic number 2049, expected 2051"),
    (lambda img, lab: (img, img), "images.idx.gz: magic number 2051, expected 2049"),
    (lambda img, lab: (img, _write_idx(img.parent / "l", np.full(1000, 10))), "l: label 10 at position 0; labels must be 0-9"),
    (lambda img, lab: (img, _write_idx(img.parent / "l", np.zeros(999))), "holds 1000 images but"),
    (lambda img, lab: (img.parent / "none", lab), "none: cannot read"),
])
def test_bad_idx_files_are_named(idx_files, damage, message):
    from pathlib import Path

    images, labels = damage(Path(idx_files[0]), Path(idx_files[1]))
    idx.read_images.cache_clear()
    with pytest.raises(idx.IdxError, match=message):
        plan_idx(MnistConfig(source="idx", images=str(images), labels=str(labels)))


def test_a_truncated_idx_file_is_named(idx_files, tmp_path):
    cut = tmp_path / "cut.idx"
    cut.write_bytes(idx._read(idx_files[0])[:-5])
    with pytest.raises(idx.IdxError, match="cut.idx: 784011 bytes, the header .1000, 28, 28. says 784016"):
        idx.read_images(str(cut))


def test_shard_stage_reads_idx_files(idx_files, tmp_path, tiny_config):
    from pipeline.data import shards

    images_path, labels_path, images, labels = idx_files
    config = tiny_config("data.mnist.source=idx", f"data.mnist.images={images_path}", f"data.mnist.labels={labels_path}",
                         "data.mnist.samples_per_shard=300")
    outputs = _shard_locally(config, tmp_path / "work")["stages"]["shard"]["outputs"]
    train = list(shards.iter_verified(outputs["mnist_train"]))
    assert len(train) == 800 and all(np.array_equal(s["png"], images[int(s["__key__"][4:])]) for s in train)
    grids = list(shards.iter_verified(outputs["grids_test"]))  # test grids built from the test digits only
    test_keys = {s["__key__"] for s in shards.iter_verified(outputs["mnist_test"])}
    assert grids and all(k in test_keys for g in grids for row in g["json"]["digit_keys"] for k in row)


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"MNIST's IDX files are not at {SHARED_MNIST}")
def test_mnist_training_files_give_about_6000_test_and_6000_validation_digits():
    cfg = MnistConfig(source="idx", images=str(SHARED_MNIST / "train-images-idx3-ubyte.gz"),
                      labels=str(SHARED_MNIST / "train-labels-idx1-ubyte.gz"))
    splits = plan_idx(cfg)
    assert {s: len(v) for s, v in splits.items()} == {"train": 48_000, "val": 6_001, "test": 5_999}  # rounded per class
    # the embedded 5,000 digits are some of these: the first one is in the file
    embedded = load_mnist()[0][0]
    assert (idx.read_images(cfg.images) == embedded).all(axis=(1, 2)).any()
