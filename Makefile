# Two entry points for a fresh machine: `make quickstart` and `make test`.
# Both create .venv and install dlaunch with its engines; torch is pinned so that a
# CPU-only machine takes the CPU wheel (a GPU machine gets the CUDA build of the same).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: setup quickstart test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH) -e '.[test]'
	touch $@

setup: $(VENV)/.installed

quickstart: setup
	$(BIN)/dlaunch run recipes/quickstart.yaml

test: setup
	$(BIN)/python -m pytest
