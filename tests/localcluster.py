"""A real two-node Ray cluster on one machine, with the services a cluster run
needs: an S3-compatible object store (moto's server) and an MLflow server.

The worker node runs in its own mount namespace with a fresh tmpfs over the
cluster's base directory, which holds both nodes' Ray temp dirs and TMPDIRs. So
a file one node writes through a local path under it is invisible to the other,
as on two machines. Every process started here is stopped by PID, with all its
descendants, also when the test fails.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.runner import LOCAL_POLL_INTERVAL_S

VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(entry)] = (int(fields[1]), int(fields[2]))
    return table


def _descendants(roots: list[int]) -> list[int]:
    """`roots`, their descendants, and whatever still sits in their process groups
    (Ray's daemons stay in the group of the `ray start` that made them)."""
    table = _processes()
    found = set(roots) | {pid for pid, (_, group) in table.items() if group in roots}
    grew = True
    while grew:
        more = {pid for pid, (parent, _) in table.items() if parent in found} - found
        found |= more
        grew = bool(more)
    return sorted(found)


def node_ports(first_worker_port: int) -> list[str]:
    """`ray start` options that give a node ports of its own (several nodes or clusters on one machine)."""
    return [
        "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
        "--min-worker-port", str(first_worker_port), "--max-worker-port", str(first_worker_port + 199),
    ]


def stop_all(procs: list[subprocess.Popen], graceful: bool = True) -> None:
    """Each process (started with its own session) and every descendant, by PID: SIGTERM
    (unless not `graceful`), then SIGKILL."""
    pids = _descendants([proc.pid for proc in procs])
    for sig in (signal.SIGTERM, signal.SIGKILL) if graceful else (signal.SIGKILL,):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            for proc in procs:
                proc.poll()  # reap our direct children
            time.sleep(0.2)
    for proc in procs:
        proc.wait(timeout=10)


def _wait_http(url: str, seconds: float, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers (a 401 from Ray's token check counts)
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {seconds:.0f}s; log:\n{log.read_text()[-3000:]}")


class LocalCluster:
    """Head node, a worker node with a private view of `base`, moto and MLflow."""

    def __init__(self, base: Path, logs: Path, bucket: str = "thousandwords"):
        self.base = base
        self.bucket = bucket
        self.logs = logs  # outside the tmpfs, readable after the test
        self.procs: list[subprocess.Popen] = []
        self.s3_port, self.mlflow_port = free_port(), free_port()
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.env = self._base_env()

    # ---------------------------------------------------------------- environment

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
        env.update({
            "PATH": f"{VENV_BIN}:{env.get('PATH', '')}",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.s3_port}",
            "AWS_ACCESS_KEY_ID": "thousandwords-test",
            "AWS_SECRET_ACCESS_KEY": "thousandwords-test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            # Ray Train's state-API lookups go to this cluster, not another one on this machine
            # (see pipeline.runner.start_local_ray).
            "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{self.dashboard_port}",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(LOCAL_POLL_INTERVAL_S),
            "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
        })
        return env

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    # ---------------------------------------------------------------- processes

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self) -> "LocalCluster":
        self.base.mkdir(parents=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self._start("moto", [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.s3_port)], self.env)
        _wait_http(f"http://127.0.0.1:{self.s3_port}/", 60, self.logs / "moto.log")
        import boto3

        boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], aws_access_key_id="thousandwords-test",
                     aws_secret_access_key="thousandwords-test", region_name="us-east-1").create_bucket(Bucket=self.bucket)

        (self.base / "mlflow").mkdir()
        self._start("mlflow", [
            str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.mlflow_port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.base}/mlflow/mlflow.db",
            "--artifacts-destination", f"s3://{self.bucket}/mlflow-artifacts",
        ], {**self.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})

        head_env = {**self.env, "TMPDIR": str(self.base / "tmp-head")}
        (self.base / "tmp-head").mkdir()
        self._start("ray-head", [
            str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
            "--port", str(self.gcs_port), "--num-cpus", "1", "--resources", '{"head": 1}',
            "--temp-dir", str(self.base / "ray"), "--include-dashboard", "true",
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
            "--ray-client-server-port", str(free_port()), *node_ports(23000),
        ], head_env)
        _wait_http(f"{self.dashboard}/api/version", 90, self.logs / "ray-head.log")

        # The worker node: its own mount namespace, a fresh tmpfs over `base`.
        unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
        ray_start = " ".join([
            str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats", "--address", self.gcs_address,
            "--num-cpus", "1", "--resources", "'{\"node2\": 1}'", "--temp-dir", str(self.base / "ray"),
            *node_ports(23400),
        ])
        script = f"mount -t tmpfs tmpfs {self.base} && mkdir {self.base}/tmp-node2 && exec {ray_start}"
        self._start("ray-node2", [*unshare, "--propagation", "private", "bash", "-c", script],
                    {**self.env, "TMPDIR": str(self.base / "tmp-node2")})

        _wait_http(f"{self.tracking_uri}/health", 90, self.logs / "mlflow.log")
        self._wait_nodes(2, 90)
        return self

    def _wait_nodes(self, count: int, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            out = self.ray_cli("list nodes", "--format", "json", check=False)
            if out.returncode == 0 and sum(n["state"] == "ALIVE" for n in json.loads(out.stdout)) >= count:
                return
            time.sleep(2)
        raise RuntimeError(f"the cluster did not reach {count} nodes in {seconds:.0f}s; "
                           f"node2 log:\n{(self.logs / 'ray-node2.log').read_text()[-3000:]}")

    def ray_cli(self, command: str, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        """`ray COMMAND --address DASHBOARD ARGS...` from the repo root, as a client holding the token."""
        argv = [str(VENV_BIN / "ray"), *command.split(), "--address", self.dashboard, *args]
        return subprocess.run(argv, env=self.env, cwd=REPO, capture_output=True, text=True, check=check, timeout=timeout)

    def stop(self) -> None:
        """Every process started here and every descendant, by PID: SIGTERM, then SIGKILL."""
        stop_all(self.procs)
        shutil.rmtree(self.base, ignore_errors=True)
