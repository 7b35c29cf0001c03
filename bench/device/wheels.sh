#!/bin/bash
# Run here, on a machine with the registries: the wheels that an offline GPU machine
# with Python 3.12 and a CUDA torch lacks for bench/gpu_*.py, into .whl/ (git-ignored).
# DeepSpeed is built without its ops (they are compiled on the GPU machine as needed);
# pydantic's wheels are the manylinux ones for CPython 3.12.
#   bash bench/device/wheels.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0
DS_BUILD_OPS=0 .venv/bin/python -m pip wheel -q --no-deps deepspeed==0.19.8 -w .whl
ls .whl
