#!/usr/bin/env bash
# A throwaway one-node SLURM cluster on this machine (for tests/test_slurm.py and for trying the
# sbatch scripts in launch/slurm/ without a real cluster).
#
#   bash scripts/slurm_local.sh start DIR     # writes DIR/slurm.conf, starts munged, slurmctld, slurmd
#   export SLURM_CONF=DIR/slurm.conf          # then sbatch / squeue / scontrol talk to it
#   bash scripts/slurm_local.sh stop DIR      # stops the three daemons (by their pid files)
#
# Everything (munge key and socket, state, spool, logs, pid files) lives under DIR, and the
# daemons listen on free ports, so a system SLURM/munge on the same machine is left alone.
# Needs root (slurmd starts jobs as their owner) and the Debian packages `slurm-wlm munge`
# (`apt-get install -y slurm-wlm munge`). No systemd and no cgroups are needed:
# proctrack/linuxproc + task/none. Exit status: 0 started/stopped, 1 failed (the reason and the
# daemon logs go to stderr).
set -euo pipefail

usage() { echo "usage: $0 start|stop|status DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
CMD=$1
DIR=$(mkdir -p "$2" && cd "$2" && pwd)
CONF=$DIR/slurm.conf
NODE=$(hostname -s)

die() {
    echo "slurm_local: $*" >&2
    for f in "$DIR"/munged.log "$DIR"/slurmctld.log "$DIR"/slurmd.log; do
        [[ -s $f ]] && { echo "--- $f (last lines)" >&2; tail -n 15 "$f" >&2; }
    done
    exit 1
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_one() {  # stop_one PIDFILE NAME: TERM, then KILL after 10 s
    local pf=$1 pid
    pid_alive "$pf" || { rm -f "$pf"; return 0; }
    pid=$(cat "$pf")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        echo "slurm_local: $2 (pid $pid) ignored SIGTERM, killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pf"
}

free_port() {  # a TCP port nobody listens on now (bash only: no python needed on the host)
    local p
    for _ in $(seq 200); do
        p=$((20000 + RANDOM % 20000))
        (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return 0; }
    done
    die "no free TCP port found"
}

start() {
    [[ $(id -u) -eq 0 ]] || die "needs root (slurmd must start jobs as their owner)"
    for b in munged slurmctld slurmd sbatch scontrol sinfo; do
        command -v "$b" >/dev/null || die "$b not found: apt-get install -y slurm-wlm munge"
    done
    if pid_alive "$DIR/slurmctld.pid"; then die "a cluster is already running from $DIR (stop it first)"; fi
    mkdir -p "$DIR"/state "$DIR"/spool
    chmod 700 "$DIR"

    # munge: a private key and socket (munged insists on owner-only permissions).
    if [[ ! -s $DIR/munge.key ]]; then
        head -c 1024 /dev/urandom >"$DIR/munge.key"
    fi
    chmod 400 "$DIR/munge.key"
    # --force: munged refuses to run as root, or with a key in a directory others could write, otherwise.
    munged --force --key-file="$DIR/munge.key" --socket="$DIR/munge.socket" \
        --pid-file="$DIR/munged.pid" --log-file="$DIR/munged.log" --seed-file="$DIR/munged.seed" \
        >>"$DIR/munged.log" 2>&1 || die "munged did not start"

    local cpus mem ctld_port d_port
    cpus=$(nproc)
    # Configured memory must not exceed what slurmd detects; a small value is enough for tests.
    mem=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem=$(( ${mem:-2048} > 4096 ? 4096 : ${mem:-2048} ))
    ctld_port=$(free_port)
    d_port=$(free_port)
    while [[ $d_port == "$ctld_port" ]]; do d_port=$(free_port); done
    cat >"$CONF" <<EOF
# Written by scripts/slurm_local.sh: a one-node test cluster, not for production.
ClusterName=bmblocal
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long before it may start again (default 120 s).
AuthInfo=socket=$DIR/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No systemd / cgroups in CI containers: track processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
# Start pending (e.g. requeued) jobs within seconds instead of the default minute.
SchedulerParameters=sched_interval=2
JobRequeue=1
ReturnToService=2
KillWait=30
MinJobAge=600
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF=$CONF
    slurmctld -f "$CONF" >>"$DIR/slurmctld.log" 2>&1 || die "slurmctld did not start"
    slurmd -f "$CONF" -N "$NODE" >>"$DIR/slurmd.log" 2>&1 || die "slurmd did not start"
    local state=""
    for _ in $(seq 150); do
        state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null || true)
        [[ $state == idle ]] && break
        sleep 0.2
    done
    [[ $state == idle ]] || die "node $NODE is '${state:-unreachable}', not idle, after 30 s"
    echo "slurm_local: up (node $NODE, $cpus CPUs); export SLURM_CONF=$CONF"
}

stop() {
    # slurmd first (it may still be cleaning up a job), then the controller, then munge.
    stop_one "$DIR/slurmd.pid" slurmd
    stop_one "$DIR/slurmctld.pid" slurmctld
    stop_one "$DIR/munged.pid" munged
    echo "slurm_local: stopped ($DIR)"
}

case $CMD in
    start) start ;;
    stop) stop ;;
    status)
        for d in munged slurmctld slurmd; do
            if pid_alive "$DIR/$d.pid"; then echo "$d: running (pid $(cat "$DIR/$d.pid"))"; else echo "$d: stopped"; fi
        done ;;
    *) usage ;;
esac
