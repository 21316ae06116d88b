"""WebDataset `.tar` shards and the checksummed manifest that marks a set done.

Samples are dicts of `__key__` plus fields named by extension. Encoding and
decoding go through one allow-list (`.npy`, `.png`, `.txt`, `.json`, `.cls`):
a shard from elsewhere can never make us unpickle anything.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Collection, Iterable, Iterator

import numpy as np
from PIL import Image

from pipeline import storage

MANIFEST = "manifest.json"
ALLOWED_EXTENSIONS = ("npy", "png", "txt", "json", "cls")
_END = bytes(512)  # a tar ends with zero blocks


class ShardFormatError(ValueError):
    """A shard or manifest is missing, corrupt, or holds a disallowed member."""


def encode_png(image) -> bytes:
    """A uint8 grey (H, W) or colour (H, W, C) array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _encode(ext: str, value: Any) -> bytes:
    if ext == "npy":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(value), allow_pickle=False)
        return buf.getvalue()
    if ext == "png":
        return encode_png(value)
    if ext == "txt":
        return str(value).encode("utf-8")
    if ext == "json":
        return json.dumps(value).encode("utf-8")
    if ext == "cls":
        return str(int(value)).encode("ascii")
    raise ShardFormatError(f"cannot encode field '.{ext}': allowed extensions are {ALLOWED_EXTENSIONS}")


_NPY_HEADERS: dict[bytes, tuple[tuple[int, ...], bool, np.dtype]] = {}


def _load_npy(data: bytes) -> np.ndarray:
    """`np.load(allow_pickle=False)` with each distinct header parsed once: numpy's own
    header parser (a literal eval per sample) was most of the decoding time."""
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        raise ValueError("not a .npy member (bad magic)")
    start = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
    header = data[:start]
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        f = io.BytesIO(data)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        parsed = read_header(f)
        if parsed[2].hasobject:
            raise ValueError("object arrays cannot be loaded without pickle, which is refused")
        if len(_NPY_HEADERS) > 4096:
            _NPY_HEADERS.clear()
        _NPY_HEADERS[header] = parsed
    shape, fortran, dtype = parsed
    count = math.prod(shape)
    if len(data) - start != count * dtype.itemsize:
        raise ValueError(f"{len(data) - start} data bytes for a {shape} {dtype} array")
    return np.frombuffer(data, dtype, count=count, offset=start).reshape(shape, order="F" if fortran else "C")


def refuse_extension(ext: str, where: str) -> None:
    """Raise, naming the member, unless `ext` is on the allow-list."""
    if ext not in ALLOWED_EXTENSIONS:
        raise ShardFormatError(f"{where}: member extension '.{ext}' is not allowed (allowed: {', '.join(ALLOWED_EXTENSIONS)})")


def decode_field(ext: str, data: bytes, where: str) -> Any:
    try:
        if ext == "npy":
            return _load_npy(data)
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
    refuse_extension(ext, where)
    raise AssertionError(f"'.{ext}' is allowed but has no decoder")


class _Hashing(io.RawIOBase):
    """Pass reads or writes through to `inner`, counting and hashing the bytes: a shard's
    sha256 comes from the one pass that writes or reads it. When writing, each sample's
    bytes are also hashed on their own, cut at the offsets `end_sample` marks (the writer
    buffers, so a sample's end is always marked before its last bytes pass)."""

    def __init__(self, inner):
        self.inner, self.sha256, self.nbytes = inner, hashlib.sha256(), 0
        self.sample_ends: list[int] = []
        self.sample_sha256: list[str] = []
        self._sample = hashlib.sha256()

    def end_sample(self, offset: int) -> None:
        self.sample_ends.append(offset)

    def _seen(self, data) -> None:
        self.sha256.update(data)
        self.nbytes += len(data)

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        view, at = memoryview(b), self.nbytes
        while len(view):
            done = len(self.sample_sha256)
            take = len(view) if done == len(self.sample_ends) else min(len(view), self.sample_ends[done] - at)
            self._sample.update(view[:take])
            at += take
            view = view[take:]
            if done < len(self.sample_ends) and at == self.sample_ends[done]:
                self.sample_sha256.append(self._sample.hexdigest())
                self._sample = hashlib.sha256()
        self._seen(b)
        self.inner.write(b)
        return len(b)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.inner.read(len(buffer))
        buffer[: len(data)] = data
        self._seen(data)
        return len(data)


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str
    # The sample index beside the shard (`NAME.index.json`: each sample's byte offset and
    # sha256), which lets a reader fetch and verify a byte range instead of the whole shard.
    index_bytes: int = 0
    index_sha256: str = ""


def index_path(shard_path: str) -> str:
    return f"{shard_path}.index.json"


def write_shard(path: str, samples: Iterable[dict[str, Any]]) -> ShardInfo:
    """Write one shard and its sample index atomically and return its manifest entry."""
    # Imported here: webdataset imports torch (about a second), which a process that only
    # reads shards (a scan, a text task, a loader worker) need not pay.
    import webdataset as wds

    with storage.write_atomic(path) as raw:
        hashing = _Hashing(raw)
        # mtime fixed so that the same samples always give the same bytes and sha256.
        with wds.TarWriter(hashing, encoder=False, mtime=0) as tar:
            for sample in samples:
                key = sample["__key__"]
                record = {"__key__": key}
                for field, value in sample.items():
                    if field != "__key__":
                        record[field] = _encode(field.rsplit(".", 1)[-1], value)
                tar.write(record)
                hashing.end_sample(tar.tarstream.offset)
    ends = hashing.sample_ends
    index = json.dumps({"offsets": [0, *ends], "sha256": hashing.sample_sha256}).encode()
    storage.write_bytes_atomic(index_path(path), index)
    return ShardInfo(path.rsplit("/", 1)[-1], len(ends), hashing.nbytes, hashing.sha256.hexdigest(),
                     len(index), hashlib.sha256(index).hexdigest())


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


def shard_entries(directory: str, skip: Collection[str] = ()) -> list[dict]:
    """The manifest's shard entries, less those named in `skip`, each with its full `path`
    added (no data is read)."""
    return [{**entry, "path": storage.join(directory, entry["name"])} for entry in read_manifest(directory)["shards"]
            if entry["name"] not in skip]


def _octal(field: bytes) -> int:
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _checksum_ok(header: bytes) -> bool:
    return _octal(header[148:156]) == sum(header) - sum(header[148:156]) + 256  # the field itself counts as spaces


def _header_blocks(f) -> Iterator[tuple[bytes, bytes]]:
    """(header, data) of each member of a tar stream, each header's checksum checked."""
    while True:
        header = f.read(512)
        if len(header) < 512:
            raise ShardFormatError("truncated tar header")
        if header == _END:
            return
        if not _checksum_ok(header):
            raise ShardFormatError("tar header checksum mismatch")
        size = _octal(header[124:136])
        data = f.read(size)
        if len(data) < size:
            raise ShardFormatError("truncated tar member")
        f.read(-size % 512)
        yield header, data


def _header_sums(headers: np.ndarray) -> np.ndarray:
    """`_checksum_ok`'s sum for every row of a (n, 512) uint8 array of tar headers: what each
    header's checksum field must hold."""
    return headers.sum(axis=1, dtype=np.int64) - headers[:, 148:156].sum(axis=1, dtype=np.int64) + 256


def _header_blocks_in(data: bytes, part: bool) -> list[tuple[bytes, bytes]]:
    """`_header_blocks` of tar bytes in memory, with the headers' checksums checked in one
    numpy pass rather than one Python sum per header (most of the streamed loader's
    parsing time). `part`: `data` holds whole samples cut from a tar, so its end is the
    end of the members."""
    headers, members, at, end = [], [], 0, len(data)
    while not (part and at == end):
        header = data[at : at + 512]
        if len(header) < 512:
            raise ShardFormatError("truncated tar header")
        if header == _END:
            break
        size = _octal(header[124:136])
        if at + 512 + size > end:
            raise ShardFormatError("truncated tar member")
        headers.append(header)
        members.append(data[at + 512 : at + 512 + size])
        at += 512 + size + (-size % 512)
    if headers:
        sums = _header_sums(np.frombuffer(b"".join(headers), np.uint8).reshape(-1, 512)).tolist()
        if [_octal(h[148:156]) for h in headers] != sums:
            raise ShardFormatError("tar header checksum mismatch")
    return list(zip(headers, members))


def _tar_members(blocks: Iterable[tuple[bytes, bytes]]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of a tar's regular files from its (header, data) blocks, parsing ustar
    headers directly (Python's tarfile spent most of the loader's time here): pax and GNU
    long names are understood; other member types are skipped."""
    long_name = None
    for header, data in blocks:
        typeflag = header[156:157]
        if typeflag in (b"L", b"x"):  # the next member's long name
            long_name = data.rstrip(b"\0").decode() if typeflag == b"L" else _pax_path(data)
            continue
        if typeflag not in (b"0", b"\0"):
            long_name = None
            continue
        if long_name is None:
            long_name = _text(header, 0, 100)
            if header[345]:  # ustar: names over 100 bytes are split
                long_name = f"{_text(header, 345, 500)}/{long_name}"
        yield long_name, data
        long_name = None


def _text(header: bytes, start: int, stop: int) -> str:
    """A NUL-terminated header field."""
    end = header.find(b"\0", start, stop)
    return header[start : stop if end < 0 else end].decode()


def _pax_path(records: bytes) -> str | None:
    for line in records.decode("utf-8").splitlines():
        _, _, kv = line.partition(" ")
        if kv.startswith("path="):
            return kv[5:]
    return None


def _grouped(members: Iterator[tuple[str, bytes]]) -> Iterator[dict[str, Any]]:
    """Samples from tar members: `__key__` plus raw bytes per extension (WebDataset's
    grouping: members sharing the name before the first dot of the file name)."""
    sample: dict[str, Any] = {}
    for name, data in members:
        directory, _, base = name.rpartition("/")
        stem, dot, ext = base.partition(".")
        key = f"{directory}/{stem}" if directory else stem
        if not dot:
            raise ShardFormatError(f"member '{name}' has no extension")
        if sample and sample["__key__"] != key:
            yield sample
            sample = {}
        sample.setdefault("__key__", key)
        if ext in sample:
            raise ShardFormatError(f"sample {key} has two '.{ext}' members")
        sample[ext] = data
    if sample:
        yield sample


def _listed(read: Callable, path: str, *args) -> Any:
    """`read(path, *args)` of a file a manifest lists: a missing one is a shard error."""
    try:
        return read(path, *args)
    except FileNotFoundError as e:
        raise ShardFormatError(f"{path} is listed in the manifest but missing") from e


def _not_as_listed(path: str) -> ShardFormatError:
    return ShardFormatError(f"{path} does not match its manifest entry (size or sha256 differ): corrupt or replaced")


def iter_raw_shard(path: str, expected: dict | None = None) -> Iterator[dict[str, Any]]:
    """Undecoded samples of one shard, in order: `__key__` plus raw bytes per extension.

    With `expected` (a manifest entry), the bytes are hashed as they stream past;
    the check runs when the shard ends, so a consumer that acts only on whole
    shards never acts on a corrupt one.
    """
    with _listed(storage.open_file, path, "rb") as f:
        reader = io.BufferedReader(_Hashing(f), 1 << 20)
        try:
            yield from _grouped(_tar_members(_header_blocks(reader)))
            while reader.read(1 << 20):  # tar padding after the last member is part of the hash
                pass
        except ShardFormatError as e:
            raise ShardFormatError(f"{path} is not a readable tar shard: {e}") from e
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise ShardFormatError(f"{path} is not a readable tar shard: {e}") from e
        hashed = reader.raw
        if expected is not None and (hashed.nbytes != expected["bytes"] or hashed.sha256.hexdigest() != expected["sha256"]):
            raise _not_as_listed(path)


def read_sample_index(entry: dict) -> dict[str, list]:
    """A shard's sample index: `offsets` (where each sample starts, and where the last ends)
    and `sha256` per sample, checked against the shard's manifest entry."""
    path = index_path(entry["path"])
    data = _listed(storage.read_bytes, path)
    if len(data) != entry["index_bytes"] or hashlib.sha256(data).hexdigest() != entry["index_sha256"]:
        raise _not_as_listed(path)
    index = json.loads(data)
    if len(index["offsets"]) != entry["samples"] + 1 or len(index["sha256"]) != entry["samples"]:
        raise ShardFormatError(f"{path} does not index {entry['samples']} samples")
    return index


def fetch_shard(entry: dict) -> bytes:
    """A whole shard's bytes, checked against its manifest entry (size and sha256)."""
    path = entry["path"]
    data = _listed(storage.read_bytes, path)
    if len(data) < entry["bytes"]:
        raise ShardFormatError(f"{path} is not a readable tar shard: truncated ({len(data)} of {entry['bytes']} bytes)")
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise _not_as_listed(path)
    return data


def fetch_samples(entry: dict, index: dict[str, list], first: int, last: int, check: Iterable[int] | None = None) -> bytes:
    """The bytes of samples `first` .. `last` of a shard, one byte range; each sample of
    `check` (default: all of them) checked against its sha256 in the shard's `index`. A
    reader checks the samples it uses: the others are some other reader's to check."""
    offsets, path = index["offsets"], entry["path"]
    data = _listed(storage.read_range, path, offsets[first], offsets[last + 1])
    if len(data) < offsets[last + 1] - offsets[first]:
        raise ShardFormatError(f"{path} is not a readable tar shard: truncated (its samples {first}..{last} "
                               f"end at byte {offsets[last + 1]}, the file before)")
    view = memoryview(data)
    for i in range(first, last + 1) if check is None else check:
        span = view[offsets[i] - offsets[first] : offsets[i + 1] - offsets[first]]
        if hashlib.sha256(span).hexdigest() != index["sha256"][i]:
            raise ShardFormatError(f"{path} sample {i} does not match the shard's index (sha256 differs): corrupt or replaced")
    return data


def parse_samples(data: bytes, path: str, count: int, part: bool = False) -> list[dict[str, Any]]:
    """Undecoded samples in fetched tar bytes (a whole shard, or whole samples cut from one:
    `part`), which must hold `count` of them."""
    try:
        samples = list(_grouped(_tar_members(_header_blocks_in(data, part))))
    except (ShardFormatError, ValueError, UnicodeDecodeError) as e:
        raise ShardFormatError(f"{path} is not a readable tar shard: {e}") from e
    if len(samples) != count:
        raise ShardFormatError(f"{path} holds {len(samples)} samples where its manifest entry says {count}")
    return samples


_CHECKSUM_DIGITS = 8 ** np.arange(5, -1, -1)


def _checksums_ok(headers: np.ndarray) -> bool | None:
    """`_checksum_ok` of every row of a (n, 512) uint8 array of tar headers, in one numpy
    pass; None unless every checksum field is written as tarfile writes it (six octal
    digits, NUL, space)."""
    field = headers[:, 148:156].astype(np.int64)
    digits = field[:, :6] - ord("0")
    if (digits < 0).any() or (digits > 7).any() or (field[:, 6] != 0).any() or (field[:, 7] != ord(" ")).any():
        return None
    return bool((digits @ _CHECKSUM_DIGITS == _header_sums(headers)).all())


def _rows(buffer: np.ndarray, starts: np.ndarray, size: int) -> np.ndarray:
    """`buffer[start : start + size]` for each start, as the rows of one array: a strided view
    where the starts are evenly spaced (samples of one size, read in a regular stride),
    else a copy."""
    if len(starts) and (starts.min() < 0 or starts.max() + size > len(buffer)):
        raise ShardFormatError("a member runs past the end of the data")
    step = int(starts[1] - starts[0]) if len(starts) > 1 else size
    if step > 0 and (np.diff(starts) == step).all():
        return np.lib.stride_tricks.as_strided(buffer[starts[0]:], (len(starts), size), (step, 1), writeable=False)
    view = memoryview(buffer)
    return np.frombuffer(b"".join(view[a : a + size] for a in starts.tolist()), np.uint8).reshape(len(starts), size)


def parse_columns(data: bytes, starts, ends) -> tuple[list[str], dict[str, np.ndarray]] | None:
    """Whole samples of a tar, at byte offsets `starts` .. `ends` of `data`, parsed as
    columns: their keys, and per extension every sample's member as one row of a
    (samples, size) uint8 array. None unless every sample holds the same allowed
    members, in the same order and of the same sizes, as plain files with short names:
    a shard of fixed-shape arrays (patches, token sequences), read without a Python step
    per member. Anything else is left to `parse_samples`, which explains what is wrong."""
    buffer = np.frombuffer(data, np.uint8)
    at, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
    keys: list[bytes] | None = None
    columns: dict[str, np.ndarray] = {}
    while len(at) and not (at == ends).all():
        if (ends - at < 512).any():
            return None
        headers = _rows(buffer, at, 512)
        fixed = np.concatenate([headers[:, 124:136], headers[:, 156:157]], axis=1)  # size and type
        if (fixed != fixed[0]).any() or headers[0, 156] not in (ord("0"), 0) or headers[:, 345].any():
            return None  # sizes differ, not a regular file, or a long name split over the ustar prefix
        checksums = _checksums_ok(headers)
        if checksums is None:
            return None
        if not checksums:
            raise ShardFormatError("tar header checksum mismatch")
        names = headers[:, :100].copy().view("S100").ravel().tolist()  # trailing NULs dropped
        _, dot, ext_bytes = names[0].rpartition(b"/")[2].partition(b".")
        ext, suffix = ext_bytes.decode("utf-8", "replace"), dot + ext_bytes
        if not dot or ext not in ALLOWED_EXTENSIONS or ext in columns or not all(name.endswith(suffix) for name in names):
            return None
        member_keys = [name[: -len(suffix)] for name in names]
        if keys is None:
            if any(b"." in key.rpartition(b"/")[2] for key in member_keys):
                return None
            keys = member_keys
        elif member_keys != keys:
            return None
        try:
            size = _octal(headers[0, 124:136].tobytes())
        except ValueError:
            return None
        if (at + 512 + size + (-size % 512) > ends).any():
            return None
        columns[ext] = _rows(buffer, at + 512, size)
        at = at + 512 + size + (-size % 512)
    try:
        return [key.decode() for key in keys or []], columns
    except UnicodeDecodeError:
        return None


def decode_column(ext: str, rows: np.ndarray) -> np.ndarray | None:
    """`decode_field` of every row of a `parse_columns` column at once: `.npy` members
    with one header (the first row's, parsed as `_load_npy` does) and `.cls` integers.
    None for anything else, or where the rows disagree."""
    if ext == "npy":
        try:
            first = _load_npy(rows[0].tobytes())
        except ValueError:
            return None
        start = rows.shape[1] - first.nbytes
        if not first.flags.c_contiguous or (rows[:, :start] != rows[0, :start]).any():
            return None
        return np.ascontiguousarray(rows[:, start:]).view(first.dtype).reshape(len(rows), *first.shape)
    if ext == "cls" and rows.shape[1]:
        try:
            return np.array([int(text) for text in rows.copy().view(f"S{rows.shape[1]}").ravel().tolist()], np.int64)
        except ValueError:
            return None
    return None


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


def shard_problem(entry: dict) -> str | None:
    """Why a manifest entry's shard cannot be trained on (missing, truncated, checksum,
    a member that does not decode), or None: the whole shard is read and decoded."""
    try:
        for _ in iter_shard(entry["path"], entry):
            pass
    except ShardFormatError as e:
        return str(e)
    return None


def bad_shards(directory: str, map_each: Callable = map) -> dict[str, str]:
    """Name -> problem for every shard of a manifest that cannot be trained on;
    `map_each(shard_problem, entries)` runs the checks (the stages fan them out to Ray)."""
    entries = shard_entries(directory)
    return {e["name"]: why for e, why in zip(entries, map_each(shard_problem, entries)) if why}


def iter_verified(directory: str) -> Iterator[dict[str, Any]]:
    """Every sample of a manifest's shards, each shard checked against its entry as it is read."""
    for entry in shard_entries(directory):
        yield from iter_shard(entry["path"], entry)
