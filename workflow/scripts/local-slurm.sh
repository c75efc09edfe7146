#!/usr/bin/env bash
# A single-node Slurm with accounting, on Debian or Ubuntu, as root, without systemd.
#
#   local-slurm.sh start    install what is missing, write the configs, start every daemon
#   local-slurm.sh stop     stop the daemons this script started (by their pid files)
#   local-slurm.sh status   say what runs
#
# The node is this machine: every CPU that nproc counts, /proc/meminfo's memory minus a margin,
# one partition `debug`. Accounting runs through slurmdbd and MariaDB, so sacct shows every job
# and `--account dynomp` is checked (AccountingStorageEnforce=associations). Jobs are tracked
# without cgroups (proctrack/linuxproc, task/none): the cgroup plugins need a writable cgroup tree
# that containers often lack, and there they mark jobs COMPLETED that never ran.
#
# SlurmUser is `slurm` (the Debian packages create it): slurmctld and slurmdbd run as slurm,
# slurmd as root, munged as munge, mariadbd as mysql. The configs below are the whole setup; this
# script rewrites /etc/slurm/slurm.conf and slurmdbd.conf only if it wrote them itself.
set -euo pipefail

PROGRAM=local-slurm.sh
CLUSTER=dynomp
PARTITION=debug
ACCOUNT=dynomp
SLURM_USER=slurm
CONFIG_DIR=/etc/slurm
RUN_DIR=/run/slurm
STATE_DIR=/var/lib/slurm/slurmctld
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm
# which daemons this script started (and so may stop): one empty file per daemon
RECORD_DIR=/run/dynomp-local-slurm
MARKER="# Written by workflow/scripts/local-slurm.sh; it rewrites this file on start."
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
WAIT_SECONDS=${LOCAL_SLURM_WAIT_SECONDS:-60}

fail() {
    echo "$PROGRAM: error: $*" >&2
    exit 1
}

say() {
    echo "$PROGRAM: $*"
}

pid_file() {
    case "$1" in
        munged) echo /run/munge/munged.pid ;;
        mariadbd) echo /run/mysqld/mysqld.pid ;;
        slurmdbd) echo "$RUN_DIR/slurmdbd.pid" ;;
        slurmctld) echo "$RUN_DIR/slurmctld.pid" ;;
        slurmd) echo "$RUN_DIR/slurmd.pid" ;;
    esac
}

log_file() {
    case "$1" in
        munged) echo /var/log/munge/munged.log ;;
        mariadbd) echo /var/log/mysql/error.log ;;
        *) echo "$LOG_DIR/$1.log" ;;
    esac
}

# a zombie has exited: it only waits for init to reap it (which can take a second in containers)
process_alive() {
    kill -0 "$1" 2>/dev/null || return 1
    ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

# the pid of a running daemon, from its pid file; empty when it does not run. The process must
# have the daemon's name: a stale pid file whose number now belongs to another process is ignored.
daemon_pid() {
    local file pid
    file=$(pid_file "$1")
    [[ -s $file ]] || return 0
    pid=$(tr -dc '0-9' <"$file")
    if [[ -n $pid ]] && process_alive "$pid" \
        && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]]; then
        echo "$pid"
    fi
}

daemon_running() {
    [[ -n $(daemon_pid "$1") ]]
}

# wait up to WAIT_SECONDS for a command to succeed
wait_for() {
    local what=$1
    shift
    local deadline=$((SECONDS + WAIT_SECONDS))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            return 1
        fi
        sleep 0.5
    done
    say "$what"
}

last_log_line() {
    local file
    file=$(log_file "$1")
    if [[ -s $file ]]; then
        echo " (last line of $file: $(tail -n 1 "$file"))"
    else
        echo " (no log in $file)"
    fi
}

check_platform() {
    [[ $(id -u) -eq 0 ]] || fail "must run as root (it installs packages and starts daemons)"
    [[ -r /etc/os-release ]] \
        || fail "/etc/os-release is missing: only Debian and Ubuntu are supported"
    local id_words
    # shellcheck disable=SC1091  # the file of the machine it runs on
    id_words=$(. /etc/os-release && echo "${ID:-} ${ID_LIKE:-}")
    [[ " $id_words " =~ [[:space:]](debian|ubuntu)[[:space:]] ]] \
        || fail "only Debian and Ubuntu are supported (/etc/os-release says: $id_words)"
}

# apt's words for an archive it cannot reach (no network, no DNS, a proxy that refuses)
UNREACHABLE='Failed to fetch|Temporary failure resolving|Could not resolve|Could not connect'
UNREACHABLE+='|Unable to connect|Network is unreachable|Connection failed|Connection timed out'

apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o Acquire::Retries=1 -o Acquire::http::Timeout=20 \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${PACKAGES[@]}"
}

install_packages() {
    local missing=0 binary
    for binary in slurmctld slurmd slurmdbd sacctmgr sbatch munged mariadbd mariadb; do
        command -v "$binary" >/dev/null 2>&1 || missing=1
    done
    ((missing)) || return 0
    say "installing ${PACKAGES[*]}"
    # keep apt from starting the services: this script starts them itself, without systemd
    local created_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    local log=/tmp/local-slurm-apt.log failed=0
    if ! apt_install >"$log" 2>&1; then
        # the package lists may be stale or absent (fresh containers): update once, then retry
        DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$log" 2>&1 || true
        apt_install >>"$log" 2>&1 || failed=1
    fi
    if ((created_policy)); then
        rm -f /usr/sbin/policy-rc.d
    fi
    if ((failed)); then
        local first_problem
        first_problem=$(grep -m1 -E '^(E|W):' "$log" || tail -n 1 "$log")
        local unreachable
        unreachable=$(grep -m1 -E "^(E|W): .*($UNREACHABLE)" "$log" || true)
        if [[ -n $unreachable ]]; then
            fail "apt-get cannot reach the package archive ($unreachable; log: $log)"
        fi
        fail "apt-get could not install ${PACKAGES[*]} ($first_problem; log: $log)"
    fi
}

# write $2 into file $1 (mode $3, owner $4) only if it changed, so a running daemon's config stays
write_config() {
    local path=$1 text=$2 mode=$3 owner=$4
    if [[ -e $path ]] && ! grep -qxF "$MARKER" "$path"; then
        fail "$path exists and was not written by this script; move it away to use a local Slurm"
    fi
    local temporary
    temporary=$(mktemp "$path.XXXXXX")
    printf '%s\n' "$text" >"$temporary"
    chmod "$mode" "$temporary"
    chown "$owner" "$temporary"
    if [[ -e $path ]] && cmp -s "$temporary" "$path"; then
        rm -f "$temporary"
        chmod "$mode" "$path"
        chown "$owner" "$path"
    else
        mv -f "$temporary" "$path"
    fi
}

make_directories() {
    install -d -o munge -g munge -m 700 /etc/munge /var/lib/munge
    install -d -o munge -g munge -m 700 /var/log/munge
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o mysql -g mysql -m 755 /run/mysqld /var/log/mysql
    install -d -o root -g root -m 755 "$CONFIG_DIR"
    install -d -o "$SLURM_USER" -g "$SLURM_USER" -m 755 "$RUN_DIR" "$LOG_DIR" "$STATE_DIR"
    install -d -o root -g root -m 755 "$SPOOL_DIR"
    install -d -o root -g root -m 700 "$RECORD_DIR"
}

munge_key() {
    local key=/etc/munge/munge.key
    if [[ ! -s $key ]]; then
        # mungekey comes with munge 0.5.14 and later; older ones take any random bytes
        mungekey --create --keyfile="$key" 2>/dev/null \
            || dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
    fi
    chown munge:munge "$key"
    chmod 400 "$key"
}

# the StoragePass already in slurmdbd.conf, or a new random one
database_password() {
    local conf=$CONFIG_DIR/slurmdbd.conf
    if [[ -f $conf ]] && grep -q '^StoragePass=' "$conf"; then
        sed -n 's/^StoragePass=//p' "$conf" | head -n 1
    else
        # base64 of 18 random bytes: 24 characters; the few that SQL quoting dislikes are dropped
        head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9'
    fi
}

write_configs() {
    local host cpus memory_mb margin_mb real_memory def_mem password
    host=$(hostname -s)
    cpus=$(nproc)
    memory_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))
    # leave the system and the daemons room: a tenth of the memory, at least 512 MiB
    margin_mb=$((memory_mb / 10 > 512 ? memory_mb / 10 : 512))
    real_memory=$((memory_mb - margin_mb))
    # one CPU's share, so that a one-CPU job per CPU fits side by side
    def_mem=$((real_memory / cpus))
    password=$(database_password)

    write_config "$CONFIG_DIR/slurmdbd.conf" "$MARKER
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=$SLURM_USER
LogFile=$LOG_DIR/slurmdbd.log
PidFile=$RUN_DIR/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=$password" 600 "$SLURM_USER:$SLURM_USER"

    # Each CPU is declared a core of its own (SlurmdParameters=config_overrides): with
    # CR_Core_Memory a one-CPU job then takes one CPU, whatever the hyperthreading.
    write_config "$CONFIG_DIR/slurm.conf" "$MARKER
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=$SLURM_USER
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$def_mem
EnforcePartLimits=ALL
InactiveLimit=0
KillWait=30
MinJobAge=300
SlurmctldTimeout=120
SlurmdTimeout=300
Waittime=0
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStorageEnforce=associations
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_memory State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP" 644 root:root
}

record_started() {
    : >"$RECORD_DIR/$1"
}

start_munged() {
    if [[ -n $(daemon_pid munged) ]]; then
        say "munged already runs (pid $(daemon_pid munged))"
        return
    fi
    munge_key
    # munged's own defaults are the standard places: /run/munge/munged.pid and munge.socket.2
    runuser -u munge -- /usr/sbin/munged || fail "munged did not start$(last_log_line munged)"
    record_started munged
    wait_for "munged answers" bash -c 'munge -n | unmunge' \
        || fail "munged does not answer$(last_log_line munged)"
}

database_ready() {
    mariadb-admin --socket=/run/mysqld/mysqld.sock ping
}

start_mariadbd() {
    if [[ -n $(daemon_pid mariadbd) ]]; then
        say "mariadbd already runs (pid $(daemon_pid mariadbd))"
    else
        if [[ ! -d /var/lib/mysql/mysql ]]; then
            mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null \
                || fail "mariadb-install-db could not create /var/lib/mysql"
        fi
        setsid /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql \
            --pid-file=/run/mysqld/mysqld.pid --socket=/run/mysqld/mysqld.sock \
            --log-error=/var/log/mysql/error.log --skip-networking </dev/null >/dev/null 2>&1 &
        record_started mariadbd
        wait_for "mariadbd answers" database_ready \
            || fail "mariadbd does not answer$(last_log_line mariadbd)"
    fi
    # slurmdbd reaches MariaDB over its socket (StorageHost=localhost), as user slurm
    local password
    password=$(sed -n 's/^StoragePass=//p' "$CONFIG_DIR/slurmdbd.conf" | head -n 1)
    mariadb --socket=/run/mysqld/mysqld.sock <<SQL \
        || fail "could not create the slurm_acct_db database or its user"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$password';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$password';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
}

start_slurm_daemon() {
    local name=$1
    if [[ -n $(daemon_pid "$name") ]]; then
        say "$name already runs (pid $(daemon_pid "$name"))"
        return
    fi
    # each daemonises itself and writes its pid file
    "/usr/sbin/$name" </dev/null >/dev/null 2>&1 \
        || fail "$name did not start$(last_log_line "$name")"
    record_started "$name"
    wait_for "$name runs" daemon_running "$name" \
        || fail "$name exited after starting$(last_log_line "$name")"
}

# sacctmgr add exits nonzero when there is nothing new: look first, add only what is missing
ensure_associations() {
    if [[ -z $(sacctmgr -n -P show cluster "$CLUSTER" format=cluster) ]]; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null \
            || fail "sacctmgr could not add cluster $CLUSTER"
    fi
    if [[ -z $(sacctmgr -n -P show account "$ACCOUNT" format=account) ]]; then
        sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" \
            description="local Slurm for dynomp" organization=dynomp >/dev/null \
            || fail "sacctmgr could not add account $ACCOUNT"
    fi
    local association
    association=$(sacctmgr -n -P show association user=root account="$ACCOUNT" \
        cluster="$CLUSTER" format=user)
    if [[ -z $association ]]; then
        sacctmgr -i add user root account="$ACCOUNT" cluster="$CLUSTER" \
            defaultaccount="$ACCOUNT" >/dev/null \
            || fail "sacctmgr could not add user root to account $ACCOUNT"
    fi
}

node_idle() {
    [[ $(sinfo -h -N -n "$(hostname -s)" -o %T 2>/dev/null) =~ ^(idle|mixed|allocated) ]]
}

all_running() {
    local name
    for name in "${DAEMONS[@]}"; do
        daemon_running "$name" || return 1
    done
    node_idle
}

start() {
    check_platform
    install_packages
    if all_running 2>/dev/null; then
        say "already running: cluster $CLUSTER, partition $PARTITION, account $ACCOUNT"
        return 0
    fi
    make_directories
    write_configs
    start_munged
    start_mariadbd
    start_slurm_daemon slurmdbd
    wait_for "slurmdbd answers" sacctmgr -n show cluster \
        || fail "slurmdbd does not answer$(last_log_line slurmdbd)"
    ensure_associations
    start_slurm_daemon slurmctld
    wait_for "slurmctld answers" scontrol ping \
        || fail "slurmctld does not answer$(last_log_line slurmctld)"
    start_slurm_daemon slurmd
    if ! wait_for "node $(hostname -s) is idle" node_idle; then
        local state
        state=$(sinfo -h -N -o '%T %E' 2>&1 | head -n 1)
        fail "node $(hostname -s) is not idle: $state$(last_log_line slurmd)"
    fi
    wait_for "sacct answers" sacct -n -X -S now \
        || fail "sacct does not answer$(last_log_line slurmdbd)"
    say "running: cluster $CLUSTER, partition $PARTITION, account $ACCOUNT ($(nproc) CPUs)"
}

stop_daemon() {
    local name=$1 pid
    if [[ ! -e $RECORD_DIR/$name ]]; then
        return
    fi
    pid=$(daemon_pid "$name")
    if [[ -n $pid ]]; then
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + WAIT_SECONDS))
        while process_alive "$pid"; do
            if ((SECONDS >= deadline)); then
                say "$name (pid $pid) ignored SIGTERM for ${WAIT_SECONDS}s: sending SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
                sleep 1
                break
            fi
            sleep 0.2
        done
        say "stopped $name (pid $pid)"
    fi
    rm -f "$RECORD_DIR/$name"
}

stop() {
    [[ $(id -u) -eq 0 ]] \
        || fail "must run as root (the daemons run as root, slurm, munge and mysql)"
    local index
    # the reverse of the start order: nothing loses a daemon it still talks to
    for ((index = ${#DAEMONS[@]} - 1; index >= 0; index--)); do
        stop_daemon "${DAEMONS[index]}"
    done
}

status() {
    local name pid code=0 started
    for name in "${DAEMONS[@]}"; do
        pid=$(daemon_pid "$name")
        started=""
        [[ -e $RECORD_DIR/$name ]] && started=", started by $PROGRAM"
        if [[ -n $pid ]]; then
            echo "$name: running (pid $pid$started)"
        else
            echo "$name: not running"
            code=1
        fi
    done
    if ((code == 0)); then
        sinfo -N -o '%N %P %T %c %m' 2>&1 || code=1
    fi
    return $code
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *)
        echo "usage: $PROGRAM start | stop | status" >&2
        exit 2
        ;;
esac
