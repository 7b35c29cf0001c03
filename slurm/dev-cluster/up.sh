#!/usr/bin/env bash
# Bring up a real Slurm with 4 emulated nodes (node1..node4) on this host: one munged,
# one slurmctld, one `slurmd -N nodeK` per node, all talking over 127.0.0.1. Every file
# (slurm.conf, munge key and socket, spool, state, pid files, logs) lives under
# ${DLAUNCH_SLURM_DIR:-/tmp/dlaunch-slurm}; ports are ${DLAUNCH_SLURM_PORT_BASE:-17000}
# (slurmctld) and the next four (slurmd of node1..node4).
#
#   eval "$(slurm/dev-cluster/up.sh)"    # then sinfo, sbatch, srun, squeue, scontrol ...
#
# Idempotent: daemons already running are left alone, missing ones are started, and the
# exports are printed either way. Progress and errors go to stderr; stdout carries only
# the exports. Needs root (slurmd runs jobs as their users; /etc/hosts gets node1..4).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$here/common.sh"

die() {
    echo "up.sh: $*" >&2
    log_tails
    exit 1
}

for cmd in munged munge unmunge slurmctld slurmd sinfo scontrol; do
    command -v "$cmd" >/dev/null || die "$cmd not found; run $here/install.sh first"
done
[[ $(id -u) -eq 0 ]] || die "run as root: slurmd must be able to start jobs as any user"

# Daemons of this cluster that run in another network namespace (the tests start theirs in
# a loopback-only one) cannot be reached from this one, nor left alone as if they could.
while read -r name pidfile; do
    if pid=$(pid_of "$name" "$pidfile") && [[ $(net_ns "$pid") != "$(net_ns $$)" ]]; then
        echo "up.sh: $name (pid $pid) of this cluster runs in another network namespace;" \
            "stop the cluster with $here/down.sh first" >&2
        exit 1
    fi
done < <(daemons)

host=$(hostname -s)

# --- /etc/hosts: node names resolve to this host (append missing lines only) ---------
# This host's own name too, if nothing resolves it: with NoInAddrAny (below) srun and
# slurmd bind to the address their host name resolves to.
if ! getent hosts "$host" >/dev/null; then
    echo "127.0.0.1 $host  # dlaunch dev cluster" >>/etc/hosts
fi
for node in "${NODES[@]}"; do
    if ! awk -v n="$node" '$1 !~ /^#/ { for (i = 2; i <= NF; i++) if ($i == n) found = 1 }
                           END { exit !found }' /etc/hosts; then
        echo "127.0.0.1 $node  # dlaunch dev cluster" >>/etc/hosts
    fi
done

# With NoInAddrAny, slurmctld and srun bind the address the host name resolves to, as
# getaddrinfo(AF_INET, AI_ADDRCONFIG) finds it (so does getent ahostsv4), and it must be one
# of this network namespace (in a loopback-only namespace, a 127.x address).
addr=$(getent ahostsv4 "$host" | awk 'NR == 1 { print $1 }') ||
    die "this host's name $host has no IPv4 address here (AI_ADDRCONFIG finds none where" \
        "127.0.0.1 is the only IPv4 address: give lo another, such as 127.0.0.2/8)"
if command -v ip >/dev/null && [[ $(ip route get "$addr" 2>/dev/null) != local* ]]; then
    die "this host's name $host resolves to $addr, which is no address of this network" \
        "namespace: map $host to 127.0.0.1 in /etc/hosts"
fi

# --- directories and the munge key ---------------------------------------------------
mkdir -p "$DIR" "$MUNGE_DIR" "$RUN_DIR" "$LOG_DIR" "$DIR/state"
for node in "${NODES[@]}"; do mkdir -p "$DIR/spool/$node"; done
# munged refuses keys and sockets in directories that others may write to.
chmod 755 "$DIR" "$MUNGE_DIR"
if [[ ! -s $MUNGE_DIR/munge.key ]]; then
    (umask 077 && dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none)
fi
chmod 400 "$MUNGE_DIR/munge.key"
: >"$DIR/plugstack.conf"   # no SPANK plugins from the host's /etc/slurm

# --- slurm.conf: rewritten only when it changes (running daemons then restart) ------
last_port=$((PORT_BASE + ${#NODES[@]}))
cat >"$CONF.new" <<CONF
# Written by slurm/dev-cluster/up.sh: a 4-node dev cluster on one host. Do not edit.
ClusterName=dlaunch
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT_BASE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also holds a requeued job back (default 120 s); 10 s keeps requeue tests short.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
# Bind to the addresses in this file (127.0.0.1), not to every interface: slurmd to its
# NodeAddr; slurmctld (NoCtldInAddrAny), srun and slurmstepd to what the host name resolves to.
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny

StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$DIR/plugstack.conf
MailProg=/bin/true

# No cgroups in a container: track job processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none

# Jobs share nodes by CPU (memory is not a consumable), so two 2-node jobs can run on
# the same two nodes at once.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Frequent passes: a requeued job becomes eligible on a timer, not on an event.
SchedulerParameters=sched_interval=2,bf_interval=1
JobRequeue=1
ReturnToService=2
# Finished jobs stay visible to scontrol show job for 5 minutes.
MinJobAge=300
# 10 s from SIGTERM to SIGKILL when a job is cancelled or runs out of time.
KillWait=10
KillOnBadExit=0
InactiveLimit=0

# No slurmdbd: sacct has no database to read. Finished jobs are appended to a text file.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.txt

# The nodes claim the CPUs and memory written here, whatever this host has.
SlurmdParameters=config_overrides
NodeName=node[1-${#NODES[@]}] NodeHostname=$host NodeAddr=127.0.0.1 Port=[$((PORT_BASE + 1))-$last_port] CPUs=4 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=node[1-${#NODES[@]}] Default=YES MaxTime=INFINITE State=UP
CONF
if ! cmp -s "$CONF.new" "$CONF"; then
    if [[ -e $CONF ]]; then
        echo "up.sh: slurm.conf changed; restarting the cluster" >&2
        "$here/down.sh" >&2
    fi
    mv "$CONF.new" "$CONF"
else
    rm -f "$CONF.new"
fi

# --- daemons -------------------------------------------------------------------------
# start NAME PIDFILE COMMAND...: start a daemon unless ours is running. It runs in its own
# session, detached from the caller's terminal and pipes (a test runner that waits for EOF
# on its pipe must not wait for the daemons).
start() {
    local name=$1 pidfile=$2
    shift 2
    pid_of "$name" "$pidfile" >/dev/null && return 1
    rm -f "$pidfile"
    setsid "$@" </dev/null >>"$LOG_DIR/daemons.out" 2>&1
}

# gone PIDFILE: the daemon wrote its pid file and has exited since (its start failed).
gone() {
    local pid
    pid=$(pid_in "$1") || return 1
    [[ ! -e /proc/$pid || $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) == Z ]]
}

# poll SECONDS PROBE: wait until PROBE succeeds (true) or SECONDS have passed (false);
# die at once when PROBE returns 99: a daemon it needs has died, no point in waiting.
poll() {
    local deadline=$((SECONDS + $1)) rc
    shift
    while ((SECONDS < deadline)); do
        rc=0
        "$@" >/dev/null 2>&1 || rc=$?
        ((rc == 0)) && return 0
        ((rc == 99)) && die "a daemon exited while starting (probe: $1)"
        sleep 0.1
    done
    return 1
}

munge_ok() {
    gone "$RUN_DIR/munged.pid" && return 99
    munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET"
}
start munged "$RUN_DIR/munged.pid" munged --force --key-file="$MUNGE_DIR/munge.key" \
    --socket="$MUNGE_SOCKET" --pid-file="$RUN_DIR/munged.pid" --log-file="$LOG_DIR/munged.log" \
    --seed-file="$MUNGE_DIR/munged.seed" || true
poll 10 munge_ok || die "munged did not answer on $MUNGE_SOCKET within 10s"

ctld_ok() {
    gone "$RUN_DIR/slurmctld.pid" && return 99
    timeout 5 scontrol ping
}
start slurmctld "$RUN_DIR/slurmctld.pid" slurmctld -f "$CONF" || true
poll 20 ctld_ok || die "slurmctld did not answer on 127.0.0.1:$PORT_BASE within 20s"

started=()
since=$(date +%s)
for node in "${NODES[@]}"; do
    if start slurmd "$RUN_DIR/slurmd-$node.pid" slurmd -N "$node" -f "$CONF"; then
        started+=("$node")
    fi
done

# Ready when every node is up (idle, or busy with jobs from before) and every slurmd
# started above has registered: a restarted slurmctld restores the old node states from
# its state dir, so "idle" alone may still describe the slurmd before.
nodes_ready() {
    local states node registered
    for node in "${started[@]}"; do
        gone "$RUN_DIR/slurmd-$node.pid" && return 99
    done
    states=$(timeout 5 sinfo -h -N -o '%N %T') || return 1
    [[ $(wc -l <<<"$states") -eq ${#NODES[@]} ]] || return 1
    ! grep -qvE ' (idle|mixed|allocated|completing)$' <<<"$states" || return 1
    for node in "${started[@]}"; do
        registered=$(timeout 5 scontrol show node "$node" | grep -oP 'SlurmdStartTime=\K\S+') || return 1
        (($(date -d "$registered" +%s) >= since - 1)) || return 1
    done
}
# A node that an admin (or an earlier crash) set DOWN or DRAIN stays so: resume them all.
down_nodes=$(timeout 5 sinfo -h -N -t down,drain,fail -o '%N' | sort -u | paste -sd, -) || true
if [[ -n $down_nodes ]]; then
    timeout 5 scontrol update NodeName="$down_nodes" State=RESUME >/dev/null 2>&1 || true
fi
poll 30 nodes_ready ||
    die "nodes not ready within 30s: $(timeout 5 sinfo -h -N -o '%N %T %E' 2>&1 | paste -sd, -)"

printf 'export SLURM_CONF=%q\n' "$CONF"
printf 'export DLAUNCH_SLURM_DIR=%q\n' "$DIR"
