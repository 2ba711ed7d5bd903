#!/usr/bin/env bash
# slurm/submit.sh [--dry-run] [--from prepare|train|score] [CONFIG.yaml] [overrides...]
# Submits the whole run as three jobs, each starting only once the one before has succeeded
# (--dependency=afterok; a failed job cancels the rest): prepare.sh (CPU: data + retrievers), then
# train.sh and score.sh (GPU, RERANK_NODES nodes). A preempted job requeues itself and keeps its id,
# so the jobs after it wait for it. Resources come from slurm/site.env and the environment (see
# slurm/site.env.example); --dry-run prints the sbatch commands without submitting anything.
set -euo pipefail
RD_SLURM_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=slurm/lib.sh
source "$RD_SLURM_DIR/lib.sh"
RD_USAGE="slurm/submit.sh [--dry-run] [--from prepare|train|score] [CONFIG.yaml] [overrides...]"

dry_run=()
from=prepare
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=(--dry-run); shift ;;
    --from) from="${2:-}"; shift 2 || shift ;;
    *) break ;;
  esac
done
case "$from" in
  prepare|train|score) ;;
  *) echo "error: --from expects prepare, train or score, got '$from'; usage: $RD_USAGE" >&2; exit 2 ;;
esac
rd_load_site
rd_parse_args "${dry_run[@]}" "$@"
if [ "${#RD_CONFIG_ARGS[@]}" -gt 0 ]; then
  # The jobs may start in another directory's view of the filesystem: pass the config by absolute path.
  RD_CONFIG_ARGS[1]="$(cd "$(dirname "${RD_CONFIG_ARGS[1]}")" && pwd)/$(basename "${RD_CONFIG_ARGS[1]}")"
fi
if [ "$RD_DRY_RUN" = 0 ] && ! command -v sbatch > /dev/null; then
  echo "error: sbatch not found: run this on a Slurm login node (or add --dry-run)" >&2
  exit 2
fi
# The jobs find lib.sh and site.env through this, wherever sbatch copies their scripts.
export RERANK_SLURM_DIR="$RD_SLURM_DIR"
rd_submission_setup
args=("${RD_CONFIG_ARGS[@]}" "${RD_OVERRIDES[@]}")

after=()
ids=()
if [ "$from" = prepare ]; then
  prepare_id="$(rd_submit prepare "${RD_COMMON[@]}" --cpus-per-task="$RERANK_PREPARE_CPUS" --time="$RERANK_TIME_PREPARE" \
    "$RD_SLURM_DIR/prepare.sh" "${args[@]}")"
  after=(--dependency="afterok:$prepare_id")
  ids+=("prepare $prepare_id")
fi
if [ "$from" != score ]; then
  train_id="$(rd_submit train "${RD_COMMON[@]}" "${after[@]}" "${RD_GPU_JOB[@]}" --time="$RERANK_TIME_TRAIN" \
    "$RD_SLURM_DIR/train.sh" "${args[@]}")"
  after=(--dependency="afterok:$train_id")
  ids+=("train $train_id")
fi
score_id="$(rd_submit score "${RD_COMMON[@]}" "${after[@]}" "${RD_GPU_JOB[@]}" --time="$RERANK_TIME_SCORE" \
  "$RD_SLURM_DIR/score.sh" "${args[@]}")"
ids+=("score $score_id")
echo "submitted: ${ids[*]}; logs in $RERANK_LOG_DIR/rerank-<stage>-<job id>.out"
