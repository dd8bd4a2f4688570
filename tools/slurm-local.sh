#!/usr/bin/env bash
# A one-node Slurm on this machine, for tests and for trying `snakemake --profile slurm` locally.
#   tools/slurm-local.sh start    install slurm + munge (Debian) if missing, start munged, slurmctld
#                                 and slurmd with one CPU partition, wait until the node is idle
#   tools/slurm-local.sh stop     stop the daemons and remove what start wrote
#   tools/slurm-local.sh status   sinfo
# Runs as root (the daemons do). Accounting is off, so `sacct` answers "accounting storage is
# disabled": job status comes from squeue, and MinJobAge keeps finished jobs visible to it.
# The partition is called $FICOCO_LOCAL_PARTITION (default "debug"); every CPU of the machine and
# its memory minus 2 GiB are one node.
set -euo pipefail
partition=${FICOCO_LOCAL_PARTITION:-debug}
state=/var/lib/ficoco-slurm-local
conf=/etc/slurm/slurm.conf
marker="# written by ficoco tools/slurm-local.sh"

die() { echo "slurm-local: $*" >&2; exit 1; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return 0
  command -v apt-get >/dev/null || die "slurmctld/slurmd/munged missing and no apt-get to install them"
  echo "slurm-local: installing Debian's slurmctld slurmd slurm-client munge (once) ..." >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
  if [ -e "$conf" ] && ! grep -qF "$marker" "$conf"; then
    die "$conf exists and was not written by this script; refusing to replace a real Slurm configuration"
  fi
  local host cpus memory
  host=$(hostname -s)
  cpus=$(nproc)
  memory=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 2048 ))
  mkdir -p /etc/slurm "$state/ctld" "$state/d" "$state/log"
  cat >"$conf" <<EOF
$marker
ClusterName=ficoco-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=3600
ReturnToService=2
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=$partition Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (the Slurm daemons do)"
  install_packages
  write_conf
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  [ -s /etc/munge/munge.key ] || { mungekey --create >/dev/null 2>&1 || create-munge-key -f >/dev/null; }
  start_munged
  pgrep -x slurmctld >/dev/null || slurmctld
  pgrep -x slurmd >/dev/null || slurmd
  local host
  host=$(hostname -s)
  for _ in $(seq 120); do
    if [ "$(sinfo -h -n "$host" -o %t 2>/dev/null)" = "idle" ]; then
      echo "slurm-local: node $host idle in partition $partition" >&2
      return 0
    fi
    sleep 0.5
  done
  sinfo >&2 || true
  tail -n 20 "$state/log/slurmctld.log" "$state/log/slurmd.log" >&2 || true
  die "node $host did not become idle within 60 s (logs above)"
}

munge_answers() { munge -n >/dev/null 2>&1; }

wait_gone() {   # wait_gone NAME: until no process of that name is left (a stopping daemon can linger)
  for _ in $(seq 40); do pgrep -x "$1" >/dev/null || return 0; sleep 0.25; done
  return 1
}

# A munged that is still shutting down (a stop just before this start) passes `pgrep` but answers
# nothing, and slurmd then fails to register with "Protocol authentication error": check that munge
# answers, and start a fresh munged when it does not.
start_munged() {
  munge_answers && return 0
  pkill -x munged 2>/dev/null || true
  wait_gone munged || die "an old munged does not exit"
  runuser -u munge -- munged
  for _ in $(seq 40); do munge_answers && return 0; sleep 0.25; done
  die "munged started but does not answer (munge -n); see /var/log/munge/munged.log"
}

stop() {
  scancel --user=root >/dev/null 2>&1 || true
  for daemon in slurmd slurmctld; do
    pkill -x "$daemon" 2>/dev/null || true
  done
  wait_gone slurmd || true
  wait_gone slurmctld || true
  pkill -x munged 2>/dev/null || true
  wait_gone munged || true
  if [ -e "$conf" ] && grep -qF "$marker" "$conf"; then rm -f "$conf"; fi
  rm -rf "$state"
  echo "slurm-local: stopped" >&2
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) sinfo ;;
  *) die "usage: tools/slurm-local.sh start|stop|status" ;;
esac
