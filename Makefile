# Set-up, demo and tests of pp-plugin. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# on a machine whose default index would pull the multi-GB CUDA build.
TORCH_PIP_ARGS ?=
SETUP_STAMP := $(VENV)/.pp-plugin-setup

.PHONY: setup demo test test-slow clean-venv

setup: $(SETUP_STAMP)

# Re-runs only when the dependency pins change, so a second `make setup` is quick.
$(SETUP_STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PIP_ARGS) torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]" torch==2.13.0
	$(VENV)/bin/pp-prune fetch
	touch $@

demo: setup
	$(VENV)/bin/pp-prune eval recipes/smollm2-probe.yaml

test: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

clean-venv:
	rm -rf $(VENV)
