#!/usr/bin/env bash
# A single-node SLURM cluster on this machine (node "localhost", partition "debug"), for testing
# the cluster path against a real scheduler. Idempotent and quiet: installs Debian's slurm-wlm and
# munge when absent, writes slurm.conf, starts munged, slurmctld and slurmd as plain daemons (no
# systemd; works as root in a container) and waits until the node is idle.
# A running controller that answers is left as it is. Exits non-zero with a one-line reason on
# stderr when anything fails.
#
# Environment: SLURM_CONF_DIR (default /etc/slurm), SLURM_STATE_DIR (default /var/spool/slurm-ci),
# SLURM_WAIT_S (default 60).
set -uo pipefail

CONF_DIR=${SLURM_CONF_DIR:-/etc/slurm}
STATE_DIR=${SLURM_STATE_DIR:-/var/spool/slurm-ci}
WAIT_S=${SLURM_WAIT_S:-60}
LOG_DIR=$STATE_DIR/log

fail() { echo "install_slurm: $*" >&2; exit 1; }

node_state() { sinfo -h -N -n localhost -o %t 2>/dev/null | head -n1; }
idle_or_busy() { case "$(node_state)" in idle*|mix*|alloc*) return 0 ;; *) return 1 ;; esac; }

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
ours_up() {  # daemons this script started earlier: both still there?
    running "$STATE_DIR/slurmctld.pid" && running "$STATE_DIR/slurmd.pid"
}
# Already running and usable: nothing to do. (The controller reports a node idle for a while
# after its slurmd has gone, so daemons started here are checked by their pid files.)
if command -v sinfo >/dev/null 2>&1 && idle_or_busy; then
    if [ ! -e "$STATE_DIR/slurmctld.pid" ] || ours_up; then
        exit 0
    fi
fi

[ "$(id -u)" -eq 0 ] || fail "needs root to install and start slurm (run as root, or start slurmctld yourself)"

if ! command -v slurmctld >/dev/null 2>&1 || ! command -v slurmd >/dev/null 2>&1 \
        || ! command -v munged >/dev/null 2>&1 || ! command -v sinfo >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || fail "slurm is not installed and there is no apt-get to install it"
    export DEBIAN_FRONTEND=noninteractive
    apt_log=$(mktemp)
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
            slurm-wlm munge; } >"$apt_log" 2>&1; then
        reason=$(grep -E '^(E|W):' "$apt_log" | head -n1)
        rm -f "$apt_log"
        fail "apt-get install slurm-wlm munge failed: ${reason:-see apt-get output}"
    fi
    rm -f "$apt_log"
fi

# -- munge: one key, one daemon ----------------------------------------------------------------
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge || fail "cannot create munge folders"
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none \
        || fail "cannot write /etc/munge/munge.key"
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null \
    || fail "cannot give munge its folders (no munge user?)"
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if ! munge -n </dev/null >/dev/null 2>&1; then
    runuser -u munge -- munged --force >/dev/null 2>&1 || munged --force >/dev/null 2>&1 \
        || fail "munged does not start (see /var/log/munge/munged.log)"
    for _ in $(seq 20); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.25; done
    munge -n </dev/null >/dev/null 2>&1 || fail "munged started but does not answer"
fi

# -- slurm.conf for this one machine -----------------------------------------------------------
cpus=$(nproc)
mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.95}' /proc/meminfo)
mkdir -p "$CONF_DIR" "$STATE_DIR/ctld" "$STATE_DIR/d" "$LOG_DIR" || fail "cannot create $STATE_DIR"
chown -R slurm:slurm "$STATE_DIR" 2>/dev/null || fail "cannot give slurm $STATE_DIR (no slurm user?)"
conf=$CONF_DIR/slurm.conf
new_conf=$(mktemp)
cat >"$new_conf" <<CONF
# Written by .ci/install_slurm.sh: one node (this machine), one partition.
ClusterName=localcluster
SlurmctldHost=localhost
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
ReturnToService=2
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmdSpoolDir=$STATE_DIR/d
StateSaveLocation=$STATE_DIR/ctld
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=error
SlurmdDebug=error
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=5
MinJobAge=30
InactiveLimit=0
SlurmdTimeout=60
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
restart=0
if ! cmp -s "$new_conf" "$conf"; then
    mv "$new_conf" "$conf" || fail "cannot write $conf"
    chmod 0644 "$conf"
    restart=1
else
    rm -f "$new_conf"
fi
# slurm 22.05 refuses to start without a cgroup.conf when any cgroup plugin is named; harmless here.
[ -e "$CONF_DIR/cgroup.conf" ] || echo "CgroupPlugin=autodetect" >"$CONF_DIR/cgroup.conf"

# -- daemons -----------------------------------------------------------------------------------
if [ "$restart" -eq 1 ]; then
    for pidfile in "$STATE_DIR/slurmd.pid" "$STATE_DIR/slurmctld.pid"; do
        if running "$pidfile"; then kill "$(cat "$pidfile")"; sleep 1; fi
    done
fi
if ! running "$STATE_DIR/slurmctld.pid"; then
    slurmctld -f "$conf" >>"$LOG_DIR/start.log" 2>&1 \
        || fail "slurmctld does not start: $(tail -n1 "$LOG_DIR/slurmctld.log" 2>/dev/null)"
fi
if ! running "$STATE_DIR/slurmd.pid"; then
    slurmd -f "$conf" -N localhost >>"$LOG_DIR/start.log" 2>&1 \
        || fail "slurmd does not start: $(tail -n1 "$LOG_DIR/slurmd.log" 2>/dev/null)"
fi

deadline=$((SECONDS + WAIT_S))
while [ $SECONDS -lt $deadline ]; do
    state=$(node_state)
    case "$state" in
        idle*|mix*|alloc*) exit 0 ;;
        down*|drain*) scontrol update nodename=localhost state=resume >/dev/null 2>&1 ;;
    esac
    sleep 1
done
fail "node localhost is not idle after ${WAIT_S}s (state: ${state:-none}; see $LOG_DIR)"
