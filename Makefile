# Two commands on a fresh machine (see README):
#   make smoke   set up .venv and run the whole pipeline on the embedded data
#   make digits  the flagship captioner alone, on ragged grids (configs/digits.yaml)
#   make test    set up .venv and run the test suite
VENV ?= .venv
PYTHON ?= python3
WORKDIR ?= runs/smoke

.PHONY: setup smoke digits test test-fast bench browser

# torch is pinned and installed first: a bare `torch` requirement would pull
# several GB of CUDA wheels instead of the CPU build. The rest goes through uv, which
# keeps the torch already there and resolves the same versions as pip: 54 s on a fresh
# clone here against pip's 4 min 8 s (2026-11-28).
# --compile-bytecode: uv, unlike pip, writes no .pyc files, and where PYTHONDONTWRITEBYTECODE
# is set (this machine sets it) Python then compiles Ray, DeepSpeed, MLflow... from source
# in every process it starts: a Ray Train fit of the resume tests' small ViT took 24.7 s
# without them and 13.8 s with them, starting and stopping Ray 12.9 s and 8.2 s (2026-11-29).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check torch==2.13.0 uv
	$(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(VENV)/bin/python -e ".[dev,hf]"
	touch $@

setup: $(VENV)/.installed

smoke: setup
	$(VENV)/bin/pipeline run configs/smoke.yaml --workdir $(WORKDIR) --summary $(WORKDIR)/summary.json

# The flagship: the captioner's branch on ragged 1x1..10x10 grids (configs/digits.yaml).
digits: setup
	$(VENV)/bin/pipeline run configs/digits.yaml --workdir runs/digits --summary runs/digits/summary.json

# The MLflow UI test drives Debian's chromium through Selenium: installed here when
# root may (apt), else that one test is skipped and says why.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  echo "chromium not installed: the MLflow UI browser test will be skipped"

test: setup browser
	$(VENV)/bin/pytest -q -rs --durations=0 --durations-min=1.0

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

bench: setup
	$(VENV)/bin/python bench/smoke_dag.py
