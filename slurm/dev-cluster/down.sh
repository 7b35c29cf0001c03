#!/usr/bin/env bash
# Tear down the dev cluster that up.sh started: cancel its jobs, then stop exactly the
# daemons named by the pid files in the state dir (slurmd x4, slurmctld, munged), waiting
# for each to exit. Nothing is killed by name. The state dir is kept (logs, job state)
# unless --purge is given, which removes it. /etc/hosts lines for node1..4 are kept.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$here/common.sh"

purge=0
case ${1:-} in
    "") ;;
    --purge) purge=1 ;;
    *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
esac

# A cluster up.sh started in another network namespace (the tests start theirs in a
# loopback-only one) answers squeue and scancel only there: run this script in slurmctld's.
if ctld=$(pid_of slurmctld "$RUN_DIR/slurmctld.pid") && [[ $(net_ns "$ctld") != "$(net_ns $$)" ]]; then
    exec nsenter --net="/proc/$ctld/ns/net" -- "$BASH" "${BASH_SOURCE[0]}" "$@"
fi

# wait_gone SECONDS PID...: true once none of the pids is alive.
wait_gone() {
    local limit=$1 i pid alive
    shift
    for ((i = 0; i < limit * 10; i++)); do
        alive=0
        for pid in "$@"; do
            # A zombie has exited; only its parent's wait is missing.
            if [[ -e /proc/$pid && $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]]; then
                alive=1
            fi
        done
        ((alive)) || return 0
        sleep 0.1
    done
    return 1
}

# stop NAME PIDFILE...: SIGTERM, wait, then SIGKILL what is left.
stop() {
    local pids=() entry pid
    for entry in "$@"; do
        pid=$(pid_of "${entry%%:*}" "${entry#*:}") && pids+=("$pid")
    done
    ((${#pids[@]})) || return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    if ! wait_gone 15 "${pids[@]}"; then
        echo "down.sh: ${pids[*]} ignored SIGTERM for 15s; sending SIGKILL" >&2
        kill -KILL "${pids[@]}" 2>/dev/null || true
        wait_gone 5 "${pids[@]}" || true
    fi
}

was_up=0
while read -r name pidfile; do
    pid_of "$name" "$pidfile" >/dev/null && was_up=1
done < <(daemons)

# 1. Jobs first, so that slurmstepd ends every job process before its slurmd goes.
jobs_ended=0
if [[ -e $CONF ]] && pid_of slurmctld "$RUN_DIR/slurmctld.pid" >/dev/null; then
    jobs=$(timeout 10 squeue -h -o %A 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        # shellcheck disable=SC2086  # one job id per word
        timeout 10 scancel $jobs 2>/dev/null || true
    fi
    for ((i = 0; i < 300; i++)); do
        if [[ -z $(timeout 10 squeue -h -o %A 2>/dev/null || echo failed) ]]; then
            jobs_ended=1
            break
        fi
        sleep 0.1
    done
fi

# 2. The daemons, in the reverse of their start order.
mapfile -t all < <(daemons | tr ' ' ':')
slurmds=()
for entry in "${all[@]}"; do [[ $entry == slurmd:* ]] && slurmds+=("$entry"); done
stop "${slurmds[@]}"
stop "slurmctld:$RUN_DIR/slurmctld.pid"
stop "munged:$RUN_DIR/munged.pid"

# 3. A slurmstepd outlives its slurmd by design. Any still here (slurmctld was gone, or a
#    job would not die) belongs to this cluster if it holds a file under the state dir (its
#    node's log). It and every process below it (the job's shell, srun, tasks) are killed.
stepds=()
for proc in /proc/[0-9]*; do
    [[ $(cat "$proc/comm" 2>/dev/null) == slurmstepd ]] || continue
    if [[ -n $(find "$proc/fd" -maxdepth 1 -lname "$DIR/*" -print -quit 2>/dev/null) ]]; then
        stepds+=("${proc#/proc/}")
    fi
done
if ((${#stepds[@]})); then
    echo "down.sh: killing leftover slurmstepd ${stepds[*]} and the processes under them" >&2
    # shellcheck disable=SC2046  # one pid per word
    kill -KILL $(ps -e -o pid=,ppid= | awk -v roots="${stepds[*]}" '
        BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) tree[r[i]] = 1 }
        { parent[$1] = $2 }
        END {
            do { grew = 0
                 for (p in parent) if (!(p in tree) && (parent[p] in tree)) { tree[p] = 1; grew = 1 }
            } while (grew)
            for (p in tree) print p
        }') 2>/dev/null || true
fi

rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"

# Jobs that slurmctld could not see end (it was not running) were killed above, but its
# saved state still calls them running; restored, they would hold CPUs. Forget them.
if ((!jobs_ended && !purge && (was_up || ${#stepds[@]}))) && [[ -e $DIR/state/job_state ]]; then
    echo "down.sh: slurmctld could not cancel the jobs (not running?); dropping its saved" \
        "job state, so job ids start again at 1" >&2
    rm -f "$DIR/state/job_state" "$DIR/state/job_state.old"
fi

if ((purge)) && [[ -d $DIR ]]; then
    # Only a directory up.sh made: never rm -rf an unrelated path given by mistake.
    if [[ -e $CONF && $(head -n 1 "$CONF") != *slurm/dev-cluster/up.sh* ]]; then
        echo "down.sh: $CONF was not written by up.sh; not removing $DIR" >&2
        exit 1
    fi
    if [[ ! -e $CONF && -n $(ls -A "$DIR") && ! -d $DIR/munge ]]; then
        echo "down.sh: $DIR does not look like a dev-cluster state dir; not removing it" >&2
        exit 1
    fi
    rm -rf "$DIR"
fi
