#!/usr/bin/env bash
# A single-node SLURM cluster on this machine: munge, slurmctld and slurmd on localhost.
#
#   bash launchers/slurm_cluster.sh up      # install (Debian/Ubuntu, root) and start; idempotent
#   bash launchers/slurm_cluster.sh down    # stop the daemons this script started
#   bash launchers/slurm_cluster.sh status  # exit 0 when the node accepts jobs
#
# For tests and trying the SLURM preset without a cluster; a real cluster needs none of this.
# tests/test_slurm.py runs it only when asked (PROBE_SWEEP_SLURM_TEST=1, or CI=true): as root it
# installs packages, writes /etc/slurm and /etc/munge and starts daemons.
# `up` prints "started" when it started daemons and "already up" when it found them running, so a
# caller tears down only what it brought up. Exit status 3 means SLURM cannot be installed here
# (not root, no apt-get, or the packages are unreachable): callers skip, they do not fail.
set -euo pipefail

STATE=${PROBE_SWEEP_SLURM_STATE:-/var/lib/probe_sweep_slurm}
CONF=/etc/slurm/slurm.conf
PARTITION=${PROBE_SWEEP_SLURM_PARTITION:-debug}
MARK="# written by probe_sweep launchers/slurm_cluster.sh"

log() { echo "slurm_cluster: $*" >&2; }
cannot() { log "cannot run SLURM here: $*"; exit 3; }

node_ready() {
    command -v sinfo >/dev/null 2>&1 || return 1
    local state
    state=$(timeout 10 sinfo -h -p "$PARTITION" -o %T 2>/dev/null | head -n1) || return 1
    [[ $state == idle* || $state == mixed* || $state == allocated* ]]
}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null
    then
        return
    fi
    [[ $(id -u) == 0 ]] || cannot "installing slurm-wlm needs root"
    command -v apt-get >/dev/null || cannot "no apt-get (this script supports Debian/Ubuntu)"
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq slurm-wlm munge; } >"$STATE.apt.log" 2>&1 ||
        cannot "apt-get install slurm-wlm munge failed (see $STATE.apt.log)"
}

start_munge() {
    if timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; then
        return
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown -R munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
    chmod 0700 /etc/munge /var/log/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
    runuser -u munge -- munged
    touch "$STATE/started_munge"
    for _ in $(seq 50); do
        timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1 && return
        sleep 0.2
    done
    cannot "munged did not start"
}

write_conf() {
    local host node
    host=$(hostname -s)
    # slurmd -C reports this machine's CPUs, sockets and memory in slurm.conf syntax.
    node=$(slurmd -C | head -n1)
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$STATE/log"
    cat >"$STATE/slurm.conf.new" <<EOF
$MARK
ClusterName=probesweep
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=300
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        if ! cmp -s "$CONF" "$STATE/slurm.conf.new"; then
            cannot "$CONF exists and was not written by this script; not touching it"
        fi
    fi
    mv "$STATE/slurm.conf.new" "$CONF"
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

up() {
    mkdir -p "$STATE"
    if node_ready; then
        echo "already up"
        return
    fi
    install
    start_munge
    write_conf
    pid_alive "$STATE/slurmctld.pid" || slurmctld -c
    pid_alive "$STATE/slurmd.pid" || slurmd
    touch "$STATE/started_slurm"
    for i in $(seq 120); do
        if node_ready; then
            echo "started"
            return
        fi
        # A node left DOWN by an earlier run is put back into service.
        if ((i % 10 == 0)); then
            scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
        fi
        sleep 0.5
    done
    log "the node did not become idle; logs in $STATE/log"
    tail -n 20 "$STATE/log/"*.log >&2 || true
    exit 1
}

stop_pidfile() {
    local pidfile=$1 pid
    pid_alive "$pidfile" || return 0
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
}

down() {
    if [[ -f $STATE/started_slurm ]]; then
        timeout 20 scancel --user=root >/dev/null 2>&1 || true
        stop_pidfile "$STATE/slurmd.pid"
        stop_pidfile "$STATE/slurmctld.pid"
        rm -f "$STATE/started_slurm"
    fi
    if [[ -f $STATE/started_munge ]]; then
        stop_pidfile /run/munge/munged.pid
        rm -f "$STATE/started_munge"
    fi
    echo "down"
}

case ${1:-} in
up) up ;;
down) down ;;
status) node_ready ;;
*)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
