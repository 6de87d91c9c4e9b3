#!/usr/bin/env bash
# Stop the local SLURM cluster started by start.sh (by PID; munged is left running).
set -uo pipefail
state="${1:-${VLMTRAIN_SLURM_DIR:-/tmp/vlmtrain-slurm}}"
for daemon in slurmd slurmctld; do
  pidfile="$state/$daemon.pid"
  [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2> /dev/null
done
for _ in $(seq 20); do
  alive=0
  for daemon in slurmd slurmctld; do
    pidfile="$state/$daemon.pid"
    [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2> /dev/null && alive=1
  done
  [ "$alive" = 0 ] && exit 0
  sleep 0.5
done
exit 0
