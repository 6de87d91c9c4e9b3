#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine (root), for the test suite and for trying
# `vlmtrain-train cluster=slurm` without a cluster. Needs Debian's slurm-wlm and munge:
#   apt-get install -y slurm-wlm munge
#   bash launch/local-slurm/start.sh [STATE_DIR]      # prints the SLURM_CONF to export
#   bash launch/local-slurm/stop.sh [STATE_DIR]
# Settings that make it fast on one machine: 1 s scheduling, credentials that expire in 5 s (a requeued
# job restarts in seconds), no cgroups (proctrack/linuxproc, task/none), finished jobs kept an hour.
# VLMTRAIN_SLURM_PORT=N: slurmctld on port N and slurmd on N+1 (default SLURM's 6817 and 6818), so that a
# second cluster, with its own STATE_DIR, runs beside the first.
set -euo pipefail
state="${1:-${VLMTRAIN_SLURM_DIR:-/tmp/vlmtrain-slurm}}"
port="${VLMTRAIN_SLURM_PORT:-6817}"
mkdir -p "$state/spool" "$state/state"
cpus="${VLMTRAIN_SLURM_CPUS:-8}"   # more slots than cores: test jobs are small
cat > "$state/slurm.conf" <<CONF
ClusterName=vlmtrain-local
SlurmctldHost=localhost
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmdSpoolDir=$state/spool
StateSaveLocation=$state/state
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=10
InactiveLimit=0
NodeName=localhost CPUs=$cpus RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF="$state/slurm.conf"
if ! pgrep -x munged > /dev/null; then
  mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
  runuser -u munge -- /usr/sbin/munged 2>/dev/null || /usr/sbin/munged --force
fi
for daemon in slurmctld slurmd; do
  pidfile="$state/$daemon.pid"
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2> /dev/null; then continue; fi
  if [ "$daemon" = slurmd ]; then /usr/sbin/slurmd -N localhost -f "$SLURM_CONF"; else /usr/sbin/slurmctld -f "$SLURM_CONF"; fi
done
for _ in $(seq 60); do  # the node registers within a few seconds
  if sinfo -h -o %T 2> /dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.5
done
echo "error: the local SLURM node did not come up; see $state/slurmctld.log and $state/slurmd.log" >&2
exit 1
