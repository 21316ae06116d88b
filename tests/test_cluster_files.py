"""The cluster definitions in `cluster/`, checked offline against the schemas their
tools check them with (Ray's launcher schema from the installed `ray`, KubeRay's CRD),
plus what no schema says: one token on every node, NCCL pointed at EFA, an MLflow
server that answers the name the pods use, install lines that match the README's."""

from __future__ import annotations

import copy
import gzip
import json
import os
import re
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import REPO, VENV_BIN
from localcluster import free_port, node_ports, stop_all

from pipeline.config import load_config

CLUSTER = REPO / "cluster"
KUBERAY_SCHEMA = REPO / "tests" / "data" / "kuberay-v1.7.0-rayjob-v1.schema.json.gz"


def readme_install() -> list[str]:
    readme = (REPO / "README.md").read_text()
    block = readme.split("Install by hand", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.strip() for line in block.splitlines() if line.strip()]
    assert lines and all(line.startswith("pip install") for line in lines)
    return lines


def check_entrypoint(command: str) -> None:
    """`python jobs/X.py run CONFIG --workdir s3://...`: the script and config exist and load."""
    argv = shlex.split(command)
    assert argv[0] == "python" and (REPO / argv[1]).is_file(), argv
    assert argv[2] in ("run", "pretrain")
    load_config(REPO / argv[3])
    assert argv[argv.index("--workdir") + 1].startswith("s3://")


def nccl_env() -> dict[str, str]:
    """cluster/nccl-efa.env as a dict, each variable with a comment of its own right above it."""
    lines = (CLUSTER / "nccl-efa.env").read_text().splitlines()
    env = {}
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):
            name, value = line.split("=", 1)
            assert lines[i - 1].startswith("# "), f"{name} has no comment saying why"
            env[name] = value
    return env


def launcher() -> dict:
    return yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())


# ---------------------------------------------------------------------------- launcher


def test_launcher_passes_rays_own_validation_and_installs_as_the_readme():
    from ray.autoscaler._private.aws.config import _configure_subnets_and_groups_from_network_interfaces
    from ray.autoscaler._private.util import prepare_config, validate_config

    spec = launcher()
    validate_config(prepare_config(copy.deepcopy(spec)))  # what `ray up` does before it calls AWS
    typo = copy.deepcopy(spec) | {"setup_comands": []}
    with pytest.raises(Exception, match="setup_comands"):
        validate_config(prepare_config(typo))

    types = spec["available_node_types"]
    assert spec["head_node_type"] in types and "GPU" not in types[spec["head_node_type"]]["resources"]
    assert all(t["node_config"].get("ImageId") for t in types.values())  # never the launcher's 2021 default
    [gpu] = [t for t in types.values() if t["resources"].get("GPU") == 8]
    node = gpu["node_config"]
    assert node["InstanceType"] == "p5.48xlarge" and node["Placement"]["GroupName"]
    efa = node["NetworkInterfaces"]
    assert [n["NetworkCardIndex"] for n in efa] == list(range(32)) and {n["InterfaceType"] for n in efa} == {"efa"}
    assert [n["DeviceIndex"] for n in efa] == [0] + [1] * 31
    _configure_subnets_and_groups_from_network_interfaces(node)  # the launcher's own rule for interfaces
    head = types[spec["head_node_type"]]["node_config"]  # one subnet and security group: the head is reachable
    assert all(n["SubnetId"] == head["SubnetIds"][0] and n["Groups"] == head["SecurityGroupIds"] for n in efa)

    installs = [c.split("&&", 1)[-1].strip() for c in spec["setup_commands"]]
    assert installs == readme_install()
    assert spec["file_mounts"]["/home/ubuntu/thousandwords"] == "."


def test_every_node_starts_with_the_one_token_copied_to_where_ray_reads_it(monkeypatch):
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    spec = launcher()
    monkeypatch.setenv("HOME", f"/home/{spec['auth']['ssh_user']}")
    token_on_node = str(_get_default_token_path())
    assert spec["file_mounts"][token_on_node] == "~/.ray/auth_token"  # file_mounts reach head and workers alike
    starts = [c for c in spec["head_start_ray_commands"] + spec["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    readme = (CLUSTER / "README.md").read_text()
    assert readme.index("ray get-auth-token --generate") < readme.index("ray up cluster/ray-cluster.yaml")


def test_ray_start_refuses_token_mode_without_the_token_file_and_starts_with_it(tmp_path):
    """What the token's file mount is for, with Ray itself: a node started as the launcher
    starts it fails without ~/.ray/auth_token and comes up with it."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_AUTH_MODE="token", PYTHONWARNINGS="ignore")
    temp = f"/tmp/twt-{os.getpid()}"  # Ray's socket paths must stay short
    argv = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats", "--num-cpus", "0",
            "--port", str(free_port()), "--temp-dir", temp, "--include-dashboard", "false",
            "--ray-client-server-port", str(free_port()), *node_ports(24000)]

    refused = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()

    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("a" * 64)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "Ray runtime started" in line or "--block" in line:
                break
        assert proc.poll() is None, "".join(seen[-30:])
    finally:
        stop_all([proc], graceful=False)  # a node drains for 30 s on SIGTERM
        shutil.rmtree(temp, ignore_errors=True)


def test_gpu_nodes_read_the_nccl_efa_settings():
    env = nccl_env()
    assert env["FI_PROVIDER"] == "efa" and "ofi-nccl" in env["LD_LIBRARY_PATH"]
    [start] = [c for c in launcher()["worker_start_ray_commands"] if "ray start" in c]
    sourced = re.search(r"set -a && \. (\S+) && set \+a && ", start).group(1)
    assert sourced == "/home/ubuntu/thousandwords/cluster/nccl-efa.env"  # the repo's file mount


# ---------------------------------------------------------------------------- KubeRay


def _strict(schema):
    """The CRD's schema as `kubectl apply` checks it (strict field validation): an
    object that lists its properties takes no others."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def rayjob_errors(job: dict) -> list[str]:
    import jsonschema

    schema = _strict(json.loads(gzip.decompress(KUBERAY_SCHEMA.read_bytes())))
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(job)]


def rayjob() -> dict:
    return yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())


def test_rayjob_passes_kuberays_crd_schema_and_a_typo_does_not():
    job = rayjob()
    assert rayjob_errors(job) == []
    typo = copy.deepcopy(job)
    typo["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["serviceAcountName"] = "x"
    assert any("serviceAcountName" in e for e in rayjob_errors(typo))


def test_rayjob_authenticates_mounts_shared_memory_and_asks_for_gpus_and_efa():
    job = rayjob()
    check_entrypoint(job["spec"]["entrypoint"])
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.mlflow.svc.cluster.local:5000"
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token" and cluster["authOptions"]["secretName"]
    image_ray = re.search(r"FROM rayproject/ray:([\d.]+)-", (CLUSTER / "Dockerfile").read_text()).group(1)
    assert cluster["rayVersion"] == image_ray  # and >= 2.52, which authOptions needs
    assert tuple(map(int, image_ray.split("."))) >= (2, 52)

    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    assert {p["serviceAccountName"] for p in pods} == {"thousandwords"}
    assert len({p["containers"][0]["image"] for p in pods}) == 1
    for group in cluster["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        [container] = pod["containers"]
        resources = container["resources"]
        assert resources["requests"] == resources["limits"]
        assert resources["limits"]["nvidia.com/gpu"] == "8" and resources["limits"]["vpc.amazonaws.com/efa"] == "32"
        [shm] = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        [volume] = [v for v in pod["volumes"] if v["name"] == shm["name"]]
        assert volume["emptyDir"]["medium"] == "Memory"
        assert {e["name"]: e["value"] for e in container["env"]} == nccl_env()


def test_image_installs_as_the_readme():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    runs = [line[len("RUN "):] for line in dockerfile.splitlines() if line.startswith("RUN ")]
    assert runs[-2:] == readme_install()


# ---------------------------------------------------------------------------- MLflow


def test_mlflow_recipe_uses_a_database_the_bucket_and_a_private_address():
    path = CLUSTER / "mlflow-server.sh"
    script = path.read_text()
    subprocess.run(["bash", "-n", str(path)], check=True)
    defaults = dict(re.findall(r':\s*"\$\{(\w+):=(.*?)\}"', script))
    assert defaults["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert defaults["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert "0.0.0.0" not in defaults["MLFLOW_HOST"] and '--host "$MLFLOW_HOST"' in script
    # The server speaks the protocol of the client the pipeline pins.
    pinned = re.search(r'"mlflow([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert f'"mlflow{pinned}"' in script


def _get(url: str, host: str) -> int:
    request = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0  # not listening yet


def test_mlflow_recipe_as_written_answers_the_name_the_pods_use(tmp_path):
    """cluster/mlflow-server.sh itself, its storage defaults swapped for local ones (and
    one worker), asked by the Host header cluster/rayjob.yaml's pods send."""
    port = free_port()
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "MLFLOW_HOST": "127.0.0.1",
           "MLFLOW_PORT": str(port), "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
           "MLFLOW_WORKERS": "1"}  # uvicorn restarts workers that a busy CI machine keeps from answering its pings
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(["bash", str(CLUSTER / "mlflow-server.sh")], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
    pods = urllib.parse.urlsplit(yaml.safe_load(rayjob()["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"])
    try:
        deadline = time.monotonic() + 120
        while _get(f"http://127.0.0.1:{port}/health", f"127.0.0.1:{port}") != 200:
            assert time.monotonic() < deadline and proc.poll() is None, Path(tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        assert _get(api, f"{pods.hostname}:{port}") == 200
        assert _get(api, f"127.0.0.1:{port}") == 200  # a laptop through an SSH tunnel
        assert _get(api, f"attacker.example.com:{port}") == 403  # the check is on: other names are refused
    finally:
        stop_all([proc])
