#!/usr/bin/env bash
# Prepares, here, every wheel bench/gpu.py needs on a GPU machine whose image has its
# own CUDA torch (Python 3.12) but no Ray, DeepSpeed or webdataset (../shared/notes/gpu.md),
# in one folder small enough to travel with the repository (64 MiB together), and
# prints the install line a GPU run starts with.
#
#   bench/gpu_carry.sh [FOLDER]        # default .whl (git-ignored)
#
# Versions are this project's (pyproject.toml's resolution); pass PYTHON_VERSION=3.11
# to build the same set for a 3.11 image.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.whl}"
py="${PYTHON_VERSION:-3.12}"
pip="${PIP:-python3 -m pip}"
rm -rf "$dest" && mkdir -p "$dest"

# What the image lacks, with what each needs that the image lacks too: Ray (jsonschema's
# family; tensorboardX for Ray Train's loggers), DeepSpeed (pydantic's family, hjson),
# webdataset (braceexpand).
wheels=(
  ray==2.60.0 tensorboardX==2.6.5
  jsonschema==4.26.0 referencing==0.37.0 rpds-py==2026.9.1 jsonschema-specifications==2025.9.1
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0
  webdataset==1.0.2 braceexpand==0.1.7
)
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
$pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp "${platforms[@]}" \
  -d "$dest" "${wheels[@]}"

# Ray's wheel is 79 MB, 32 MB of it ray/jars (Java workers, unused by a Python pipeline).
zip -q -d "$dest"/ray-*.whl 'ray/jars/*'

# DeepSpeed ships as source; with DS_BUILD_OPS=0 its wheel is pure Python (ops compile at run time).
DS_BUILD_OPS=0 $pip wheel -q --no-deps -w "$dest" deepspeed==0.19.8

size_mb=$(du -sm "$dest" | cut -f1)
echo "carry: $dest, ${size_mb} MB in $(ls "$dest" | wc -l) wheels" >&2
if (( size_mb > 60 )); then
  echo "error: $dest is ${size_mb} MB; with the repository it must stay under 64 MiB" >&2
  exit 1
fi
echo "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $dest/*.whl && export PYTHONPATH=/tmp/site:\$PWD"
