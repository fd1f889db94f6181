#!/usr/bin/env bash
# A single-machine Slurm cluster for the tests and for trying `aift launch` on a laptop/CI box: munge, slurmctld
# and two slurmd daemons (node1, node2: two emulated nodes on this machine), everything (config, state, logs,
# pids) under one folder. Debian's slurm-wlm 22.05 + munge; settings that worked on these machines, stated below.
#   bash slurm/local_cluster.sh start [DIR]   # installs slurm-wlm + munge with apt-get if missing (root)
#   bash slurm/local_cluster.sh stop  [DIR]
# DIR defaults to /tmp/aift-slurm. Clients need: export SLURM_CONF=DIR/slurm.conf (written to DIR/env).
set -euo pipefail
ACTION=${1:?usage: local_cluster.sh start|stop [DIR]}
DIR=$(realpath -m "${2:-${AIFT_SLURM_DIR:-/tmp/aift-slurm}}")

stop() {
    for pidfile in "$DIR"/run/*.pid; do
        [ -f "$pidfile" ] || continue
        kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    sleep 1
    rm -f "$DIR"/run/*.pid
}

if [ "$ACTION" = stop ]; then stop; echo "stopped the cluster in $DIR"; exit 0; fi
[ "$ACTION" = start ] || { echo "unknown action $ACTION (start|stop)" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    [ "$(id -u)" = 0 ] || { echo "slurm-wlm and munge are not installed and this is not root" >&2; exit 3; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null; }
fi
[ "$(id -u)" = 0 ] || { echo "the local cluster runs its daemons as root (SlurmUser=root)" >&2; exit 3; }

stop
mkdir -p "$DIR"/{run,log,state,spool/node1,spool/node2,munge}
chmod 700 "$DIR/munge"
[ -f "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null 2>&1 \
    || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
chmod 600 "$DIR/munge/munge.key"
munged --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" --pid-file="$DIR/run/munged.pid" \
    --seed-file="$DIR/munge/seed" --log-file="$DIR/log/munged.log" --force

CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 4 ))
# Test-cluster timings (a production slurm.conf keeps the defaults): a requeued job waits cred_expire seconds
# (default 120) before it may start again, and pending jobs are looked at every sched_interval (60) / bf_interval (30)
# seconds; shorter values keep the requeue test from idling minutes.
cat > "$DIR/slurm.conf" <<CONF
ClusterName=aiftlocal
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPort=6917
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
MinJobAge=600
KillWait=5
NodeName=node1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=6918 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
NodeName=node2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=6919 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF="$DIR/slurm.conf"
echo "export SLURM_CONF=$DIR/slurm.conf" > "$DIR/env"
slurmctld -c -f "$SLURM_CONF"
slurmd -N node1 -f "$SLURM_CONF"
slurmd -N node2 -f "$SLURM_CONF"
for _ in $(seq 1 30); do
    if sinfo -h -o "%T" 2>/dev/null | grep -qE "idle"; then
        sinfo
        echo "started; clients: export SLURM_CONF=$DIR/slurm.conf"
        exit 0
    fi
    sleep 1
done
echo "the cluster did not come up; see $DIR/log" >&2
exit 4
