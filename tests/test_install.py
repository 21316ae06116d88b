"""A non-editable install is whole: what the pipeline reads at run time (the ZeRO
JSONs, the model sources an export copies) ships inside the package."""

from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import REPO

CHECK = """
import json, pathlib, sys
import pipeline
from pipeline.train.engine import load_zero_config
from pipeline.export.remote import MODEL_FILES
from importlib import resources
print(json.dumps({
    "package": pipeline.__file__,
    "zero": [load_zero_config(s)["zero_optimization"]["stage"] for s in range(4)],
    "models": [len((resources.files("pipeline.models") / n).read_bytes()) for n in MODEL_FILES],
    "kinds": sorted(__import__("pipeline.kinds", fromlist=["KINDS"]).KINDS),
}))
"""


def test_a_non_editable_install_finds_its_zero_configs_and_model_sources(tmp_path):
    import json

    source = tmp_path / "src"  # a copy, so that the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "pipeline", source / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True)
    shutil.rmtree(source)  # nothing may be read from the sources

    # -P: the current directory is not on the path; PYTHONPATH puts the install first.
    done = subprocess.run([sys.executable, "-P", "-c", CHECK], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["package"].startswith(str(target))
    assert found["zero"] == [0, 1, 2, 3]
    assert all(size > 0 for size in found["models"])
    assert found["kinds"] == ["captioner", "gpt", "vit"]
