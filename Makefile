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

# tests/integration/slurm runs jobs on a real Slurm started on this host; install.sh
# apt-installs slurm-wlm and munge the first time (root) and does nothing after that.
test: setup
	bash slurm/dev-cluster/install.sh
	$(BIN)/python -m pytest
