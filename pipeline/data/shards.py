"""WebDataset `.tar` shards and the checksummed manifest that marks a set done.

Samples are dicts of `__key__` plus fields named by extension. Encoding and
decoding go through one allow-list (`.npy`, `.png`, `.txt`, `.json`, `.cls`):
a shard from elsewhere can never make us unpickle anything.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipeline import storage

MANIFEST = "manifest.json"
ALLOWED_EXTENSIONS = ("npy", "png", "txt", "json", "cls")


class ShardFormatError(ValueError):
    """A shard or manifest is missing, corrupt, or holds a disallowed member."""


def _encode(ext: str, value: Any) -> bytes:
    if ext == "npy":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(value), allow_pickle=False)
        return buf.getvalue()
    if ext == "png":
        buf = io.BytesIO()
        Image.fromarray(np.asarray(value, dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()
    if ext == "txt":
        return str(value).encode("utf-8")
    if ext == "json":
        return json.dumps(value).encode("utf-8")
    if ext == "cls":
        return str(int(value)).encode("ascii")
    raise ShardFormatError(f"cannot encode field '.{ext}': allowed extensions are {ALLOWED_EXTENSIONS}")


def decode_field(ext: str, data: bytes, where: str) -> Any:
    try:
        if ext == "npy":
            return np.load(io.BytesIO(data), allow_pickle=False)
        if ext == "png":
            return np.asarray(Image.open(io.BytesIO(data)))
        if ext == "txt":
            return data.decode("utf-8")
        if ext == "json":
            return json.loads(data)
        if ext == "cls":
            return int(data)
    except Exception as e:
        raise ShardFormatError(f"{where}: cannot decode '.{ext}' member: {e}") from e
    raise ShardFormatError(f"{where}: member extension '.{ext}' is not allowed (allowed: {', '.join(ALLOWED_EXTENSIONS)})")


class _HashingWriter(io.RawIOBase):
    """Pass writes through to `inner` while counting bytes and hashing them."""

    def __init__(self, inner):
        self.inner, self.sha256, self.nbytes = inner, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha256.update(b)
        self.nbytes += len(b)
        self.inner.write(b)
        return len(b)


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


def write_shard(path: str, samples: Iterable[dict[str, Any]]) -> ShardInfo:
    """Write one shard atomically and return its manifest entry."""
    count = 0
    with storage.write_atomic(path) as raw:
        hashing = _HashingWriter(raw)
        # mtime fixed so that the same samples always give the same bytes and sha256.
        with wds.TarWriter(hashing, encoder=False, mtime=0) as tar:
            for sample in samples:
                key = sample["__key__"]
                record = {"__key__": key}
                for field, value in sample.items():
                    if field != "__key__":
                        record[field] = _encode(field.rsplit(".", 1)[-1], value)
                tar.write(record)
                count += 1
    return ShardInfo(path.rsplit("/", 1)[-1], count, hashing.nbytes, hashing.sha256.hexdigest())


def write_manifest(directory: str, shards: list[ShardInfo], schema: dict[str, str], fingerprint: str, **extra) -> dict:
    manifest = {
        "fingerprint": fingerprint,
        "schema": schema,
        "shards": [asdict(s) for s in sorted(shards, key=lambda s: s.name)],
        "total_samples": sum(s.samples for s in shards),
        "total_bytes": sum(s.bytes for s in shards),
        **extra,
    }
    storage.write_json_atomic(storage.join(directory, MANIFEST), manifest)
    return manifest


def read_manifest(directory: str) -> dict:
    path = storage.join(directory, MANIFEST)
    if not storage.exists(path):
        raise ShardFormatError(f"no {MANIFEST} in {directory}: the stage that writes it did not finish")
    manifest = storage.read_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ShardFormatError(f"{path} is not a shard manifest (no 'shards' list)")
    return manifest


def shard_entries(directory: str) -> list[dict]:
    """The manifest's shard entries, each with its full `path` added (no data is read)."""
    return [{**entry, "path": storage.join(directory, entry["name"])} for entry in read_manifest(directory)["shards"]]


def shard_paths(directory: str) -> list[str]:
    return [entry["path"] for entry in shard_entries(directory)]


class _HashingReader(io.RawIOBase):
    """Pass reads through from `inner` while hashing them: a shard is verified as it is read."""

    def __init__(self, inner):
        self.inner, self.sha256, self.nbytes = inner, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.inner.read(len(buffer))
        buffer[: len(data)] = data
        self.sha256.update(data)
        self.nbytes += len(data)
        return len(data)


def iter_raw_shard(path: str, expected: dict | None = None) -> Iterator[dict[str, Any]]:
    """Undecoded samples of one shard, in order: `__key__` plus raw bytes per extension.

    With `expected` (a manifest entry), the bytes are hashed as they stream past;
    the check runs when the shard ends, so a consumer that acts only on whole
    shards never acts on a corrupt one.
    """
    try:
        f = storage.open_file(path, "rb")
    except FileNotFoundError as e:
        raise ShardFormatError(f"{path} is listed in the manifest but missing") from e
    with f:
        reader = _HashingReader(f)
        try:
            members = ({**m, "__url__": path} for m in tar_file_iterator(io.BufferedReader(reader, 1 << 20)))
            for raw in group_by_keys(members):
                yield {k: v for k, v in raw.items() if k != "__url__"}
            while reader.read(1 << 20):  # tar padding after the last member is part of the hash
                pass
        except ShardFormatError:
            raise
        except Exception as e:
            raise ShardFormatError(f"{path} is not a readable tar shard: {e}") from e
        if expected is not None and (reader.nbytes != expected["bytes"] or reader.sha256.hexdigest() != expected["sha256"]):
            raise ShardFormatError(
                f"{path} does not match its manifest entry (size or sha256 differ): corrupt or replaced"
            )


def decode_sample(raw: dict[str, Any], where: str) -> dict[str, Any]:
    sample = {"__key__": raw["__key__"]}
    for field, data in raw.items():
        if not field.startswith("__"):
            sample[field] = decode_field(field.rsplit(".", 1)[-1].lower(), data, f"{where}:{raw['__key__']}")
    return sample


def iter_shard(path: str, expected: dict | None = None) -> Iterator[dict[str, Any]]:
    """Decoded samples of one shard, in order (verified against `expected` when given)."""
    for raw in iter_raw_shard(path, expected):
        yield decode_sample(raw, path)


def iter_shards(paths: Iterable[str]) -> Iterator[dict[str, Any]]:
    for path in paths:
        yield from iter_shard(path)


def iter_verified(directory: str) -> Iterator[dict[str, Any]]:
    """Every sample of a manifest's shards, each shard checked against its entry as it is read."""
    for entry in shard_entries(directory):
        yield from iter_shard(entry["path"], entry)
