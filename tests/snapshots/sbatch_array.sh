#!/bin/bash
# fedmpi sweep snap (jobs/snap.toml): 4 run(s), one array task per run.
# Rendered by slurm/submit.py from slurm/array.sbatch; submit with `sbatch THIS_FILE`.
#
# Each task runs `python -m fedmpi.train <run config>` with 3 MPI rank(s): 1 node(s)
# x 3. Each rank pins itself to cuda:(local_rank % GPUs of its node).
# Near the time limit SLURM sends SIGUSR1 to this script (--signal=B:USR1@...), which
# passes it on to the ranks: the run writes a checkpoint, stops with status 75, and the
# task requeues itself; on preemption or scancel (SIGTERM) the run checkpoints and stops,
# and SLURM requeues preempted tasks (--requeue). Every start passes --resume: the run
# continues from its checkpoint (<out_dir>/<run>.ckpt) or starts without a run file; a
# run with rounds but no checkpoint is refused (exit 2), a complete one is not started.
# Code: the fedmpi package in /scratch/fedmpi (submitted at git 0123456789ab).
#SBATCH --job-name=snap
#SBATCH --array=0-3%2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=3
#SBATCH --partition=gpu
#SBATCH --time=2:00:00
#SBATCH --gpus-per-node=2
#SBATCH --cpus-per-task=2
#SBATCH --chdir=/scratch/fedmpi
#SBATCH --output=/scratch/fedmpi/runs/snap/logs/%x_%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

set -uo pipefail
RUNS=(
  method-fedavg_seed-0
  method-fedavg_seed-1
  method-topk_seed-0
  method-topk_seed-1
)
RUN=${RUNS[$SLURM_ARRAY_TASK_ID]}
PYTHON=/opt/venv/bin/python
CONFIG=/scratch/fedmpi/runs/snap/configs/$RUN.toml
H5=/scratch/fedmpi/runs/snap/$RUN.h5
RUN_LOG=/scratch/fedmpi/runs/snap/logs/$RUN.log
MAX_REQUEUES=20
TASK=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
RESTARTS=${SLURM_RESTART_COUNT:-0}
FEDMPI_ROOT=/scratch/fedmpi
SUBMITTED_COMMIT=0123456789ab
export PYTHONUNBUFFERED=1
# the fedmpi of the checkout that submitted this job, before any installed one; and no
# implicit sys.path entry for the working folder (Python >= 3.11), which could hold another
export PYTHONPATH=$FEDMPI_ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONSAFEPATH=1
log() { echo "[$(date '+%F %T')] task $TASK ($RUN): $*"; }
# shellcheck disable=SC2016
CODE=$("$PYTHON" -c 'import os, fedmpi, fedmpi.metrics as m
print(os.path.dirname(os.path.dirname(os.path.realpath(fedmpi.__file__))), m.git_commit())')
if [ "${CODE%% *}" != "$(cd "$FEDMPI_ROOT" 2>/dev/null && pwd -P)" ]; then
  log "error: $PYTHON imports fedmpi from ${CODE%% *}, not from $FEDMPI_ROOT; not started"
  exit 2
fi
log "fedmpi from $FEDMPI_ROOT at git ${CODE#* } (submitted at $SUBMITTED_COMMIT)"
complete() {
  [ -e "$H5" ] && "$PYTHON" -c 'import sys; from fedmpi.metrics import open_run
sys.exit(0 if open_run(sys.argv[1]).complete else 1)' "$H5" 2>/dev/null
}

if complete; then log "already complete: $H5"; exit 0; fi

REQUEUE=0
CHILD=
on_signal() {  # USR1: time limit ahead; TERM: preemption or scancel
  log "caught SIG$1: the run checkpoints and stops"
  if [ "$1" = USR1 ]; then REQUEUE=1; fi
  if [ -n "$CHILD" ]; then kill -USR1 "$CHILD" 2>/dev/null; fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

log "start (restart $RESTARTS) on ${SLURM_JOB_NODELIST:-$(hostname)}: $CONFIG -> $H5"
/opt/venv/bin/mpiexec -n "$SLURM_NTASKS" "$PYTHON" -m mpi4py -m fedmpi.train "$CONFIG" --resume >>"$RUN_LOG" 2>&1 &
CHILD=$!
wait "$CHILD"
RC=$?
while kill -0 "$CHILD" 2>/dev/null; do  # a trapped signal interrupted wait: wait again
  wait "$CHILD"
  RC=$?
done
log "fedmpi.train exited with status $RC (log: $RUN_LOG)"
if complete; then log "complete: $H5"; exit 0; fi
# 75: the run checkpointed on the signal; > 128: killed by it before it could checkpoint
if [ "$REQUEUE" = 1 ] && { [ "$RC" = 75 ] || [ "$RC" -gt 128 ]; }; then
  if [ "$RESTARTS" -ge "$MAX_REQUEUES" ]; then
    log "not requeued: $RESTARTS restart(s) already (submit.py --max-requeues)"
    exit 1
  fi
  log "requeueing $TASK to resume from the checkpoint"
  scontrol requeue "$TASK"
  exit 0
fi
if [ "$RC" = 0 ]; then RC=1; fi  # stopped without finishing
exit "$RC"
