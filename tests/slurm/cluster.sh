#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for the integration tests.
#
#   tests/slurm/cluster.sh start    install (apt) and start munged, slurmctld, slurmd n1 and n2
#   tests/slurm/cluster.sh stop     stop slurmctld and both slurmd (munged keeps running)
#   tests/slurm/cluster.sh status   exit 0 if both nodes answer, print sinfo
#
# Runs as root. `start` is idempotent: what is installed or running already is
# left alone, so it can run before every test session. Both nodes are
# 127.0.0.1 with 2 CPUs each (oversubscribed); state, spool, pid and log files
# live under $MM_SLURM_ROOT (default /var/tmp/mmpretrain-slurm). An existing
# /etc/slurm/slurm.conf that this script did not write is never overwritten.
set -euo pipefail

ROOT=${MM_SLURM_ROOT:-/var/tmp/mmpretrain-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by mmpretrain tests/slurm/cluster.sh"

die() { echo "cluster.sh: $*" >&2; exit 1; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and there is no apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq slurm-wlm munge >/dev/null || die "apt-get install slurm-wlm munge failed"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    mkdir -p /etc/munge /var/log/munge /var/lib/munge /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key /var/log/munge /var/lib/munge /run/munge
    chmod 400 /etc/munge/munge.key
    chmod 700 /etc/munge
    # As the munge user, as its packaging does; --force: a stale socket from a dead munged is fine.
    runuser -u munge -- munged --force || die "munged did not start (see /var/log/munge/munged.log)"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.2
    done
    die "munge -n | unmunge does not succeed"
}

write_conf() {
    local host
    host=$(hostname)
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; not touching it"
    fi
    mkdir -p "$ROOT"/{state,spool,run,log} /etc/slurm
    cat >"$CONF.new" <<EOF
$MARK
ClusterName=local
SlurmctldHost=$host
AuthType=auth/munge
# A requeued job waits cred_expire + 1 s before it may start again (default 120).
AuthInfo=cred_expire=15
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool/%n
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd.%n.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.%n.log
SchedulerType=sched/backfill
# Schedule pending (e.g. requeued) jobs within seconds, not the default 30-60 s.
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=30
MinJobAge=600
NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=17001-17002 CPUs=2 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
    if [ -f "$CONF" ] && cmp -s "$CONF.new" "$CONF"; then
        rm "$CONF.new"
    else
        # A changed configuration: restart the daemons this script started.
        stop
        mv "$CONF.new" "$CONF"
    fi
    if ! getent hosts n1 >/dev/null || ! getent hosts n2 >/dev/null; then
        echo "127.0.0.1 n1 n2" >>/etc/hosts
    fi
}

alive() {  # pid file -> running?
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

nodes_up() {
    [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE '^n[12] (idle|mix|alloc)')" = 2 ]
}

start() {
    [ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts daemons)"
    install_packages
    start_munge
    write_conf
    if ! alive "$ROOT/run/slurmctld.pid"; then
        slurmctld || die "slurmctld did not start (see $ROOT/log/slurmctld.log)"
    fi
    for node in n1 n2; do
        if ! alive "$ROOT/run/slurmd.$node.pid"; then
            slurmd -N "$node" || die "slurmd -N $node did not start (see $ROOT/log/slurmd.$node.log)"
        fi
    done
    for _ in $(seq 60); do
        if nodes_up; then
            sinfo
            return
        fi
        # A node left DOWN by an earlier stop comes back once its slurmd answers.
        scontrol update nodename=n[1-2] state=resume >/dev/null 2>&1 || true
        sleep 0.5
    done
    sinfo >&2 || true
    die "the nodes did not become idle (see $ROOT/log)"
}

stop() {
    scontrol shutdown >/dev/null 2>&1 || true
    for _ in $(seq 100); do
        alive "$ROOT/run/slurmctld.pid" || alive "$ROOT/run/slurmd.n1.pid" || alive "$ROOT/run/slurmd.n2.pid" || return 0
        sleep 0.2
    done
    die "the SLURM daemons did not stop"
}

status() {
    nodes_up && sinfo
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start|stop|status" ;;
esac
