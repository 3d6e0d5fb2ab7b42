#!/usr/bin/env bash
# Install and start a real one-node SLURM cluster on this machine (Debian/Ubuntu, run as root).
#
# Used by CI (tests/test_slurm.py calls it when `sbatch` is missing) and by developers who want to try
# the slurm/*.sbatch scripts without a cluster. The node is this host, named $(hostname), with all
# of its CPUs and memory and no GPUs; the partition is called `debug`. No systemd is needed: the
# daemons are started directly. Running it again is harmless: it rewrites the config and restarts
# the daemons.
#
#   sudo bash slurm/ci/setup_local_slurm.sh
#
# Environment:
#   SLURM_CI_SKIP_INSTALL=1  do not apt-get install (packages already present)
set -euo pipefail

if [[ "$(id -u)" != 0 ]]; then
  echo "setup_local_slurm.sh: must run as root (it installs packages and starts daemons); rerun with sudo" >&2
  exit 2
fi

if [[ "${SLURM_CI_SKIP_INSTALL:-0}" != 1 ]] && ! command -v slurmctld >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

node="$(hostname -s)"
cpus="$(nproc --all)"
# Advertise 90 % of the machine's memory (MiB) so slurmd never finds less than configured.
mem_mib="$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)"
conf_dir=/etc/slurm
spool=/var/spool/slurm
log_dir=/var/log/slurm

# --- munge: the authentication daemon every SLURM daemon and client talks to -------------------
install -d -o munge -g munge -m 0700 /etc/munge
install -d -o munge -g munge -m 0755 /run/munge /var/lib/munge /var/log/munge
if [[ ! -s /etc/munge/munge.key ]]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if [[ -s /run/munge/munged.pid ]] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
  kill "$(cat /run/munge/munged.pid)"
  sleep 1
fi
runuser -u munge -- /usr/sbin/munged --force

# --- slurm.conf: one node, one partition, no accounting, no cgroups -----------------------------
install -d -m 0755 "$conf_dir" "$spool/ctld" "$spool/d" "$log_dir"
cat >"$conf_dir/slurm.conf" <<EOF
# One-node SLURM written by slurm/ci/setup_local_slurm.sh
ClusterName=aki-ci
SlurmctldHost=$node
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$spool/ctld
SlurmdSpoolDir=$spool/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$log_dir/slurmctld.log
SlurmdLogFile=$log_dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
# Schedule within a second of a submission, a completion or a satisfied dependency (defaults: 30-60 s).
SchedulerParameters=sched_interval=1,bf_interval=1,sched_min_interval=100000
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
KillWait=30
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$node CPUs=$cpus RealMemory=$mem_mib State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
# Debian's packages look in /etc/slurm; older ones in /etc/slurm-llnl.
if [[ -d /etc/slurm-llnl ]]; then
  ln -sf "$conf_dir/slurm.conf" /etc/slurm-llnl/slurm.conf
fi

# --- (re)start the controller and the node daemon ----------------------------------------------
for pid_file in /run/slurmd.pid /run/slurmctld.pid; do
  if [[ -s "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
    kill "$(cat "$pid_file")"
    sleep 1
  fi
done
slurmctld -i
slurmd

# --- wait until the node accepts jobs ----------------------------------------------------------
for _ in $(seq 60); do
  state="$(sinfo --noheader --nodes="$node" --format=%t 2>/dev/null || true)"
  case "$state" in
    idle* | mix* | alloc*)
      echo "setup_local_slurm.sh: SLURM is up: node $node, $cpus CPUs, ${mem_mib} MiB, partition debug"
      exit 0
      ;;
    down* | drain*)
      scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
      ;;
  esac
  sleep 1
done
echo "setup_local_slurm.sh: SLURM did not become ready; see $log_dir/slurmctld.log and $log_dir/slurmd.log" >&2
exit 1
