#!/usr/bin/env bash
# Install Debian's Slurm (slurm-wlm: slurmctld, slurmd, slurm-client) and munge.
# Idempotent: when every package is already installed this touches neither apt nor the
# network, so repeated `make test` runs cost nothing. Needs root (or sudo) the first time.
# Package post-install scripts are not allowed to start daemons: up.sh starts its own,
# with all their state under one directory.
set -euo pipefail

packages=(slurmctld slurmd slurm-client munge)

installed() {
    local pkg
    for pkg in "${packages[@]}"; do
        [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" == "install ok installed" ]] || return 1
    done
}

if installed; then
    exit 0
fi

if ! command -v apt-get >/dev/null; then
    echo "install.sh: apt-get not found; install slurm-wlm (22.05) and munge yourself" >&2
    exit 1
fi

sudo=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "install.sh: run as root (or install sudo)" >&2; exit 1; }
    sudo=(sudo)
fi

# Keep the packages' init scripts from starting system-wide munged/slurmd/slurmctld:
# a policy-rc.d that denies every start, only if the machine has none of its own.
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
    "${sudo[@]}" chmod 755 "$policy"
    trap '"${sudo[@]}" rm -f "$policy"' EXIT
fi

export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends slurm-wlm "${packages[@]}" >/dev/null
installed || { echo "install.sh: packages still missing after apt-get install" >&2; exit 1; }
