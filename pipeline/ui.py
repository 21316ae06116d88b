"""`pipeline ui`: the MLflow UI over a run's tracking store, bound to 127.0.0.1
unless told otherwise (it has no authentication: see cluster/README.md)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from pipeline import tracking
from pipeline.report import ReportError

STARTUP_SECONDS = 90


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a closed port is free
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def ui_command(uri: str, host: str, port: int) -> int:
    """Start the UI, print its address once it answers, serve until Ctrl-C or SIGTERM."""
    if tracking.is_server(uri):
        print(f"{tracking.redacted(uri)} is an MLflow server already: open it in a browser", flush=True)
        return 0
    if not _port_is_free(host, port):
        raise ReportError(f"port {port} on {host} is taken: pass --port with a free one")
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    log = tempfile.TemporaryFile(mode="w+")  # the server's own log: read back only if it fails to start
    server = subprocess.Popen([mlflow, "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    signal.signal(signal.SIGTERM, _interrupt)  # stopped like Ctrl-C: the server goes with us
    address = f"http://{host}:{port}"
    deadline = time.monotonic() + STARTUP_SECONDS
    try:
        while not _answers(f"{address}/health"):
            if server.poll() is not None:
                log.seek(0)
                last = (log.read().strip().splitlines() or ["no output"])[-1]
                raise ReportError(f"the MLflow UI stopped while starting: {last}")
            if time.monotonic() > deadline:
                raise ReportError(f"the MLflow UI did not answer at {address} within {STARTUP_SECONDS} s")
            time.sleep(0.5)
        print(f"MLflow UI: {address}  (store {tracking.redacted(uri)}; Ctrl-C stops it)", flush=True)
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait()


def _interrupt(signum, frame):
    raise KeyboardInterrupt
