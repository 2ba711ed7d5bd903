#!/usr/bin/env bash
# sbatch [--nodes=N] slurm/train.sh [--dry-run] [CONFIG.yaml] [overrides...]   (slurm/submit.sh: the whole chain)
# Trains the ranker on every GPU of N nodes: one task per node, on which `rerank-dist launch` starts one
# process per GPU with that node's rank; node 0 is the meeting point. The run directory (the config's
# run_dir) must be on a filesystem every node sees, and prepared by slurm/prepare.sh.
# Preemption: USR1 arrives RERANK_SIGNAL_LEAD (300) s before the time limit; every process stops after
# the same optimizer step, writes its checkpoint and the job requeues itself, resuming from that step.
# Site settings (partition, account, GPUs, container, ...): slurm/site.env, see slurm/site.env.example.
#SBATCH --job-name=rerank-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
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
RD_USAGE="sbatch [--nodes=N] slurm/train.sh [--dry-run] [CONFIG.yaml] [overrides...]"

rd_load_site
rd_parse_args "$@"
rd_job_start train
status=0
rd_launch_on_nodes train "${RD_CONFIG_ARGS[@]}" "${RD_OVERRIDES[@]}" || status=$?
rd_finish "$status"
