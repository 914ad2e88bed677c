#!/usr/bin/env bash
# A throwaway Slurm on this machine, for trying deploy/slurm without a cluster (and for
# tests/e2e/slurm_e2e.sh): munged, slurmctld and one slurmd, as root, with their own key,
# sockets, ports, state and logs under DIR. Nothing outside DIR is touched.
#
#   deploy/slurm/local_slurm.sh start DIR   # prints "export SLURM_CONF=DIR/slurm.conf"
#   SLURM_CONF=DIR/slurm.conf sbatch --ntasks=2 deploy/slurm/joule.sbatch
#   deploy/slurm/local_slurm.sh stop DIR
#
# Needs the Debian packages slurm-wlm and munge (deploy/local/common.sh: JOULE_SLURM_PACKAGES).
set -euo pipefail

die() { echo "local_slurm.sh: $*" >&2; exit 1; }

free_port() {
  /usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_conf() {
  local dir="$1" node="$2"
  local mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
  cat >"$dir/slurm.conf" <<EOF
ClusterName=joule-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
# No cgroups here: track a job's processes through /proc, bind no CPUs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=20
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$node NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  local dir="$1" node
  [ "$(id -u)" = 0 ] || die "needs root (slurmd starts jobs as their user)"
  for b in munged slurmctld slurmd sinfo; do command -v "$b" >/dev/null || die "no $b: install slurm-wlm and munge"; done
  node="$(hostname -s)"
  mkdir -p "$dir"/{munge,state,spool,log}
  chmod 711 "$dir/munge"
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$dir/munge/munge.key"
  # --force: munged refuses root and a key outside /etc/munge otherwise.
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.sock" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
    --seed-file="$dir/munge/munged.seed"
  write_conf "$dir" "$node"
  slurmctld -f "$dir/slurm.conf"
  slurmd -f "$dir/slurm.conf" -N "$node"
  for _ in $(seq 1 100); do
    [ "$(SLURM_CONF="$dir/slurm.conf" sinfo -h -o %t 2>/dev/null)" = idle ] && break
    sleep 0.2
  done
  [ "$(SLURM_CONF="$dir/slurm.conf" sinfo -h -o %t 2>/dev/null)" = idle ] ||
    { tail -5 "$dir/log/"*.log >&2; die "the node did not become idle"; }
  echo "export SLURM_CONF=$dir/slurm.conf"
}

stop() {
  local dir="$1" f pid
  for f in slurmd.pid slurmctld.pid munge/munged.pid; do
    pid="$(cat "$dir/$f" 2>/dev/null)" || continue
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
}

case "${1:-}" in
  start) start "${2:?usage: local_slurm.sh start DIR}" ;;
  stop) stop "${2:?usage: local_slurm.sh stop DIR}" ;;
  *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
