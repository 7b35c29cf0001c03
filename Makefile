# Two entry points for a fresh machine: `make quickstart` and `make test`.
# Both create .venv and install dlaunch with its engines; torch is pinned so that a
# CPU-only machine takes the CPU wheel (a GPU machine gets the CUDA build of the same).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: setup quickstart test

# pip byte-compiles what it installs one file at a time, on one core; compileall does the
# same on every core. Compiled here, not at first import: where PYTHONDONTWRITEBYTECODE
# is set (many containers), a module not compiled now is compiled in every process that
# imports it. A file compileall cannot compile (a package's Python 2 example) costs only
# its own .pyc, as under pip.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-compile $(TORCH) -e '.[test]'
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
	touch $@

setup: $(VENV)/.installed

quickstart: setup
	$(BIN)/dlaunch run recipes/quickstart.yaml

# tests/integration/slurm runs jobs on a real Slurm started on this host; install.sh
# apt-installs slurm-wlm and munge the first time (root) and does nothing after that.
# Both installs at once: apt waits on the network and dpkg while pip holds one core.
test:
	bash slurm/dev-cluster/install.sh & slurm=$$!; \
	$(MAKE) --no-print-directory setup; setup=$$?; \
	wait $$slurm && exit $$setup
	$(BIN)/python -m pytest
