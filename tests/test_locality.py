"""Locality: with the global order cut into parts, each reader (rank x loader worker)
reads only its own parts' shards. The loader's own count of what it read equals what
`readers.reader_io` (behind `pipeline batches --io`) plans, and stays within
1.25 x corpus / readers + one shard; at cluster size the plan is checked alone."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import readers, shards
from pipeline.data.loader import ShardStream, make_loader
from pipeline.data.order import GlobalOrder, split_global_batch

SHARDS, PER_SHARD = 16, 25
GLOBAL_BATCH, MICRO, BLOCK = 8, 2, 64


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("corpus"))
    infos = [shards.write_shard(f"{d}/part-{s:03d}.tar",
                                ({"__key__": f"s{s:02d}-{i:02d}", "npy": np.full(64, s, np.float32)} for i in range(PER_SHARD)))
             for s in range(SHARDS)]
    shards.write_manifest(d, infos, {"npy": "shard number"}, "test")
    return shards.shard_entries(d)


def _one_epoch_of_reads(entries, partitions, world, workers):
    """{(rank, worker): read requests, (shard, bytes) each} over one epoch as the loader
    counted them, and as `readers.reader_io` plans them."""
    order = GlobalOrder([e["samples"] for e in entries], seed=3, block=BLOCK, partitions=partitions)
    layout = split_global_batch(GLOBAL_BATCH, world, MICRO)
    steps = order.epoch_size // GLOBAL_BATCH
    measured, planned = {}, {}
    for rank in range(world):
        batches = make_loader(ShardStream(entries, order, layout, rank, 0, steps, {"npy": np.asarray}), workers, 2, False)
        for batch in batches:  # every sample batched came from a read counted here
            assert len(batch["__key__"]) == MICRO
            assert all(int(row[0]) == int(key[1:3]) for row, key in zip(batch["npy"], batch["__key__"]))
        for worker in range(workers):
            measured[rank, worker] = batches.reads[worker]
            planned[rank, worker] = readers.reader_io(order, layout, entries, rank, worker, workers, epoch=0)
    return measured, planned


@pytest.mark.parametrize("partitions", [8, 12])  # parts of 2 whole shards; parts that end inside shards
def test_each_reader_reads_its_own_parts_as_planned(corpus, partitions):
    corpus_bytes = sum(e["bytes"] for e in corpus)
    index_bytes = sum(e["index_bytes"] for e in corpus)
    shard_bytes = max(e["bytes"] for e in corpus)
    world, workers = 2, 2
    measured, planned = _one_epoch_of_reads(corpus, partitions, world, workers)
    bound = 1.25 * corpus_bytes / (world * workers) + shard_bytes
    for reader, reads in measured.items():
        plan = planned[reader]
        assert (plan["requests"], plan["shards"]) == (len(reads), len({s for s, _ in reads})), reader
        assert plan["bytes"] == sum(n for _, n in reads) <= bound, (reader, plan, bound)
    # Between them the readers read the corpus about once: a shard at the edge of two
    # parts is read in two byte ranges, never whole twice.
    assert sum(n for reads in measured.values() for _, n in reads) <= corpus_bytes + index_bytes
    assert {s for reads in measured.values() for s, _ in reads} == set(range(SHARDS))

    # One part: every reader reads from every shard (what locality saves).
    measured, planned = _one_epoch_of_reads(corpus, 1, world, workers)
    for reader, reads in measured.items():
        assert {s for s, _ in reads} == set(range(SHARDS)) and planned[reader]["shards"] == SHARDS


def test_at_512_ranks_by_4_workers_every_reader_stays_in_the_bound():
    # 2,048 shards of 1,000 samples (the last one short), 1 kB each, in 2,048 parts.
    sizes = [1000] * 2047 + [500]
    entries = [{"samples": n, "bytes": n * 1000} for n in sizes]
    order = GlobalOrder(sizes, seed=0, block=16384, partitions=2048)
    world, workers = 512, 4
    layout = split_global_batch(2048, world, 2)
    corpus_bytes = sum(e["bytes"] for e in entries)
    bound = 1.25 * corpus_bytes / (world * workers) + 1000 * 1000
    total = 0
    for rank in range(world):
        for worker in range(workers):
            io = readers.reader_io(order, layout, entries, rank, worker, workers, epoch=0)
            assert io["bytes"] <= bound, io
            total += io["bytes"]
    assert total <= 2.01 * corpus_bytes  # a part straddles at most two shards


def test_micro_batches_are_the_same_whatever_the_workers_with_ragged_samples(tmp_path):
    """Workers that own parts send samples of several micro-batches at once, padded to their
    own longest; the micro-batches put back together are padded only to their own longest."""
    import torch

    from pipeline.data.loader import collate

    d = str(tmp_path)
    rng = np.random.default_rng(0)
    infos = [shards.write_shard(f"{d}/part-{s}.tar", ({"__key__": f"s{s}-{i}", "cls": i,
                                                        "npy": rng.normal(size=(int(rng.integers(1, 9)), 3)).astype(np.float32)}
                                                       for i in range(20))) for s in range(4)]
    shards.write_manifest(d, infos, {}, "test")
    entries = shards.shard_entries(d)
    fields = {"npy": np.asarray, "cls": int}
    order = GlobalOrder([e["samples"] for e in entries], seed=1, block=16, partitions=4)
    layout = split_global_batch(GLOBAL_BATCH, 1, MICRO)
    by_key = {s["__key__"]: s for s in shards.iter_verified(d)}
    runs = {}
    for workers in (0, 2):
        runs[workers] = list(make_loader(ShardStream(entries, order, layout, 0, 0, 10, fields), workers, 2, False))
    assert len(runs[0]) == 10 * layout.grad_accum
    padded = 0
    for plain, split in zip(runs[0], runs[2]):
        assert plain["__key__"] == split["__key__"]
        expected = collate([{**by_key[k], "npy": by_key[k]["npy"]} for k in plain["__key__"]], fields)
        for batch in (plain, split):
            assert torch.equal(batch["npy"], expected["npy"]) and torch.equal(batch["cls"], expected["cls"])
            assert "__lengths__" not in batch and "__position__" not in batch
        padded += len({len(by_key[k]["npy"]) for k in plain["__key__"]}) > 1
    assert padded > 0  # some micro-batches did need padding


RANK_READS_ONE_EPOCH = """
import sys
import numpy as np
from pipeline.data import shards
from pipeline.data.loader import ShardStream, make_loader
from pipeline.data.order import GlobalOrder, split_global_batch

directory, rank, world, partitions = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
entries = shards.shard_entries(directory)
order = GlobalOrder([e["samples"] for e in entries], seed=3, block=%d, partitions=partitions)
layout = split_global_batch(%d, world, %d)
stream = ShardStream(entries, order, layout, rank, 0, order.epoch_size // layout.global_batch, {"npy": np.asarray})
print(sum(len(batch["__key__"]) for batch in make_loader(stream, 2, 2, False)))
""" % (BLOCK, GLOBAL_BATCH, MICRO)


def test_on_s3_the_server_counts_each_rank_its_share(tmp_path):
    """Four ranks (a process each, 2 loader workers) read one epoch from moto's S3 server;
    the server counts the bytes of every GET by the rank's access key."""
    import subprocess
    import sys

    from s3server import counting_s3

    from pipeline import storage

    with counting_s3("locality") as (server, env):
        directory = "s3://locality/corpus"
        infos = [shards.write_shard(f"{directory}/part-{s:03d}.tar",
                                    ({"__key__": f"s{s:02d}-{i:02d}", "npy": np.full(64, s, np.float32)} for i in range(PER_SHARD)))
                 for s in range(SHARDS)]
        shards.write_manifest(directory, infos, {}, "test")
        entries = shards.shard_entries(directory)
        manifest_bytes = len(storage.read_bytes(f"{directory}/manifest.json"))
        world, partitions = 4, 8
        for rank in range(world):
            done = subprocess.run([sys.executable, "-c", RANK_READS_ONE_EPOCH, directory, str(rank), str(world), str(partitions)],
                                  env={**env, "AWS_ACCESS_KEY_ID": f"rank{rank}"}, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-2000:]
            assert int(done.stdout) == SHARDS * PER_SHARD // world
        order = GlobalOrder([e["samples"] for e in entries], seed=3, block=BLOCK, partitions=partitions)
        layout = split_global_batch(GLOBAL_BATCH, world, MICRO)
        planned = [sum(readers.reader_io(order, layout, entries, r, w, 2, epoch=0)["bytes"] for w in range(2)) for r in range(world)]
        got = server.bytes_by()

    corpus_bytes = sum(e["bytes"] for e in entries)
    for rank in range(world):
        counted = got[f"rank{rank}"]
        assert planned[rank] + manifest_bytes <= counted <= planned[rank] + manifest_bytes + 2048, (rank, counted, planned)
        assert counted - manifest_bytes <= 1.25 * corpus_bytes / world + max(e["bytes"] for e in entries), (rank, counted)


RANK_READS_THROUGH_A_NODE_CACHE = """
import hashlib, sys
import numpy as np
from pipeline import storage
from pipeline.data import shards
from pipeline.data.loader import ShardStream, make_loader
from pipeline.data.order import GlobalOrder, split_global_batch
from pipeline.data.shard_cache import ShardCache

directory, rank, world, epochs, cache_dir, cache_mb = sys.argv[1:7]
rank, world, epochs = int(rank), int(world), int(epochs)
storage.name_requests(f"rank-{rank}")
entries = shards.shard_entries(directory)
order = GlobalOrder([e["samples"] for e in entries], seed=3, block=%d, partitions=8)
layout = split_global_batch(%d, world, %d)
cache = ShardCache(cache_dir, int(float(cache_mb) * 2**20)) if cache_dir != "-" else None
stream = ShardStream(entries, order, layout, rank, 0, epochs * order.epoch_size // layout.global_batch,
                     {"npy": np.asarray}, disk_cache=cache)
per_epoch = order.epoch_size // layout.global_batch * layout.grad_accum  # this rank's micro-batches
for i, batch in enumerate(make_loader(stream, 2, 2, False)):
    if i %% per_epoch == 0:
        digest = hashlib.sha256()
    digest.update(" ".join(batch["__key__"]).encode())
    digest.update(batch["npy"].numpy().tobytes())
    if (i + 1) %% per_epoch == 0:
        print(digest.hexdigest())  # one line per epoch
""" % (BLOCK, GLOBAL_BATCH, MICRO)


def test_a_node_cache_downloads_each_shard_once_for_all_its_readers(tmp_path):
    """`data.cache_dir`: four ranks of one node (2 loader workers each) read two epochs
    from moto's S3 server at once through one cache directory: the server sends each
    shard once, and every rank gets the batches it reads straight from the bucket. A
    damaged copy is caught on use and read again; a small cache stays within its bound."""
    import subprocess
    import sys

    from s3server import counting_s3

    from pipeline.data.shard_cache import ShardCache

    def tar_bytes(server) -> int:
        return sum(n for (_, path), n in server.got.items() if path.endswith(".tar"))

    def ranks(env, world, epochs, cache, cache_mb=1024.0) -> list[list[str]]:
        procs = [subprocess.Popen([sys.executable, "-c", RANK_READS_THROUGH_A_NODE_CACHE, directory, str(rank), str(world),
                                   str(epochs), cache, str(cache_mb)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for rank in range(world)]
        outs = [p.communicate(timeout=300) for p in procs]
        assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
        return [out.split() for out, _ in outs]  # per rank, a digest of each epoch's batches

    with counting_s3("cached") as (server, env):
        directory = "s3://cached/corpus"
        infos = [shards.write_shard(f"{directory}/part-{s:03d}.tar",
                                    ({"__key__": f"s{s:02d}-{i:02d}", "npy": np.full(64, s * 100 + i, np.float32)}
                                     for i in range(PER_SHARD)))
                 for s in range(SHARDS)]
        shards.write_manifest(directory, infos, {}, "test")
        entries = shards.shard_entries(directory)
        corpus_bytes = sum(e["bytes"] for e in entries)

        direct = ranks(env, 4, 2, "-")
        direct_bytes = tar_bytes(server)
        assert direct_bytes >= 2 * corpus_bytes * 0.8  # two epochs of ranged reads from the bucket
        server.got.clear()
        cache = tmp_path / "node-cache"
        assert ranks(env, 4, 2, str(cache)) == direct  # same batches, every rank
        print(f"two epochs, 4 ranks x 2 loader workers: {direct_bytes} bytes of shards from the bucket, "
              f"{tar_bytes(server)} through the node cache (corpus {corpus_bytes})")
        assert tar_bytes(server) == corpus_bytes  # each shard sent once, for the node's 8 readers and 2 epochs
        assert ShardCache(str(cache), 1 << 30).held_bytes() == corpus_bytes

        one_epoch = [epochs[:1] for epochs in direct]
        damaged = sorted(cache.glob("*.tar"))[0]
        data = bytearray(damaged.read_bytes())
        data[len(data) // 2] ^= 0xFF
        damaged.write_bytes(bytes(data))
        server.got.clear()
        assert ranks(env, 4, 1, str(cache)) == one_epoch
        [name] = [e["name"] for e in entries if e["sha256"] == damaged.name.removesuffix(".tar")]
        assert {path for (_, path), n in server.got.items() if path.endswith(".tar") and n} == {f"/cached/corpus/{name}"}

        room = 3 * max(e["bytes"] for e in entries)  # a cache with room for three shards of sixteen
        small = tmp_path / "small-cache"
        assert ranks(env, 4, 1, str(small), room / 2**20) == one_epoch
        assert 0 < ShardCache(str(small), room).held_bytes() <= room
