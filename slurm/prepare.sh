#!/usr/bin/env bash
# sbatch slurm/prepare.sh [--dry-run] [CONFIG.yaml] [overrides...]   (slurm/submit.sh: the whole chain)
# The CPU part of a run, as a CPU-only job: `rerank-dist prepare` (dataset) then `rerank-dist retrieve`
# (the LRURec retrievers and every split's candidates), so that no GPU waits on them. Each stage is
# skipped when its outputs exist for the same inputs, so a requeued or resubmitted job redoes nothing.
# Site settings (partition, account, CPUs, container, ...): slurm/site.env, see slurm/site.env.example.
#SBATCH --job-name=rerank-prepare
#SBATCH --nodes=1
#SBATCH --ntasks=1
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
RD_USAGE="sbatch slurm/prepare.sh [--dry-run] [CONFIG.yaml] [overrides...]"

rd_load_site
rd_parse_args "$@"
rd_job_start prepare
# The retriever trains on this job's CPUs (no GPU is allocated to it).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
rd_run "${RD_CMD[@]}" prepare "${RD_CONFIG_ARGS[@]}" "${RD_OVERRIDES[@]}" || rd_finish $?
rd_run "${RD_CMD[@]}" retrieve "${RD_CONFIG_ARGS[@]}" "${RD_OVERRIDES[@]}" || rd_finish $?
rd_finish 0
