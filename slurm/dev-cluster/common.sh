# Sourced by up.sh and down.sh: where the dev cluster keeps its state, and how a daemon
# is recognised as one of ours (its pid file names a live process of the right name whose
# command line mentions the state dir, so a recycled pid is never mistaken for it).
# shellcheck shell=bash disable=SC2034  # the variables are for up.sh and down.sh

DIR=${DLAUNCH_SLURM_DIR:-/tmp/dlaunch-slurm}
# slurmctld listens on PORT_BASE, node K's slurmd on PORT_BASE + K.
PORT_BASE=${DLAUNCH_SLURM_PORT_BASE:-17000}
NODES=(node1 node2 node3 node4)

CONF=$DIR/slurm.conf
MUNGE_DIR=$DIR/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
RUN_DIR=$DIR/run
LOG_DIR=$DIR/log

export SLURM_CONF=$CONF

# pid_of NAME PIDFILE: print the pid if PIDFILE names a live NAME process of this cluster.
# (No `cmd | grep -q` here or anywhere: under pipefail, grep exiting early can fail the
# pipeline with the writer's SIGPIPE.)
pid_of() {
    local name=$1 file=$2 pid cmdline
    pid=$(pid_in "$file") || return 1
    [[ -r /proc/$pid/comm && $(</proc/"$pid"/comm) == "$name" ]] || return 1
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ $cmdline == *"$DIR/"* ]] || return 1
    echo "$pid"
}

# pid_in PIDFILE: the pid written in PIDFILE, if it holds one (it may be half-written).
pid_in() {
    local pid
    [[ -r $1 ]] || return 1
    pid=$(<"$1") || return 1
    pid=${pid//[[:space:]]/}
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    echo "$pid"
}

# net_ns PID: the network namespace PID runs in (as net:[inode]).
net_ns() {
    readlink "/proc/$1/ns/net"
}

# Every daemon as "name pidfile", in start order.
daemons() {
    echo "munged $RUN_DIR/munged.pid"
    echo "slurmctld $RUN_DIR/slurmctld.pid"
    local node
    for node in "${NODES[@]}"; do
        echo "slurmd $RUN_DIR/slurmd-$node.pid"
    done
}

log_tails() {
    local f
    for f in "$LOG_DIR"/*.log; do
        [[ -e $f ]] || continue
        echo "==> $f <==" >&2
        tail -n 25 "$f" >&2
    done
}
