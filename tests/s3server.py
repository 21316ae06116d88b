"""moto's S3 server on 127.0.0.1 for the tests that speak S3; it counts what each
client reads, for those that hold readers to their share of the bytes."""

from __future__ import annotations

import contextlib
import os
import re
from collections import Counter
from typing import Iterator

from localcluster import free_port
from moto.server import ThreadedMotoServer


def _who(environ: dict) -> str:
    """The User-Agent's `app/` id when the client set one (`storage.name_requests`),
    else the request's access key."""
    app = re.search(r"\bapp/(\S+)", environ.get("HTTP_USER_AGENT", ""))
    if app:
        return app.group(1)
    key = re.search(r"Credential=([^/]+)/", environ.get("HTTP_AUTHORIZATION", ""))
    return key.group(1) if key else "anonymous"


class CountingS3Server(ThreadedMotoServer):
    """moto's server, its WSGI app wrapped to add up the body bytes of every GET by
    (who asked, object path)."""

    def __init__(self, port: int):
        super().__init__(ip_address="127.0.0.1", port=port, verbose=False)
        self.endpoint = f"http://127.0.0.1:{port}"
        self.got: Counter = Counter()

    def _server_entry(self):
        from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)

        def counting(environ, start_response):
            body = list(app(environ, start_response))
            if environ["REQUEST_METHOD"] == "GET":
                self.got[_who(environ), environ.get("PATH_INFO", "")] += sum(len(chunk) for chunk in body)
            return body

        self._server = make_server(self._ip_address, self._port, counting, True, request_handler=MotoRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()

    def bytes_by(self, prefix: str = "") -> Counter:
        """GET bytes per client, of objects whose path starts with `prefix` ("/bucket/key...")."""
        totals: Counter = Counter()
        for (who, path), n in self.got.items():
            if path.startswith(prefix):
                totals[who] += n
        return totals


@contextlib.contextmanager
def counting_s3(bucket: str) -> Iterator[tuple[CountingS3Server, dict[str, str]]]:
    """A counting server with `bucket` made; this process's environment points at it
    meanwhile. Yields (server, the environment a subprocess needs)."""
    import boto3
    from s3fs import S3FileSystem

    server = CountingS3Server(free_port())
    server.start()
    env = {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "writer",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    S3FileSystem.clear_instance_cache()  # fsspec keeps filesystems by arguments, not by endpoint
    try:
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield server, dict(os.environ)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        server.stop()
        S3FileSystem.clear_instance_cache()
