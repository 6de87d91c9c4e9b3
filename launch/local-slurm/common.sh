#!/usr/bin/env bash
# What both local clusters (start.sh: one node, two-nodes.sh: two) share; sourced, not run.
# Settings that make them fast on one machine: 1 s scheduling, credentials that expire in 5 s (a
# requeued job restarts in seconds), no cgroups (proctrack/linuxproc, task/none), finished jobs kept an
# hour, a node that stops answering declared down after 10 s.

# cluster_conf NAME CONTROLLER PORT STATE SUFFIX: slurm.conf but its nodes and partition; slurmctld on
# PORT, slurmd on PORT+1, files under STATE (SUFFIX tells a node's slurmd files apart: '' or '-%n')
cluster_conf() {
  local name="$1" controller="$2" port="$3" state="$4" suffix="$5"
  cat << CONF
ClusterName=$name
SlurmctldHost=$controller
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd$suffix.pid
SlurmdSpoolDir=$state/spool$suffix
StateSaveLocation=$state/state
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd$suffix.log
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=10
SlurmdTimeout=10
InactiveLimit=0
CONF
}

# put_file PATH: standard input becomes PATH's content in one rename, and only if it changed: a start while
# the cluster runs (a node brought back) never shows a command an empty slurm.conf or hosts file
put_file() {
  local staged="$1.staged.$$"
  cat > "$staged"
  if cmp -s "$staged" "$1"; then rm -f "$staged"; else mv -f "$staged" "$1"; fi
}

start_munge() {  # the one munged of this machine, shared by both clusters
  if ! pgrep -x munged > /dev/null; then
    mkdir -p /run/munge && chown munge:munge /run/munge 2> /dev/null || true
    runuser -u munge -- /usr/sbin/munged 2> /dev/null || /usr/sbin/munged --force
  fi
}
