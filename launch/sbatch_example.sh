#!/bin/bash
# A plain sbatch script, for clusters where jobs are written by hand rather than submitted with
# `vlmtrain-train cluster=slurm`: each srun task is one rank (one per GPU), ranks and rendezvous come
# from SLURM's variables. SLURM sends SIGUSR2 five minutes before the limit; every rank saves at the
# next step boundary and exits with 140 (128 + USR2), and this script requeues itself; the requeued
# job resumes from runs/<name> because the run's name is fixed here. A signal that comes while a task
# is still starting (a preempting scheduler's, or a warning sent early) is kept from vlmtrain-train's
# first line (it sees SLURM_STEP_ID) and acted on at the first step boundary: a requeue, not a lost job.
# A `trap` in this script could not do that: srun's tasks are started by slurmd on each node, not by
# this shell, and an ignored signal would be lost rather than kept.
#SBATCH --job-name=vlmtrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=24:00:00
#SBATCH --signal=USR2@300
#SBATCH --requeue
#SBATCH --output=runs/%x-%j.out

source ~/venvs/vlmtrain/bin/activate
srun vlmtrain-train name=vit-b16-laion experiment=mine trainer.precision=bf16
status=$?
if [ "$status" -eq 140 ] && [ "${SLURM_RESTART_COUNT:-0}" -lt 10 ]; then
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
