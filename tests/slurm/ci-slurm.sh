#!/usr/bin/env bash
# Bring up / tear down a throwaway Slurm on this one machine, for facemae-dist's Slurm tests and CI.
# Debian 12 (Slurm 22.05 + munge), run as root, no systemd needed. Adapted from a tested reference.
#
#   tests/slurm/ci-slurm.sh up       install (if needed), configure, start, wait for idle nodes
#   tests/slurm/ci-slurm.sh down     cancel our jobs, stop our daemons by PID, remove state and config
#   tests/slurm/ci-slurm.sh status   sinfo + squeue
#
# Env knobs:
#   SLURM_CI_DIR=/tmp/facemae-ci-slurm  state, logs and pidfiles
#   SLURM_CI_NODES=2                    emulated nodes node[1-N] (one slurmd each; 1 => NodeName=$(hostname))
#   SLURM_CI_ACCOUNTING=0               1 => also mariadb + slurmdbd, so `sacct` works (submitit then notices
#                                       jobs that die without writing a result)
#   SLURM_CI_GPUS=0                     N>0 => N fake GPUs per node (gres/gpu on char devices) so that
#                                       --gpus-per-node gets scheduled; there is no CUDA: payloads use gloo
#   SLURM_CI_FORCE=0                    1 => overwrite an /etc/slurm/slurm.conf that this script did not write
#
# Safety: this script writes /etc/slurm/slurm.conf. It refuses to replace a configuration it did not write
# (a real cluster node), and it only ever stops daemons it started (by the PIDs in SLURM_CI_DIR).
set -euo pipefail

DIR=${SLURM_CI_DIR:-/tmp/facemae-ci-slurm}
NODES=${SLURM_CI_NODES:-2}
ACCT=${SLURM_CI_ACCOUNTING:-0}
GPUS=${SLURM_CI_GPUS:-0}
FORCE=${SLURM_CI_FORCE:-0}
CONF=/etc/slurm/slurm.conf
MARK="# written by facemae-dist tests/slurm/ci-slurm.sh"

log() { echo "[ci-slurm] $*" >&2; }

alive() {  # pid is running and not a zombie (PID 1 in some containers never reaps)
  local s
  s=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$s" ] && [ "$s" != Z ] && [ "$s" != X ]
}

stop_pidfile() {  # kill the daemon named in a pidfile, wait until gone, SIGKILL after 15 s
  local f=$1 pid
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  rm -f "$f"
  alive "$pid" || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 150); do alive "$pid" || return 0; sleep 0.1; done
  log "pid $pid ($f) ignored SIGTERM, sending SIGKILL"
  kill -9 "$pid" 2>/dev/null || true
}

wait_for() {  # wait_for <seconds> <description> <command...>
  local t=$1 what=$2
  shift 2
  local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$end" ]; then
      log "timeout waiting for $what"
      tail -n 30 "$DIR"/log/*.log >&2 || true
      return 1
    fi
    sleep 0.2
  done
}

check_ours() {  # refuse to overwrite a slurm.conf that a real installation wrote
  if [ -s "$CONF" ] && ! grep -qF "$MARK" "$CONF" && [ "$FORCE" != 1 ]; then
    log "$CONF exists and was not written by this script (a real Slurm?): refusing to touch it."
    log "Set SLURM_CI_FORCE=1 to overwrite it."
    exit 3
  fi
}

install_pkgs() {
  local pkgs="slurmctld slurmd slurm-client munge"
  [ "$ACCT" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
  # shellcheck disable=SC2086
  if dpkg -s $pkgs >/dev/null 2>&1; then return 0; fi
  command -v apt-get >/dev/null || { log "Slurm is not installed and there is no apt-get"; exit 4; }
  rm -f /var/lib/man-db/auto-update # skip the slow man-db trigger
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # no systemd / policy-rc.d => the postinst scripts start no services; that is what we want
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
}

add_host() {  # name resolution: srun must resolve SlurmctldHost; MASTER_ADDR is a NodeName
  getent hosts "$1" >/dev/null || echo "127.0.0.1 $1" >>/etc/hosts
}

start_munge() {  # the key is normally created by the package postinst
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge
  chmod 0700 /etc/munge
  chmod 0400 /etc/munge/munge.key
  mkdir -p /run/munge
  chown munge:munge /run/munge
  chmod 0755 /run/munge
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$DIR/munged.pid"
    wait_for 10 munged sh -c 'munge -n | unmunge'
  fi
}

hardware() {  # as slurmd sees it; 90% of the memory split over the nodes (avoids a "Low RealMemory" drain)
  local cpus mem sockets cores threads
  read -r cpus sockets cores threads mem < <(slurmd -C | head -1 | tr ' ' '\n' | awk -F= '
    /^CPUs=/{c=$2} /^SocketsPerBoard=/{s=$2} /^CoresPerSocket=/{k=$2} /^ThreadsPerCore=/{t=$2}
    /^RealMemory=/{m=$2} END{print c, s, k, t, m}')
  mem=$((mem * 9 / 10 / NODES))
  echo "CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem"
}

fake_gpus() {  # prints the node's Gres= field and writes gres.conf
  rm -f /etc/slurm/gres.conf
  [ "$GPUS" -gt 0 ] || return 0
  mkdir -p "$DIR/fakegpu"
  local g
  for g in $(seq 0 $((GPUS - 1))); do
    [ -c "$DIR/fakegpu/gpu$g" ] || mknod "$DIR/fakegpu/gpu$g" c 1 3 # must be a character device
  done
  echo "Name=gpu File=$DIR/fakegpu/gpu[0-$((GPUS - 1))]" >/etc/slurm/gres.conf
  echo "Gres=gpu:$GPUS"
}

write_conf() {  # write_conf <host> <node line> <gres types line>
  local acct="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
  if [ "$ACCT" = 1 ]; then
    acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux"
  fi
  cat >"$CONF" <<CONF
$MARK
ClusterName=facemae-ci
SlurmctldHost=$1
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again only after cred_expire (default 120 s): short here, for the tests
AuthInfo=cred_expire=5
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
$acct
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# backfill every second (default 30 s): a requeued job starts soon after its cred_expire
SchedulerParameters=bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldPort=6817
SlurmdPort=6818
InactiveLimit=0
KillWait=5
# small MinJobAge: sbatch --wait polls every 2 s instead of backing off 2->8->32 s
MinJobAge=4
SlurmctldTimeout=30
SlurmdTimeout=30
Waittime=0
$3
$2
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
}

start_accounting() {  # mariadb + slurmdbd
  mkdir -p /run/mysqld
  chown mysql:mysql /run/mysqld
  if ! mariadb -uroot -e 'select 1' >/dev/null 2>&1; then
    setsid /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 --innodb-buffer-pool-size=64M \
      </dev/null >"$DIR/log/mariadb.log" 2>&1 &
    echo $! >"$DIR/mariadb.pid"
    wait_for 60 mariadb mariadb -uroot -e 'select 1'
  fi
  mariadb -uroot -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'ci';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  cat >/etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=ci
StorageLoc=slurm_acct_db
CONF
  chmod 0600 /etc/slurm/slurmdbd.conf # slurmdbd refuses a world-readable conf
  slurmdbd
  wait_for 60 slurmdbd sacctmgr -n list cluster
}

up() {
  [ "$(id -u)" = 0 ] || { log "must run as root (installs packages, writes /etc/slurm)"; exit 4; }
  check_ours
  install_pkgs
  mkdir -p "$DIR"/{state,spool,log} /etc/slurm
  local host names="" hw gres node_gres="" gres_types="" nodeline
  host=$(hostname)
  add_host "$host"
  if [ "$NODES" -gt 1 ]; then
    names=$(seq -f "node%g" 1 "$NODES" | tr '\n' ' ')
    for n in $names; do add_host "$n"; done
  fi
  start_munge
  hw=$(hardware)
  gres=$(fake_gpus)
  if [ -n "$gres" ]; then node_gres=$gres gres_types="GresTypes=gpu"; fi
  if [ "$NODES" -gt 1 ]; then
    nodeline="NodeName=node[1-$NODES] NodeHostname=$host NodeAddr=127.0.0.1 Port=[17001-$((17000 + NODES))] $hw $node_gres State=UNKNOWN"
  else
    nodeline="NodeName=$host NodeAddr=127.0.0.1 $hw $node_gres State=UNKNOWN"
  fi
  write_conf "$host" "$nodeline" "$gres_types"
  [ "$ACCT" = 1 ] && start_accounting
  # controller + node daemon(s); they daemonize and write pidfiles
  slurmctld -i # -i: ignore/clear any stale state
  wait_for 30 slurmctld scontrol ping
  if [ "$NODES" -gt 1 ]; then
    for n in $names; do
      mkdir -p "$DIR/spool/$n"
      slurmd -N "$n"
    done
  else
    mkdir -p "$DIR/spool/$host"
    slurmd
  fi
  # shellcheck disable=SC2016  # expanded by the inner sh, on purpose
  wait_for 60 "nodes idle" sh -c '[ "$(sinfo -h -o %t | sort -u)" = idle ]'
  sinfo >&2
  log "up (nodes=$NODES accounting=$ACCT gpus=$GPUS); logs in $DIR/log"
}

cancel_jobs() {  # jobs left running would leave slurmstepd processes behind once slurmd stops
  if [ ! -s "$DIR/slurmctld.pid" ] || ! alive "$(cat "$DIR/slurmctld.pid")"; then return 0; fi
  scancel --full --quiet --user "$(id -un)" 2>/dev/null || true
  local end=$((SECONDS + 20))
  while [ -n "$(squeue -h -o %i 2>/dev/null)" ] && [ "$SECONDS" -lt "$end" ]; do sleep 0.5; done
}

down() {
  local f
  cancel_jobs
  for f in "$DIR"/slurmd-*.pid; do [ -e "$f" ] && stop_pidfile "$f"; done
  stop_pidfile "$DIR/slurmctld.pid"
  stop_pidfile "$DIR/slurmdbd.pid"
  stop_pidfile "$DIR/mariadb.pid"
  stop_pidfile "$DIR/munged.pid" # only if we started it
  rm -rf "$DIR/state" "$DIR/spool" "$DIR/fakegpu"
  if [ -s "$CONF" ] && grep -qF "$MARK" "$CONF"; then rm -f "$CONF" /etc/slurm/gres.conf; fi
  log "down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) sinfo && squeue ;;
  *)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
