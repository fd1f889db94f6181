#!/usr/bin/env bash
# A single-machine Slurm cluster for the tests and for trying `aift launch` on a laptop/CI box: munge, MariaDB,
# slurmdbd (real job accounting: sacct, sshare, fair-share), slurmctld and two slurmd daemons (node1, node2: two
# emulated nodes on this machine), everything (config, database, state, logs, pids, sockets) under one folder.
# Debian 12's slurm-wlm + slurmdbd 22.05.8, munge and mariadb-server; settings that worked on these machines, stated below.
#   bash slurm/local_cluster.sh start [DIR]   # installs the packages with apt-get if missing (root)
#   bash slurm/local_cluster.sh stop  [DIR]
# Fixed ports: slurmctld 6917, slurmd 6918/6919, MariaDB 6920 (127.0.0.1 only), slurmdbd 6921.
# DIR defaults to /tmp/aift-slurm. Clients need: export SLURM_CONF=DIR/slurm.conf (written to DIR/env).
set -euo pipefail
ACTION=${1:?usage: local_cluster.sh start|stop [DIR]}
DIR=$(realpath -m "${2:-${AIFT_SLURM_DIR:-/tmp/aift-slurm}}")

stop() {
    local pids=()
    for pidfile in "$DIR"/run/*.pid; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null && pids+=("$pid")
    done
    # MariaDB flushes its tables on SIGTERM: wait for it (and the others, which may remove their pid files before
    # they are gone), so that a restart finds the database closed cleanly and the ports free
    for _ in $(seq 1 60); do
        alive=0
        for pid in "${pids[@]}"; do
            if kill -0 "$pid" 2>/dev/null; then alive=1; fi
        done
        if [ $alive = 0 ]; then break; fi
        sleep 0.5
    done
    rm -f "$DIR"/run/*.pid
}

if [ "$ACTION" = stop ]; then stop; echo "stopped the cluster in $DIR"; exit 0; fi
[ "$ACTION" = start ] || { echo "unknown action $ACTION (start|stop)" >&2; exit 2; }

PACKAGES="slurm-wlm slurmdbd munge mariadb-server"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v slurmdbd >/dev/null \
        || ! command -v mariadbd >/dev/null; then
    [ "$(id -u)" = 0 ] || { echo "$PACKAGES are not all installed and this is not root" >&2; exit 3; }
    # --no-install-recommends: mariadb-server recommends a mail server and Perl modules the cluster does not use
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $PACKAGES >/dev/null \
        || { apt-get update -q >/dev/null \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $PACKAGES >/dev/null; }
fi
[ "$(id -u)" = 0 ] || { echo "the local cluster runs its daemons as root (SlurmUser=root)" >&2; exit 3; }

stop
mkdir -p "$DIR"/{run,log,state,spool/node1,spool/node2,munge,mysql}
chmod 700 "$DIR/munge"
[ -f "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null 2>&1 \
    || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
chmod 600 "$DIR/munge/munge.key"
munged --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" --pid-file="$DIR/run/munged.pid" \
    --seed-file="$DIR/munge/seed" --log-file="$DIR/log/munged.log" --force

# MariaDB: its own data folder and socket under DIR, TCP on 127.0.0.1:6920 for slurmdbd (Slurm's MySQL client
# takes a host and port; "localhost" would mean the system's socket). A small buffer pool: the accounting
# database of a test cluster is a few MB. The data folder is kept between starts (the accounts stay).
DB_PORT=6920
DBD_PORT=6921
DB_PASS=aiftlocal   # the database listens on 127.0.0.1 only, for this test cluster's slurmdbd
MYSQL=(mariadb --no-defaults --socket="$DIR/mysql/mysqld.sock" -uroot)
if [ ! -d "$DIR/mysql/data/mysql" ]; then
    mariadb-install-db --no-defaults --datadir="$DIR/mysql/data" --user=root --auth-root-authentication-method=normal \
        --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 \
        || { echo "mariadb-install-db failed; see $DIR/log/mariadb-install.log" >&2; exit 4; }
fi
setsid -f mariadbd --no-defaults --user=root --datadir="$DIR/mysql/data" --socket="$DIR/mysql/mysqld.sock" \
    --port=$DB_PORT --bind-address=127.0.0.1 --pid-file="$DIR/run/mariadbd.pid" --log-error="$DIR/log/mariadb.log" \
    --innodb-buffer-pool-size=64M --innodb-log-file-size=16M --innodb-lock-wait-timeout=900 --skip-name-resolve \
    >/dev/null 2>&1
for _ in $(seq 1 60); do
    "${MYSQL[@]}" -e "select 1" >/dev/null 2>&1 && break
    sleep 0.5
done
"${MYSQL[@]}" -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" \
    || { echo "MariaDB did not start; see $DIR/log/mariadb.log" >&2; exit 4; }

# slurmdbd: its config holds the database password, so it must be owner-only (slurmdbd refuses it otherwise)
install -m 600 /dev/null "$DIR/slurmdbd.conf"
cat > "$DIR/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
CONF
# slurmdbd reads slurmdbd.conf from the folder of $SLURM_CONF
SLURM_CONF="$DIR/slurm.conf" slurmdbd

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
# Accounting in slurmdbd: sacct, sshare, sreport. jobacct_gather/linux reads /proc (cgroup needs a cgroup setup a
# container or VM may lack); a job's ConsumedEnergy needs an acct_gather_energy plugin with a power meter, which
# these machines lack: it stays empty, and the runs' own energy ledgers are the kWh source (aift usage).
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# with munge, the connections to slurmdbd take their munge socket from here, not from AuthInfo
AccountingStoragePass=$DIR/munge/munge.socket
# jobs must name an account that exists and the user belongs to (as on the facility's cluster)
AccountingStorageEnforce=associations
# GPU allocations in sacct's AllocTRES (gres/gpu=N): aift usage's GPU-hours (these emulated nodes have none)
GresTypes=gpu
AccountingStorageTRES=gres/gpu
# fair-share: the tracks' shares (slurm/accounts via aift cluster accounts) weigh in a job's priority
PriorityType=priority/multifactor
PriorityWeightFairshare=10000
PriorityWeightAge=1000
PriorityDecayHalfLife=7-0
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
# the cluster must be known to slurmdbd before slurmctld registers (adding it also makes the root account, with
# user root in it: the account of jobs that name none)
for _ in $(seq 1 60); do
    sacctmgr -n -P show cluster format=Cluster >/dev/null 2>&1 && break
    sleep 0.5
done
sacctmgr -n -P show cluster format=Cluster 2>/dev/null | grep -qx aiftlocal \
    || sacctmgr -i add cluster aiftlocal >/dev/null \
    || { echo "slurmdbd does not answer; see $DIR/log/slurmdbd.log" >&2; exit 4; }
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
