"""WebDataset shards: manifests, checksums, the decode allow-list, atomic writes."""

import io
import tarfile

import numpy as np
import pytest
import webdataset as wds

from pipeline import storage
from pipeline.data import shards
from pipeline.data.shards import ShardFormatError


def _samples(n):
    for i in range(n):
        yield {"__key__": f"s{i:03d}", "png": np.full((28, 28), i, np.uint8), "cls": i % 10,
               "txt": f"sample {i}", "json": {"i": i}, "npy": np.arange(i + 1, dtype=np.int32)}


def test_roundtrip_and_manifest(tmp_path):
    d = str(tmp_path / "set")
    info = shards.write_shard(f"{d}/a-000000.tar", _samples(5))
    shards.write_manifest(d, [info], {"png": "image"}, "fp")
    got = list(shards.iter_verified(d))
    assert [s["__key__"] for s in got] == [f"s{i:03d}" for i in range(5)]
    assert got[3]["cls"] == 3 and got[3]["txt"] == "sample 3" and got[3]["json"] == {"i": 3}
    assert np.array_equal(got[4]["npy"], np.arange(5)) and got[2]["png"][0, 0] == 2
    manifest = shards.read_manifest(d)
    assert manifest["total_samples"] == 5 and manifest["shards"][0]["bytes"] == (tmp_path / "set/a-000000.tar").stat().st_size


def test_shards_are_readable_by_webdataset_itself(tmp_path):
    path = str(tmp_path / "a.tar")
    shards.write_shard(path, _samples(3))
    keys = [s["__key__"] for s in wds.WebDataset(path, shardshuffle=False)]
    assert keys == ["s000", "s001", "s002"]


def test_same_samples_give_the_same_bytes(tmp_path):
    a = shards.write_shard(str(tmp_path / "a.tar"), _samples(4))
    b = shards.write_shard(str(tmp_path / "b.tar"), _samples(4))
    assert a.sha256 == b.sha256


def test_corrupt_shard_is_caught_by_checksum(tmp_path):
    d = str(tmp_path / "set")
    info = shards.write_shard(f"{d}/a.tar", _samples(3))
    shards.write_manifest(d, [info], {}, "fp")
    raw = bytearray((tmp_path / "set/a.tar").read_bytes())
    raw[600] ^= 0xFF
    (tmp_path / "set/a.tar").write_bytes(bytes(raw))
    with pytest.raises(ShardFormatError, match="a.tar does not match its manifest entry"):
        list(shards.iter_verified(d))


def _tar_with_long_names() -> bytes:
    """A tar of headers written by Python's tarfile (not our writer): a ustar-split name, a
    directory to skip, a GNU long name, a pax long name."""
    out = b""
    directory = tarfile.TarInfo("somedir")
    directory.type = tarfile.DIRTYPE
    for name, form in (("a" * 120 + "/s0.cls", tarfile.USTAR_FORMAT), (directory, tarfile.USTAR_FORMAT),
                       ("d/" + "b" * 130 + ".cls", tarfile.GNU_FORMAT), ("p/" + "c" * 140 + ".cls", tarfile.PAX_FORMAT)):
        info = name if isinstance(name, tarfile.TarInfo) else tarfile.TarInfo(name)
        info.size = 0 if info.isdir() else 1
        out += info.tobuf(form, "utf-8", "surrogateescape") + (b"" if info.isdir() else b"7" + bytes(511))
    return out + bytes(1024)


def test_both_tar_parsers_read_long_names_and_refuse_a_bad_header(tmp_path):
    data = _tar_with_long_names()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [m.name for m in tar.getmembers() if m.isfile()]
    assert len(expected) == 3 and all(len(n) > 100 for n in expected)
    in_memory = [s["__key__"] + ".cls" for s in shards.parse_samples(data, "t.tar", 3)]
    (tmp_path / "t.tar").write_bytes(data)
    streamed = [s["__key__"] + ".cls" for s in shards.iter_raw_shard(str(tmp_path / "t.tar"))]
    assert in_memory == streamed == expected
    bad = bytearray(data)
    bad[1] ^= 0x01  # in the first header's name
    with pytest.raises(ShardFormatError, match="checksum mismatch"):
        shards.parse_samples(bytes(bad), "t.tar", 3)
    (tmp_path / "t.tar").write_bytes(bytes(bad))
    with pytest.raises(ShardFormatError, match="checksum mismatch"):
        list(shards.iter_raw_shard(str(tmp_path / "t.tar")))


def _columns_of(path: str, keep: list[int], fields: dict):
    """`decode_columns` of samples `keep` of a shard, cut out by its index."""
    from pipeline.data.loader import decode_columns

    offsets = np.asarray(shards.read_sample_index({"path": path, **_entry(path)})["offsets"])
    return decode_columns(open(path, "rb").read(), offsets[keep], offsets[np.asarray(keep) + 1], fields)


def _entry(path: str) -> dict:
    import hashlib
    import json

    index = open(shards.index_path(path), "rb").read()
    samples = len(json.loads(index)["sha256"])
    return {"samples": samples, "index_bytes": len(index), "index_sha256": hashlib.sha256(index).hexdigest()}


def test_uniform_samples_decode_as_columns_equal_to_one_by_one(tmp_path):
    from pipeline.data.loader import decode_fields

    def patches(n, rows=lambda i: 16):
        rng = np.random.default_rng(0)
        for i in range(n):
            yield {"__key__": f"d/{i:07d}", "npy": rng.standard_normal((rows(i), 49)).astype(np.float16), "cls": (7 * i) % 10}

    fields = {"npy": lambda a: a.astype(np.float32), "cls": int}
    path = str(tmp_path / "uniform.tar")
    shards.write_shard(path, patches(40))
    keep = [1, 2, 5, 17, 39]
    keys, columns = _columns_of(path, keep, fields)
    one_by_one = [decode_fields(raw, fields, path) for raw in shards.iter_raw_shard(path)]
    assert keys == [one_by_one[i]["__key__"] for i in keep] == ["d/0000001", "d/0000002", "d/0000005", "d/0000017", "d/0000039"]
    assert columns["npy"].dtype == np.float32 and columns["npy"].shape == (5, 16, 49)
    assert all(np.array_equal(columns["npy"][row], one_by_one[i]["npy"]) for row, i in enumerate(keep))
    assert columns["cls"].tolist() == [one_by_one[i]["cls"] for i in keep]

    # Not uniform, or not arrays and labels: left to the sample-by-sample path (None).
    ragged = str(tmp_path / "ragged.tar")
    shards.write_shard(ragged, patches(6, rows=lambda i: 4 + i % 2))
    assert _columns_of(ragged, [0, 1, 2], fields) is None
    assert _columns_of(ragged, [0, 2, 4], fields) is not None  # these three happen to agree
    assert _columns_of(path, keep, {"npy": np.asarray, "txt": str}) is None
    mixed = str(tmp_path / "mixed.tar")
    shards.write_shard(mixed, ({"__key__": f"{i}", "npy": np.zeros(3), **({"txt": "x"} if i else {})} for i in range(3)))
    assert _columns_of(mixed, [0, 1], {"npy": np.asarray}) is None
    foreign = str(tmp_path / "foreign.tar")  # a member off the allow-list: the loader refuses it by name
    shards.write_shard(foreign, patches(3))
    data = bytearray(open(foreign, "rb").read())
    for sample in range(3):  # every `.cls` header renamed `.pkl`, its checksum written anew
        at = data.index(b".cls")
        data[at : at + 4] = b".pkl"
        header = at - at % 512
        data[header + 148 : header + 156] = b" " * 8
        data[header + 148 : header + 156] = b"%06o\0 " % sum(data[header : header + 512])
    open(foreign, "wb").write(bytes(data))
    with pytest.raises(ShardFormatError, match="'.pkl' is not allowed"):
        list(shards.iter_shard(foreign))
    assert _columns_of(foreign, [0, 1, 2], {"npy": np.asarray}) is None  # though training reads only .npy

    data = bytearray(open(path, "rb").read())
    data[2] ^= 0x01  # in the first sample's first header
    open(path, "wb").write(bytes(data))
    with pytest.raises(ShardFormatError, match="checksum mismatch"):
        _columns_of(path, [0, 1], fields)


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _tar_with(tmp_path, name, data):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return str(path)


class _WritesAFile:
    """Unpickling this creates `path`: the proof that a loader ran code from a data file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("ext", ["pickle", "pyd", "pth", "pt", "npy"])
def test_hostile_members_are_refused_unread(tmp_path, ext):
    """A shard with a member that would create a file if unpickled, listed in a manifest
    whose checksum matches it: refused by name, and the file never appears."""
    import pickle

    marker = tmp_path / "pwned"
    if ext == "npy":  # an object array: np.load would unpickle it unless told not to
        buf = io.BytesIO()
        np.save(buf, np.array([_WritesAFile(marker)], dtype=object), allow_pickle=True)
        payload = buf.getvalue()
    else:
        payload = pickle.dumps(_WritesAFile(marker))
    pickle.loads(pickle.dumps(_WritesAFile(tmp_path / "control")))
    assert (tmp_path / "control").exists()  # the payload is live: unpickled, it writes
    directory = tmp_path / "set"
    directory.mkdir()
    path = _tar_with(directory, f"x001.{ext}", payload)
    raw = open(path, "rb").read()
    import hashlib

    info = shards.ShardInfo("evil.tar", 1, len(raw), hashlib.sha256(raw).hexdigest())
    shards.write_manifest(str(directory), [info], {}, "fp")
    with pytest.raises(ShardFormatError, match=rf"evil.tar.*'\.{ext}'"):
        list(shards.iter_verified(str(directory)))
    assert not marker.exists()


def test_the_training_path_refuses_a_member_it_would_not_read(tmp_path):
    """A sample with the `.npy` and `.cls` training reads and a `.pickle` beside them:
    the loader's decoding (training and validation batches) names the `.pickle`."""
    import hashlib
    import pickle

    from pipeline.data.loader import decode_fields, head_batches

    path = tmp_path / "mixed.tar"
    members = {"x001.npy": _npy(np.zeros((2, 3), np.float32)), "x001.cls": b"7",
               "x001.pickle": pickle.dumps(_WritesAFile(tmp_path / "pwned"))}
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    fields = {"npy": np.asarray, "cls": int}
    [raw] = list(shards.iter_raw_shard(str(path)))
    with pytest.raises(ShardFormatError, match=r"mixed.tar:x001: member extension '\.pickle' is not allowed"):
        decode_fields(raw, fields, str(path))
    data = path.read_bytes()
    entry = {"path": str(path), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}  # checksum matches
    with pytest.raises(ShardFormatError, match=r"'\.pickle'"):
        head_batches([entry], fields, limit=1, rank=0, world=1, batch_size=1)
    assert not (tmp_path / "pwned").exists()
    del raw["pickle"]
    assert decode_fields(raw, fields, str(path))["cls"] == 7  # the same sample without it decodes


def test_object_arrays_in_npy_are_refused(tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    path = _tar_with(tmp_path, "x001.npy", buf.getvalue())
    with pytest.raises(ShardFormatError, match="cannot decode '.npy'"):
        list(shards.iter_shard(path))


def test_missing_manifest_and_garbage_shard(tmp_path):
    with pytest.raises(ShardFormatError, match="no manifest.json"):
        shards.shard_entries(str(tmp_path))
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ShardFormatError, match="not a readable tar"):
        list(shards.iter_shard(str(bad)))


def test_failed_write_leaves_nothing(tmp_path):
    def broken():
        yield from _samples(2)
        raise RuntimeError("source died")

    path = tmp_path / "a.tar"
    with pytest.raises(RuntimeError):
        shards.write_shard(str(path), broken())
    assert list(tmp_path.iterdir()) == []


def test_atomic_json_write(tmp_path):
    storage.write_json_atomic(str(tmp_path / "m.json"), {"a": 1})
    assert storage.read_json(str(tmp_path / "m.json")) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]
