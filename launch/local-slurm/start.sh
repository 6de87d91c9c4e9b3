#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine (root), for the test suite and for trying
# `vlmtrain-train cluster=slurm` without a cluster. Needs Debian's slurm-wlm and munge:
#   apt-get install -y slurm-wlm munge
#   bash launch/local-slurm/start.sh [STATE_DIR]      # prints the SLURM_CONF to export
#   bash launch/local-slurm/stop.sh [STATE_DIR]
# Its settings, shared with the two-node cluster (two-nodes.sh): common.sh.
# VLMTRAIN_SLURM_PORT=N: slurmctld on port N and slurmd on N+1 (default SLURM's 6817 and 6818), so that a
# second cluster, with its own STATE_DIR, runs beside the first.
set -euo pipefail
state="${1:-${VLMTRAIN_SLURM_DIR:-/tmp/vlmtrain-slurm}}"
port="${VLMTRAIN_SLURM_PORT:-6817}"
mkdir -p "$state/spool" "$state/state"
cpus="${VLMTRAIN_SLURM_CPUS:-8}"   # more slots than cores: test jobs are small
source "$(dirname "$0")/common.sh"
{
  cluster_conf vlmtrain-local localhost "$port" "$state" ""
  echo "NodeName=localhost CPUs=$cpus RealMemory=16000 State=UNKNOWN"
  echo "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
} | put_file "$state/slurm.conf"
export SLURM_CONF="$state/slurm.conf"
start_munge
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
