#!/usr/bin/env bash
# sbatch slurm/tables_cell.sh cpu|nodes [--dry-run] TABLES-ARGS...   (slurm/tables.sh submits these)
# One cell of `rerank-dist tables` as a job: `rerank-dist tables TABLES-ARGS` (which name the cell with
# --cell, or ask for --tables-only), here (cpu: the grid, a retriever, the tables) or on every node of
# the job (nodes: a ranker, one task per node launching that node's processes). Preemption: a ranker
# cell stops with its state saved on USR1 and the job requeues itself; the same cell resumes.
# Site settings (partition, account, GPUs, container, ...): slurm/site.env, see slurm/site.env.example.
#SBATCH --job-name=rerank-tables
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
# Under sbatch this file runs from a copy in Slurm's spool: find the slurm/ folder it was submitted
# from (RERANK_SLURM_DIR, set by submit.sh; else the job's Command; else beside this file or the
# submit directory's slurm/).
RD_SUBMITTED=""
if [ -z "${RERANK_SLURM_DIR:-}" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  RD_SUBMITTED="$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')" || true
fi
for RD_SLURM_DIR in "${RERANK_SLURM_DIR:-}" "${RD_SUBMITTED%/*}" "$(dirname "${BASH_SOURCE[0]}")" \
  "${SLURM_SUBMIT_DIR:-.}/slurm"; do
  if [ -n "$RD_SLURM_DIR" ] && [ -f "$RD_SLURM_DIR/lib.sh" ]; then break; fi
done
if [ ! -f "$RD_SLURM_DIR/lib.sh" ]; then
  echo "error: cannot find slurm/lib.sh (submit from the repository, or set RERANK_SLURM_DIR)" >&2
  exit 2
fi
# shellcheck source=slurm/lib.sh
source "$RD_SLURM_DIR/lib.sh"
RD_USAGE="sbatch slurm/tables_cell.sh cpu|nodes [--dry-run] TABLES-ARGS..."

where="${1:-}"
shift || true
case "$where" in
  cpu|nodes) ;;
  *) echo "error: expected cpu or nodes first, got '$where'; usage: $RD_USAGE" >&2; exit 2 ;;
esac
RD_DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then RD_DRY_RUN=1; shift; fi  # (tables.sh passes --cell NAME first)
RD_CONFIG_ARGS=()
RD_OVERRIDES=("$@")  # shown by rd_job_start; passed on as they are
rd_load_site
rd_job_start tables
status=0
if [ "$where" = nodes ]; then
  rd_launch_on_nodes tables "$@" || status=$?
else
  # The grid and the retrievers train on this job's CPUs (no GPU is allocated to them).
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
  rd_run "${RD_CMD[@]}" tables "$@" || status=$?
fi
rd_finish "$status"
