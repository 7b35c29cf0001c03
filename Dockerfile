# The image that dlaunch's Slurm container option runs (`cluster.slurm.container` in a
# recipe). docs/container.md says how to build it and use it with pyxis/enroot or
# apptainer. Build it from the repository root:
#
#     docker build -t dlaunch:0.1 .
#
# CUDA 12.6, because torch 2.13.0 has exactly one CUDA 12 build: cu126. The 2.13 release
# ships cu126 (legacy), cu130 (stable; the plain PyPI wheel is this one) and cu132
# (experimental); cu128 was dropped in 2.12. cu126 has kernels for Maxwell to Hopper
# (sm_50 to sm_90: V100, A100, H100), not for Blackwell; for B200/GB200 nodes build from a
# 13.0 base with TORCH_INDEX=.../cu130 and nvidia-dali-cuda130 instead. (PyTorch plans to
# drop cu126 in 2.15, so a torch upgrade past 2.14 means that move for every node.)
#
# -devel, not -runtime: DeepSpeed compiles its C++/CUDA ops on first use (JIT). dlaunch's
# own configs need only DeepSpeedCPUAdam (engine.offload_optimizer: a C++ op built with
# g++, ninja and the Python headers), but any CUDA op a recipe turns on through
# engine.deepspeed_config (FusedAdam, FusedLamb, ...) needs nvcc and the CUDA headers,
# which only the -devel image has. The ops are not pre-built here (DS_BUILD_OPS): the
# CPU ops are compiled with -march=native, which would bake the build host's CPU into the
# image. No cuDNN in the base: the torch wheel brings its own (nvidia-cudnn-cu12), so a
# -cudnn- base would add a second, unused copy of about 1 GB.
FROM nvidia/cuda:12.6.3-devel-ubuntu22.04

ARG DEBIAN_FRONTEND=noninteractive

# Python 3.11 from Ubuntu 22.04 itself (universe), no third-party PPA: an early 3.11
# release, which is all dlaunch and its libraries ask for (the deadsnakes PPA has newer
# 3.11 patch releases). -dev for the headers DeepSpeed's JIT ops compile against, -venv
# for ensurepip; build-essential for the compiler they need; git so that a run's env.json
# can record the commit of the directory it was started from.
# The apt packages are not version-pinned (DL3008): the Ubuntu archive keeps only the
# newest build of a package in jammy-updates/-security, so an exact pin breaks the build
# at the next security update. The base tag fixes the OS; the Python stack, which is what
# decides a run's numbers, is pinned exactly below.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential \
        ca-certificates \
        git \
        python3.11 \
        python3.11-dev \
        python3.11-venv \
    && rm -rf /var/lib/apt/lists/*

# Everything Python lives in one virtual environment, apart from Ubuntu's python3.10.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
RUN python3.11 -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir pip==26.3

# torch from the PyTorch index, so that it is the cu126 build; `torch==2.13.0` matches
# the wheel 2.13.0+cu126 (a local version label) and must agree with the Makefile's pin
# (tests/unit/test_dockerfile.py checks that).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}"

# The rest from PyPI, pinned. torch is named again with its pin so that pip keeps the
# CUDA build above rather than swapping in PyPI's cu130 one. DeepSpeed is an sdist;
# installed this way it builds no ops (they are JIT-compiled on first use, see above).
# dlaunch's other dependencies are pinned here as well, so that the layer below, the only
# one a code change rebuilds, downloads nothing.
ARG DEEPSPEED_VERSION=0.19.8
ARG ACCELERATE_VERSION=1.15.0
ARG RAY_VERSION=2.60.0
ARG DALI_VERSION=2.4.0
ARG PYARROW_VERSION=26.0.1
RUN pip install --no-cache-dir \
        "torch==${TORCH_VERSION}" \
        "deepspeed==${DEEPSPEED_VERSION}" \
        "accelerate==${ACCELERATE_VERSION}" \
        "ray[tune]==${RAY_VERSION}" \
        "nvidia-dali-cuda120==${DALI_VERSION}" \
        "pyarrow==${PYARROW_VERSION}" \
        numpy==2.4.6 \
        scikit-learn==1.9.1 \
        tensorboard==2.21.0 \
        tqdm==4.70.1 \
        pydantic==2.14.4 \
        pyyaml==6.0.4

# dlaunch itself, from the build context (.dockerignore keeps .venv, runs/ and .git out).
# "./[train]" rather than ".[train]": the same to pip, and a path hadolint's DL3013
# (pin versions in pip) recognises as local, with nothing to pin.
WORKDIR /opt/dlaunch
COPY pyproject.toml README.md ./
COPY launcher ./launcher
COPY cluster ./cluster
RUN pip install --no-cache-dir "./[train]"
COPY recipes ./recipes

# NCCL defaults go in /etc/nccl.conf, not in ENV. NCCL reads the file at init and lets
# the environment win; pyxis and apptainer do the opposite for an image's ENV (the image's
# value beats the host's), so `ENV NCCL_DEBUG=WARN` would silently override a recipe's
# NCCL_DEBUG=INFO. WARN: NCCL says why it failed, and stays quiet otherwise.
# NCCL_SOCKET_IFNAME (and NCCL_IB_HCA) are left unset on purpose: the right interface is
# the cluster's (ib0, eth0, ^docker,lo, ...), and NCCL's own choice is right more often
# than a guess baked into an image; set them in the recipe's cluster.slurm environment.
RUN printf 'NCCL_DEBUG=WARN\n' > /etc/nccl.conf

# TORCH_NCCL_ASYNC_ERROR_HANDLING=1: when a collective fails or times out (a peer node
# died), the watchdog ends the process instead of leaving it hanging in the collective,
# so the agent fails and srun --kill-on-bad-exit ends the job. torchrun sets the same for
# its workers; this covers anything started without it. (NCCL_ASYNC_ERROR_HANDLING is
# the deprecated name; torch warns when it sees it.)
# TORCH_EXTENSIONS_DIR: DeepSpeed's JIT ops are built on node-local /tmp, not in
# ~/.cache/torch_extensions, which on a cluster is a home directory shared by every node:
# concurrent builds there contend on one lock file over NFS, and a killed build leaves
# the lock behind and hangs the next job.
ENV TORCH_NCCL_ASYNC_ERROR_HANDLING=1 \
    TORCH_EXTENSIONS_DIR=/tmp/torch_extensions

# No USER: pyxis/enroot and apptainer run the container as the submitting user, not as
# root, so a user made here would never be used (and hadolint's DL3002 only objects to
# an explicit `USER root`).
CMD ["dlaunch", "--help"]
