"""The cluster definitions in `cluster/`, checked offline: their keys, the entry
points and configs they name, and install lines that match the README's."""

from __future__ import annotations

import re
import shlex
import subprocess

import yaml
from conftest import REPO

from pipeline.config import load_config


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


def test_launcher_installs_as_the_readme_and_has_8xh100_workers():
    spec = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    types = spec["available_node_types"]
    assert spec["head_node_type"] in types and "GPU" not in types[spec["head_node_type"]]["resources"]
    gpu_types = [t for t in types.values() if t["resources"].get("GPU") == 8]
    assert gpu_types and gpu_types[0]["node_config"]["InstanceType"] == "p5.48xlarge"
    installs = [c.split("&&", 1)[-1].strip() for c in spec["setup_commands"]]
    assert installs == readme_install()
    assert list(spec["file_mounts"].values()) == ["."]
    for command in spec["head_start_ray_commands"] + spec["worker_start_ray_commands"]:
        assert "ray start" not in command or "RAY_AUTH_MODE=token" in command


def test_rayjob_names_a_real_entry_point_and_8_gpu_workers():
    job = yaml.safe_load((REPO / "cluster" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"].startswith("ray.io/")
    check_entrypoint(job["spec"]["entrypoint"])
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["MLFLOW_TRACKING_URI"].startswith("http://")
    cluster = job["spec"]["rayClusterSpec"]
    images = {cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]}
    for group in cluster["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        images.add(container["image"])
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert len(images) == 1


def test_image_installs_as_the_readme():
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    assert [line[len("RUN "):] for line in dockerfile.splitlines() if line.startswith("RUN ")] == readme_install()


def test_mlflow_recipe_uses_a_database_the_bucket_and_a_private_address():
    path = REPO / "cluster" / "mlflow-server.sh"
    script = path.read_text()
    subprocess.run(["bash", "-n", str(path)], check=True)
    defaults = dict(re.findall(r':\s*"\$\{(\w+):=(.*?)\}"', script))
    assert defaults["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert defaults["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert "0.0.0.0" not in defaults["MLFLOW_HOST"] and '--host "$MLFLOW_HOST"' in script
    # The server speaks the protocol of the client the pipeline pins.
    pinned = re.search(r'"mlflow([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert f'"mlflow{pinned}"' in script
