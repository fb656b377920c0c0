#!/usr/bin/env bash
# A throw-away one-node SLURM cluster with one fake GPU, for tests (facts: ../shared/notes/slurm.md).
#
#   tests/slurm/cluster.sh start DIR   install slurm-wlm if missing, write the config into DIR,
#                                      start slurmctld and slurmd (pids in DIR/*.pid), wait for idle
#   tests/slurm/cluster.sh stop DIR    stop the daemons by their recorded pids, remove the links
#
# Needs root on a Debian-like machine (CI, a fresh container). It refuses to touch a machine that
# already has its own /etc/slurm/slurm.conf. The partition is named after $BUGSCOPE_SLURM_PARTITION
# (default "bugscope"). The node offers Gres=gpu:$BUGSCOPE_SLURM_GPUS (default 4), character devices
# made with mknod (no real GPU behind them), so that many GPU jobs run side by side, each seeing its
# own CUDA_VISIBLE_DEVICES. The node declares 2 CPUs per fake GPU, at least the real count
# (SlurmdParameters=config_overrides), so the jobs (cpus_per_task=2) fit on a 2-core CI machine,
# where they then share the cores: the point is to overlap SLURM's and Snakemake's latencies.
set -euo pipefail

action=${1:?usage: cluster.sh start|stop DIR}
dir=${2:?usage: cluster.sh start|stop DIR}
partition=${BUGSCOPE_SLURM_PARTITION:-bugscope}
gpus=${BUGSCOPE_SLURM_GPUS:-4}
marker=.bugscope-slurm-cluster

ours() {  # is /etc/slurm/$1 a link into a cluster made by this script?
    local target
    target=$(readlink "/etc/slurm/$1" 2>/dev/null) || return 1
    [[ -e "$(dirname "$target")/$marker" ]]
}

stop() {
    local name pid
    for name in slurmd slurmctld; do
        [[ -f "$dir/$name.pid" ]] || continue
        pid=$(cat "$dir/$name.pid")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$dir/$name.pid"
    done
    for name in slurm.conf gres.conf; do
        if ours "$name" && [[ "$(readlink "/etc/slurm/$name")" == "$dir"/* ]]; then
            rm -f "/etc/slurm/$name"
        fi
    done
}

start() {
    [[ $(id -u) == 0 ]] || { echo "cluster.sh: needs root (installs packages, writes /etc/slurm)" >&2; exit 2; }
    if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null; then
        echo "cluster.sh: installing slurm-wlm" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
    fi
    for name in slurm.conf gres.conf; do
        if [[ -e /etc/slurm/$name || -L /etc/slurm/$name ]] && ! ours "$name"; then
            echo "cluster.sh: /etc/slurm/$name exists and is not a test cluster's; not touching it" >&2
            exit 2
        fi
    done

    mkdir -p "$dir"/{state,spool}
    dir=$(cd "$dir" && pwd -P)
    touch "$dir/$marker"
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    (( cpus >= 2 * gpus )) || cpus=$((2 * gpus))
    mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    local i
    for ((i = 0; i < gpus; i++)); do
        [[ -c "$dir/nvidia$i" ]] || mknod "$dir/nvidia$i" c 195 "$i"
    done

    cat >"$dir/slurm.conf" <<EOF
# Written by tests/slurm/cluster.sh: a one-node test cluster.
ClusterName=bugscope
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
GresTypes=gpu
MinJobAge=3600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.daemon.pid
SlurmdPidFile=$dir/slurmd.daemon.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:$gpus State=UNKNOWN
PartitionName=$partition Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$dir/gres.conf" <<EOF
AutoDetect=off
NodeName=$host Name=gpu File=$dir/nvidia[0-$((gpus - 1))]
EOF
    # The config must be at /etc/slurm/slurm.conf: inside a job the plugin clears SLURM_CONF.
    mkdir -p /etc/slurm
    ln -sfn "$dir/slurm.conf" /etc/slurm/slurm.conf
    ln -sfn "$dir/gres.conf" /etc/slurm/gres.conf

    slurmctld -D -i >"$dir/slurmctld.out" 2>&1 &
    echo $! >"$dir/slurmctld.pid"
    slurmd -D >"$dir/slurmd.out" 2>&1 &
    echo $! >"$dir/slurmd.pid"

    local state=""
    for _ in $(seq 60); do
        state=$(sinfo -h -o %T 2>/dev/null || true)
        [[ $state == idle ]] && break
        sleep 0.5
    done
    if [[ $state != idle ]]; then
        echo "cluster.sh: the node did not become idle (state '$state'); logs in $dir" >&2
        tail -n 20 "$dir"/slurmctld.log "$dir"/slurmd.log "$dir"/*.out >&2 || true
        stop
        exit 1
    fi
    echo "cluster.sh: cluster up in $dir (node $host, partition $partition, $cpus CPUs, ${mem} MB, gpu:$gpus)" >&2
}

case $action in
    start) start ;;
    stop) stop ;;
    *) echo "usage: cluster.sh start|stop DIR" >&2; exit 2 ;;
esac
