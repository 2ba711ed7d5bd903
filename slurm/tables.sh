#!/usr/bin/env bash
# slurm/tables.sh [--dry-run] [TABLES-ARGS...]   e.g. slurm/tables.sh --datasets ml-latest-small beauty --seeds 0 1 2
# LlamaRec's tables (`rerank-dist tables`, same arguments) as Slurm jobs: one job per cell not yet done,
# each after the cell it reads (--dependency=afterok; a failed cell cancels the cells after it), then
# one job that writes the tables from whatever cells are done (afterany: also after a failure, and
# it lists the cells that are not done). The grid and the retrievers are CPU jobs (RERANK_PREPARE_CPUS,
# RERANK_TIME_PREPARE); a ranker (train + score + report) is a GPU job on RERANK_NODES nodes
# (RERANK_TIME_TRAIN) that requeues itself when preempted. Run it again after a failure: the cells done
# are skipped. The jobs start in this directory, so relative --root and --config paths are the same.
# Site settings: slurm/site.env (slurm/site.env.example); --dry-run prints the sbatch commands only.
set -euo pipefail
RD_SLURM_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=slurm/lib.sh
source "$RD_SLURM_DIR/lib.sh"
RD_USAGE="slurm/tables.sh [--dry-run] [rerank-dist tables arguments...]"

RD_DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then RD_DRY_RUN=1; shift; fi
for arg in "$@"; do
  case "$arg" in
    --cell|--list-cells|--tables-only|--dry-run)
      echo "error: $arg: tables.sh chooses the cells itself; usage: $RD_USAGE" >&2; exit 2 ;;
  esac
done
rd_load_site
if [ "$RD_DRY_RUN" = 0 ] && ! command -v sbatch > /dev/null; then
  echo "error: sbatch not found: run this on a Slurm login node (or add --dry-run)" >&2
  exit 2
fi
# The cells, their state and the cell each reads; this also checks every argument and config.
listing="$("${RD_CMD[@]}" tables --list-cells "$@")" || exit $?
export RERANK_SLURM_DIR="$RD_SLURM_DIR"
rd_submission_setup
cpu_job=(--nodes=1 --ntasks=1 --cpus-per-task="$RERANK_PREPARE_CPUS" --time="$RERANK_TIME_PREPARE")
declare -A job_of=()
ids=()
while IFS=$'\t' read -r name kind state after; do
  if [ "$state" = "done" ]; then
    echo "$name: done, not submitted"
    continue
  fi
  dependency=()
  if [ "$after" != - ] && [ -n "${job_of[$after]:-}" ]; then dependency=(--dependency="afterok:${job_of[$after]}"); fi
  job_name="rerank-tables-${name//\//-}"
  if [ "$kind" = ranker ]; then
    resources=("${RD_GPU_JOB[@]}" --time="$RERANK_TIME_TRAIN")
    where=nodes
  else
    resources=("${cpu_job[@]}")
    where=cpu
  fi
  job_of[$name]="$(rd_submit "$name" "${RD_COMMON[@]}" "${dependency[@]}" --job-name="$job_name" "${resources[@]}" \
    "$RD_SLURM_DIR/tables_cell.sh" "$where" --cell "$name" "$@")"
  ids+=("${job_of[$name]}")
  echo "$name: ${job_of[$name]} (${state}${dependency[*]:+, ${dependency[*]}})"
done <<< "$listing"
final=()
if [ "${#ids[@]}" -gt 0 ]; then final=(--dependency="afterany:$(IFS=:; echo "${ids[*]}")"); fi
tables_id="$(rd_submit tables "${RD_COMMON[@]}" "${final[@]}" --job-name=rerank-tables "${cpu_job[@]}" \
  "$RD_SLURM_DIR/tables_cell.sh" cpu --tables-only "$@")"
echo "tables: $tables_id; submitted ${#ids[@]} cell job(s); logs in $RERANK_LOG_DIR/rerank-tables-*-<job id>.out"
