"""One test per stage, on the tiny config, with real Ray, DeepSpeed, MLflow and tar shards.

The tests share a workdir: each runs its stage, and upstream stages already
run by an earlier test are cache hits.
"""

from __future__ import annotations

import json
import math
import os
import subprocess

import numpy as np
import pytest
import torch

from conftest import VENV_BIN, stage_fingerprint

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.data import shards, sources


def _mlflow_history(summary, stage, key):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    parent = summary["mlflow_run_id"]
    runs = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.stage = '{stage}'",
    )
    assert len(runs) == 1, f"expected one nested MLflow run for {stage}"
    run = runs[0]
    if "produced_by_run" in run.data.tags:  # cached here (another test ran it first): read the producer
        run = client.get_run(run.data.tags["produced_by_run"])
    history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
    return run, [(m.step, m.value) for m in history]


def test_shard(run_local):
    summary = run_local(["shard"])
    out = summary["stages"]["shard"]["outputs"]
    for name in ("mnist_train", "mnist_val", "mnist_test", "grids_train", "grids_val", "grids_test", "text_train", "text_val"):
        list(shards.iter_verified(out[name]))  # sha256 and sizes match the manifest

    keys = {split: {s["__key__"] for s in shards.iter_verified(out[f"mnist_{split}"])}
            for split in ("train", "val", "test")}
    assert {k: len(v) for k, v in keys.items()} == {"train": 3600, "val": 400, "test": 1000}
    assert not (keys["train"] & keys["val"]) | (keys["train"] & keys["test"]) | (keys["val"] & keys["test"])
    for split, split_keys in keys.items():
        assert all(sources.split_of(int(k.split("-")[1])) == split for k in split_keys)

    images, labels = sources.load_mnist()
    for split, count in (("train", 256), ("val", 200), ("test", 64)):
        grids = list(shards.iter_verified(out[f"grids_{split}"]))
        assert len(grids) == count
        for g in grids:
            idx = np.array([[int(key.split("-")[1]) for key in row] for row in g["json"]["digit_keys"]])
            # Grids use only their own split's digits: no test or validation digit reaches training.
            assert all(sources.split_of(i) == split for i in idx.ravel())
            rows = g["txt"].split("\n")
            assert [len(r) for r in rows] == [g["json"]["cols"]] * g["json"]["rows"] and 1 <= len(rows) <= 3
            assert g["png"].shape == (28 * len(rows), 28 * len(rows[0]))
            for r, row in enumerate(rows):
                for c, ch in enumerate(row):
                    cell = g["png"][28 * r : 28 * (r + 1), 28 * c : 28 * (c + 1)]
                    if ch == "_":
                        assert cell.max() == 0
                    else:
                        assert int(ch) == labels[idx[r, c]] and np.array_equal(cell, images[idx[r, c]])

    texts = [s["txt"] for s in shards.iter_verified(out["text_val"])]
    assert texts and all(isinstance(t, str) and t for t in texts)


def test_a_copied_workdir_reads_its_own_outputs(run_local, tiny_config, tmp_path):
    """stage.json names outputs relative to the workdir: a copy is whole on its own."""
    import shutil

    from pipeline.fanout import LocalFanOut
    from pipeline.runner import run_pipeline
    from pipeline.tracking import InMemoryTracker

    run_local(["tokenize"])
    copy = tmp_path / "moved"
    shutil.copytree(run_local.workdir, copy)
    summary = run_pipeline(tiny_config(), ["tokenize"], str(copy), tracker=InMemoryTracker(), fan_out=LocalFanOut())
    assert {s["status"] for s in summary["stages"].values()} == {"cached"}
    for stage in summary["stages"].values():
        assert all(path.startswith(f"{copy}/") and os.path.exists(path) for path in stage["outputs"].values())
    record = json.loads((copy / "tokenize" / os.listdir(copy / "tokenize")[0] / "stage.json").read_text())
    assert record["outputs"]["tokenizer"] == f"tokenize/{os.listdir(copy / 'tokenize')[0]}/tokenizer.json"


def test_tokenize(run_local, tiny_config, tmp_path):
    from tokenizers import Tokenizer

    from pipeline.fanout import LocalFanOut
    from pipeline.preprocess.tokenize import END_OF_TEXT
    from pipeline.runner import run_pipeline
    from pipeline.tracking import InMemoryTracker

    summary = run_local(["tokenize"])
    out = summary["stages"]["tokenize"]["outputs"]
    tokenizer = Tokenizer.from_file(out["tokenizer"])
    assert tokenizer.get_vocab_size() == 1024
    seqs = [s["npy"] for s in shards.iter_verified(out["tokens_val"])]
    assert seqs and all(s.shape == (65,) for s in seqs)

    # Token shard i is text shard i (the shards are encoded largest first): the first packed
    # sequence of each decodes back to the start of the text shard's documents.
    summary = run_pipeline(tiny_config("data.text.docs_per_shard=5"), ["tokenize"], str(tmp_path),
                           tracker=InMemoryTracker(), fan_out=LocalFanOut())
    out = summary["stages"]["tokenize"]["outputs"]
    tokenizer = Tokenizer.from_file(out["tokenizer"])
    text = {split: shards.shard_entries(summary["stages"]["shard"]["outputs"][f"text_{split}"]) for split in ("train", "val")}
    sizes = [e["bytes"] for split in ("train", "val") for e in text[split]]
    assert sizes != sorted(sizes, reverse=True)  # so largest first is another order
    for split in ("train", "val"):
        tokens = shards.shard_entries(out[f"tokens_{split}"])
        assert len(text[split]) == len(tokens) > 2
        for text_shard, token_shard in zip(text[split], tokens):
            docs = END_OF_TEXT.join(s["txt"] for s in shards.iter_shard(text_shard["path"], text_shard))
            first = next(shards.iter_shard(token_shard["path"], token_shard))["npy"].tolist()
            decoded = tokenizer.decode(first, skip_special_tokens=False)
            assert docs.startswith(decoded[:100]) and len(decoded) > 100, (split, token_shard["name"])


def test_patchify(run_local):
    summary = run_local(["patchify"])
    raw = summary["stages"]["shard"]["outputs"]
    out = summary["stages"]["patchify"]["outputs"]
    for name in ("mnist_test", "grids_test", "grids_2x2_test"):
        originals = list(shards.iter_verified(raw[name]))
        patched = list(shards.iter_verified(out[name]))
        assert [s["__key__"] for s in originals] == [s["__key__"] for s in patched]
        for o, p in zip(originals[:20], patched[:20]):
            rows, cols = o["png"].shape[0] // 7, o["png"].shape[1] // 7  # patches down and across
            assert p["npy"].shape == (rows * cols, 49)
            # Undo the patching and the normalisation: the original pixels come back.
            image = p["npy"].astype(np.float32).reshape(rows, cols, 7, 7).transpose(0, 2, 1, 3).reshape(rows * 7, cols * 7)
            pixels = (image * 0.3081 + 0.1307) * 255
            assert np.abs(pixels - o["png"]).max() < 2.0
            assert p.get("cls") == o.get("cls") and p.get("txt") == o.get("txt")


def test_pretrain_gpt_zero3(run_tiny):
    summary = run_tiny(["pretrain_gpt"])
    stage = summary["stages"]["pretrain_gpt"]
    run, losses = _mlflow_history(summary, "pretrain_gpt", "loss")
    assert len(losses) == 6 and losses[-1][1] < losses[0][1] - 0.5, losses
    params = run.data.params
    assert params["zero_stage"] == "3" and params["world_size"] == "2"
    assert int(params["params_total"]) > int(params["params_non_embedding"]) > 0

    _, tokens = _mlflow_history(summary, "pretrain_gpt", "tokens")
    _, flops = _mlflow_history(summary, "pretrain_gpt", "flops")
    assert tokens[-1] == (30, 30 * 16 * 2 * 64)  # steps x micro batch x workers x seq_len
    # The FLOPs axis is the accounting test_units holds against torch's FlopCounterMode.
    from pipeline.models.flops import gpt_flops_per_sequence, matmul_params
    from pipeline.kinds import load_trained

    trained = load_trained(stage["outputs"]["model_config"], stage["outputs"]["weights"])[2]
    per_token = gpt_flops_per_sequence(matmul_params(trained), 2, 64, 128) / 64
    assert flops[-1][1] == pytest.approx(tokens[-1][1] * per_token, rel=1e-9)

    # Every rank's ZeRO-3 shard is in the reported checkpoint.
    files = os.listdir(os.path.join(stage["outputs"]["checkpoint"], "state"))
    assert {f for f in files if f.startswith("zero_pp_rank_")} >= {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}

    # The exported safetensors reproduce the training loss level on training data.
    from pipeline.kinds import load_trained

    model = load_trained(stage["outputs"]["model_config"], stage["outputs"]["weights"])[2]
    seqs = torch.from_numpy(np.stack([s["npy"].astype(np.int64) for s in shards.iter_verified(summary["stages"]["tokenize"]["outputs"]["tokens_train"])][:64]))
    with torch.no_grad():
        _, loss = model(seqs[:, :-1], seqs[:, 1:])
    assert abs(float(loss) - losses[-1][1]) < 0.5


def test_pretrain_vit(run_tiny):
    summary = run_tiny(["pretrain_vit"])
    run, losses = _mlflow_history(summary, "pretrain_vit", "loss")
    assert losses[-1][1] < losses[0][1] - 0.3, losses
    assert run.data.params["zero_stage"] == "2"
    _, images = _mlflow_history(summary, "pretrain_vit", "images")
    assert images[-1] == (40, 40 * 64 * 2)
    with open(summary["stages"]["pretrain_vit"]["outputs"]["loss_plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_finetune_starts_from_the_pretrained_vit(run_tiny):
    from safetensors.torch import load_file

    summary = run_tiny(["finetune"])
    _, losses = _mlflow_history(summary, "finetune", "loss")
    assert losses[-1][1] < losses[0][1] - 0.3, losses
    vit = load_file(summary["stages"]["pretrain_vit"]["outputs"]["weights"])
    cap = load_file(summary["stages"]["finetune"]["outputs"]["weights"])
    # The encoder moved from the pretrained weights, but only a little (lr scale 0.1).
    w0, w1 = vit["embed.proj.weight"], cap["encoder.embed.proj.weight"]
    assert not torch.equal(w0, w1)
    assert float((w1 - w0).norm() / w0.norm()) < 0.5


def test_finetune_starts_its_decoder_from_a_text_model_named_by_a_relative_path(run_tiny, tiny_config, tmp_path,
                                                                            monkeypatch):
    """`finetune.init_decoder` relative to where `pipeline run` started: the workers, which
    start elsewhere, read the same file: the decoder trains from the text model's weights."""
    from safetensors.torch import load_file, save_file

    from pipeline.models.captioner import MAX_TEXT_LEN, VOCAB
    from pipeline.models.gpt import GPT
    from pipeline.train.checkpoint import unique_state

    torch.manual_seed(3)
    text = unique_state(GPT(len(VOCAB), MAX_TEXT_LEN + 1, tiny_config().finetune.decoder))
    monkeypatch.chdir(tmp_path)
    save_file(text, "text.safetensors")
    # A small learning rate, so that where the weights started still shows after training.
    summary = run_tiny(["finetune"], "finetune.init_decoder=text.safetensors", "finetune.train.lr=3e-4",
                       "finetune.train.max_steps=10")
    cap = load_file(summary["stages"]["finetune"]["outputs"]["weights"])
    fresh = load_file(run_tiny(["finetune"])["stages"]["finetune"]["outputs"]["weights"])
    for name in ("tok_emb.weight", "blocks.1.mlp.fc.weight"):
        moved = float((cap[name] - text[name]).norm() / text[name].norm())
        assert 0 < moved < 0.5 < float((fresh[name] - text[name]).norm() / text[name].norm()), (name, moved)


def test_evaluate(run_tiny):
    """The flagship's evaluation paths on the tiny run (ragged training grids with blanks,
    fixed 2x2 evaluation grids): every set and split scored, accuracy by rows, the
    pictures; and the scores are what `pipeline predict` writes on the raw test images."""
    from PIL import Image

    from pipeline.predict import load_captioner, predict
    from pipeline.scoring import accuracy_by, score_grids

    summary = run_tiny(["evaluate_gpt", "evaluate"])
    metrics = {**summary["stages"]["evaluate_gpt"]["metrics"], **summary["stages"]["evaluate"]["metrics"]}
    assert metrics["gpt_val_ppl"] == pytest.approx(math.exp(metrics["gpt_val_loss"]))
    assert metrics["vit_test_accuracy"] > 0.3  # 40 steps: far above the 0.1 of chance
    for stage in ("evaluate_gpt", "evaluate"):
        written = storage.read_json(summary["stages"][stage]["outputs"]["metrics"])
        assert written == json.loads(json.dumps(summary["stages"][stage]["metrics"]))
    for prefix, grids in (("captioner_", 64), ("captioner_val_", 200), ("captioner_2x2_", 64), ("captioner_2x2_val_", 32)):
        assert metrics[f"{prefix}grids"] == grids, prefix

    # The ragged test grids read from their raw images through `pipeline predict`'s path
    outputs = summary["stages"]["shard"]["outputs"]
    test = list(shards.iter_verified(outputs["grids_test"]))
    trained = load_captioner(summary["stages"]["finetune"]["outputs"]["checkpoint"])
    written = ["\n".join(rows) for rows in predict(trained, [s["png"] for s in test], batch_size=100)]
    targets = [s["txt"] for s in test]
    assert len({t.count("\n") for t in targets}) == 3  # 1, 2 and 3 rows
    for key, value in score_grids(written, targets).items():
        assert metrics[key] == pytest.approx(value, abs=0.02), key  # padding may differ: a near tie may flip
    by_rows = accuracy_by(written, targets, lambda rows: len(rows))
    assert {r: metrics[f"captioner_cell_accuracy_rows{r}"] for r in by_rows} == pytest.approx(by_rows, abs=0.05)
    assert not any(k.startswith("captioner_2x2_cell_accuracy_rows") for k in metrics)  # one shape: no split by rows

    pictures = summary["stages"]["evaluate"]["outputs"]
    for name in ("samples", "confusion", "attention", "accuracy_by_shape"):
        with Image.open(storage.open_file(pictures[name])) as picture:
            assert picture.format == "PNG" and min(picture.size) > 200, name
    examples = storage.read_json(summary["stages"]["evaluate"]["outputs"]["captioner_examples"])
    assert len(examples) == 16 and all(set(e) == {"key", "target", "predicted"} for e in examples)
    wrong = [e["predicted"] != e["target"] for e in examples]
    assert wrong == sorted(wrong, reverse=True)  # mistakes first

    # While settings are chosen: the validation splits alone, the same numbers (at another
    # batch size too), nothing of test read
    val_only = run_tiny(["evaluate"], "evaluate.test=false", "evaluate.batch_size=50")["stages"]["evaluate"]
    assert val_only["metrics"] == {k: v for k, v in summary["stages"]["evaluate"]["metrics"].items()
                                   if k.startswith(("vit_val_", "captioner_val_", "captioner_2x2_val_"))}
    val_keys = {s["__key__"] for s in shards.iter_verified(outputs["grids_val"])}
    assert {e["key"] for e in storage.read_json(val_only["outputs"]["captioner_examples"])} <= val_keys
    # Two CPUs (two torch threads): the same numbers; more than the cluster has: refused.
    both = run_tiny(["evaluate_gpt"], "evaluate.num_cpus=2")["stages"]["evaluate_gpt"]["metrics"]
    assert both["gpt_val_loss"] == pytest.approx(metrics["gpt_val_loss"], rel=1e-5)
    with pytest.raises(ConfigError, match="evaluate.num_cpus is 3 but the Ray cluster has 2 CPUs"):
        run_tiny(["evaluate_gpt"], "evaluate.num_cpus=3")


def test_a_changed_stage_reruns_with_what_depends_on_it_and_report_reads_both_runs(run_tiny, tiny_workdir):
    """A change to the fine-tune's config re-runs the fine-tune and the evaluation that reads
    it, nothing upstream. `pipeline report`: the latest run's table, cached stages with their
    producer's numbers; `--compare`: the config key and the metrics that differ, nothing else."""
    from pipeline.runner import PIPELINE_ORDER

    first = run_tiny(PIPELINE_ORDER)
    changed = run_tiny(PIPELINE_ORDER, "finetune.train.max_steps=7")  # 7: no other test trains it
    ran = {"finetune", "evaluate"}
    assert {name: s["status"] for name, s in changed["stages"].items()} == {
        name: "ran" if name in ran else "cached" for name in PIPELINE_ORDER}
    assert changed["stages"]["finetune"]["outputs"]["checkpoint"] != first["stages"]["finetune"]["outputs"]["checkpoint"]

    def report(*args):
        done = subprocess.run([str(VENV_BIN / "pipeline"), "report", "--workdir", tiny_workdir, *args],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    table = report()
    assert changed["mlflow_run_id"] in table.splitlines()[0]  # the latest pipeline run
    rows = {line.split()[0]: line for line in table.splitlines()[4:]}  # after the title, a blank line, the header
    assert list(rows) == PIPELINE_ORDER
    finetune_loss = changed["stages"]["finetune"]["metrics"]["final_loss"]
    assert rows["finetune"].split()[1] == "ran" and f"final_loss={finetune_loss:.4g}" in rows["finetune"]
    gpt_loss = first["stages"]["pretrain_gpt"]["metrics"]["final_loss"]
    assert rows["pretrain_gpt"].split()[1] == "cached" and f"final_loss={gpt_loss:.4g}" in rows["pretrain_gpt"]
    assert f"made by {first['stages']['pretrain_gpt']['mlflow_run_id'][:8]}" in rows["pretrain_gpt"]

    diff = report("--compare", first["mlflow_run_id"], changed["mlflow_run_id"])
    config_rows = [line.split() for line in diff.split("\n\n")[1].splitlines()[2:]]
    assert config_rows == [["finetune.train.max_steps", "30", "7"]]
    metric_rows = {line.split()[0] for line in diff.split("\n\n")[2].splitlines()[2:]}
    assert "finetune/final_loss" in metric_rows and "evaluate/captioner_per_digit_accuracy" in metric_rows
    assert not {m for m in metric_rows if m.startswith(("pretrain_", "shard/", "evaluate_gpt/"))}, metric_rows


def test_failed_stage_leaves_no_output(run_local):
    from pipeline.data.sources import SourceError

    run_local(["shard"])
    with pytest.raises(SourceError, match="data.text.paths"):
        run_local(["shard"], "data.text.source=files", "data.text.paths=[/nonexistent/*.txt]")
    shard_dirs = os.listdir(os.path.join(run_local.workdir, "shard"))
    assert len(shard_dirs) == 1  # the finished one; the failed one left nothing
    for d in shard_dirs:
        assert os.path.exists(os.path.join(run_local.workdir, "shard", d, "stage.json")), d


def test_ray_tasks_write_what_the_local_fan_out_writes(run_local, run_tiny):
    """The fast seam changes where the data stages run, not what they write: the same
    fingerprints and the same bytes (every shard's sha256) under real Ray tasks."""
    local, ray = run_local(["patchify", "tokenize"])["stages"], run_tiny(["patchify", "tokenize"])["stages"]
    for stage in ("shard", "patchify", "tokenize"):
        assert local[stage]["outputs"].keys() == ray[stage]["outputs"].keys()
        for name, path in local[stage]["outputs"].items():
            assert stage_fingerprint(stage, path) == stage_fingerprint(stage, ray[stage]["outputs"][name])
            if name == "tokenizer":
                assert open(path).read() == open(ray[stage]["outputs"][name]).read()
                continue
            ours, theirs = shards.read_manifest(path), shards.read_manifest(ray[stage]["outputs"][name])
            assert [s["sha256"] for s in ours["shards"]] == [s["sha256"] for s in theirs["shards"]], (stage, name)


def test_pipeline_batches_reproduces_the_digests_training_logged(run_tiny, tiny_workdir, capsys):
    from pipeline import cli
    from pipeline.data.order import batch_digest
    from conftest import SMOKE, TINY_OVERRIDES

    from mlflow.tracking import MlflowClient

    summary = run_tiny(["pretrain_vit"])  # a cache hit here: the digests are in the run that trained it
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    producer = summary["stages"]["pretrain_vit"]["mlflow_run_id"]
    logged = sorted((m.step, m.value) for m in client.get_metric_history(producer, "batch_digest"))
    assert len(logged) == 8  # log_every 5 over 40 steps
    capsys.readouterr()
    argv = ["batches", str(SMOKE), "--stage", "pretrain_vit", "--steps", "1:41", "--json", "--workdir", tiny_workdir]
    assert cli.main(argv + TINY_OVERRIDES) == 0
    steps = {b["step"]: b for b in map(json.loads, capsys.readouterr().out.splitlines())}
    assert sorted(steps) == list(range(1, 41))
    for step, digest in logged:
        assert steps[step]["digest"] == digest
        assert batch_digest(k for keys in steps[step]["ranks"] for k in keys) == digest
    # Two ranks of 64: the world size the config trains at.
    assert [len(keys) for keys in steps[1]["ranks"]] == [64, 64]

    # Split four ways, the same global batches.
    assert cli.main(argv + ["--world-size", "4"] + TINY_OVERRIDES) == 0
    four = {b["step"]: b for b in map(json.loads, capsys.readouterr().out.splitlines())}
    for step in steps:
        assert [len(k) for k in four[step]["ranks"]] == [32] * 4
        assert sorted(sum(four[step]["ranks"], [])) == sorted(sum(steps[step]["ranks"], []))

    # The MNIST source is sorted by class; every batch mixes classes (keys name the digit's index).
    labels = sources.load_mnist()[1]
    for b in steps.values():
        classes = {int(labels[int(k.split("-")[1])]) for keys in b["ranks"] for k in keys}
        assert len(classes) >= 8


def test_pipeline_batches_refuses_a_world_size_that_does_not_divide(capsys, tiny_workdir):
    from pipeline import cli
    from conftest import SMOKE, TINY_OVERRIDES

    assert cli.main(["batches", str(SMOKE), "--stage", "pretrain_vit", "--steps", "1:3", "--world-size", "3",
                     "--workdir", tiny_workdir] + TINY_OVERRIDES) == 2
    assert "--world-size 3: global batch 128 does not split into 3 ranks" in capsys.readouterr().err


def test_pipeline_batches_io_prints_what_each_reader_reads(run_tiny, tiny_workdir, capsys):
    from pipeline import cli
    from conftest import SMOKE, TINY_OVERRIDES

    entries = shards.shard_entries(run_tiny(["patchify"])["stages"]["patchify"]["outputs"]["mnist_train"])
    corpus = sum(e["bytes"] for e in entries)
    argv = ["batches", str(SMOKE), "--stage", "pretrain_vit", "--io", "--json", "--world-size", "4", "--workdir",
            tiny_workdir] + TINY_OVERRIDES + ["pretrain_vit.train.loader_workers=2"]
    per_parts = {}
    for parts in (1, 8):
        capsys.readouterr()
        assert cli.main(argv + [f"pretrain_vit.train.data_partitions={parts}"]) == 0
        readers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(r["rank"], r["worker"]) for r in readers] == [(r, w) for r in range(4) for w in range(2)]
        per_parts[parts] = readers
    # One part: each of the 8 readers reads from every shard. Eight: about an eighth each.
    assert all(r["shards"] == len(entries) for r in per_parts[1])
    bound = 1.25 * corpus / 8 + max(e["bytes"] + e["index_bytes"] for e in entries)
    assert all(r["bytes"] <= bound for r in per_parts[8]), (per_parts[8], bound)
    assert sum(r["bytes"] for r in per_parts[8]) < 0.5 * sum(r["bytes"] for r in per_parts[1])
