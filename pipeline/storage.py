"""One storage layer for every stage: a local path by default, any fsspec URL
(`s3://`, `gs://`, a shared mount) on a cluster.

Writes that mark something as done go through `write_atomic`: on a local
filesystem a temp file is renamed into place. On an object store the bytes go to
a local temp file first and are uploaded only once the writer finished: a PUT (or
a multipart upload, completed last) is all-or-nothing, so a failed or killed
writer leaves no object at all, never a partial one.

S3-compatible servers other than AWS are reached through the standard
`AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`) variable, which s3fs and boto3 read
themselves and `arrow_filesystem` passes to pyarrow (for Ray Train).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from typing import IO, Any, Iterator, Optional

import fsspec
from fsspec.implementations.local import LocalFileSystem


def _fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(path)


# The User-Agent's `app/` field of every S3 request botocore (so s3fs) makes; S3 server
# access logs record it.
UA_APP_ID = "AWS_SDK_UA_APP_ID"


def name_requests(who: str) -> None:
    """Sign this process's S3 requests with `who` (after any app id the user set), so
    that a bucket's access logs tell, say, one training rank's reads from another's.
    Clients read it when made: call before the process's first request."""
    user = os.environ.get(UA_APP_ID)
    os.environ[UA_APP_ID] = f"{user}.{who}" if user else who


def is_local(path: str) -> bool:
    return isinstance(_fs(path)[0], LocalFileSystem)


def absolute(path: str) -> str:
    """Absolute local path, or the URL unchanged."""
    return os.path.abspath(path) if "://" not in path else path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def relative(base: str, path: str) -> str:
    """`path` relative to `base`; raises if it is not inside it."""
    base = base.rstrip("/") + "/"
    if not path.startswith(base):
        raise ValueError(f"{path} is not inside {base}")
    return path[len(base):]


def s3_endpoint() -> Optional[str]:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_region(bucket: str) -> Optional[str]:
    """The bucket's region for pyarrow, which otherwise assumes us-east-1 and is refused
    by a bucket elsewhere: the environment's (AWS_REGION, AWS_DEFAULT_REGION), else
    asked of AWS; None with a custom endpoint (an S3-compatible store has no regions)."""
    import pyarrow.fs

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region or s3_endpoint():
        return region
    return pyarrow.fs.resolve_s3_region(bucket)


def arrow_filesystem(path: str) -> tuple[Optional[Any], str]:
    """(pyarrow filesystem, path inside it) for Ray Train's storage; (None, absolute path)
    for local paths. pyarrow ignores AWS_ENDPOINT_URL, so it is passed explicitly."""
    import pyarrow.fs

    if is_local(path):
        return None, absolute(path)
    scheme, _, rest = path.partition("://")
    if scheme in ("s3", "s3a"):
        bucket = rest.split("/", 1)[0]
        return pyarrow.fs.S3FileSystem(endpoint_override=s3_endpoint(), region=s3_region(bucket)), rest.rstrip("/")
    fs, inner = pyarrow.fs.FileSystem.from_uri(path)
    return fs, inner


def exists(path: str) -> bool:
    fs, p = _fs(path)
    return fs.exists(p)


def glob(pattern: str) -> list[str]:
    """Paths matching `pattern`, sorted, in the pattern's own form (a URL stays a URL)."""
    fs, p = _fs(pattern)
    found = fs.glob(p)
    return sorted(found if isinstance(fs, LocalFileSystem) else [fs.unstrip_protocol(f) for f in found])


def makedirs(path: str) -> None:
    fs, p = _fs(path)
    fs.makedirs(p, exist_ok=True)


def remove_tree(path: str) -> None:
    fs, p = _fs(path)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def open_file(path: str, mode: str = "rb") -> IO:
    fs, p = _fs(path)
    return fs.open(p, mode)


def read_bytes(path: str) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def read_range(path: str, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of a file: one ranged GET on a bucket."""
    fs, p = _fs(path)
    return fs.cat_file(p, start=start, end=stop)


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path).decode("utf-8"))


@contextlib.contextmanager
def write_atomic(path: str) -> Iterator[IO[bytes]]:
    """Open `path` for binary writing; it appears complete or not at all."""
    fs, p = _fs(path)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
        tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        with tempfile.NamedTemporaryFile(prefix="upload-") as f:
            yield f
            f.flush()
            fs.put_file(f.name, p)


def write_bytes_atomic(path: str, data: bytes) -> None:
    with write_atomic(path) as f:
        f.write(data)


def write_json_atomic(path: str, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def upload_tree(local: str, path: str) -> None:
    """The local directory `local` copied to `path` (a bucket prefix or a local path)."""
    fs, p = _fs(path)
    fs.put(local.rstrip("/") + "/", p.rstrip("/"), recursive=True)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local path holding the tree at `path`: itself when local, else a temporary download."""
    if is_local(path):
        yield absolute(path)
        return
    fs, p = _fs(path)
    with tempfile.TemporaryDirectory(prefix="download-") as tmp:
        local = os.path.join(tmp, os.path.basename(p.rstrip("/")))
        fs.get(p.rstrip("/") + "/", local, recursive=True)
        yield local
