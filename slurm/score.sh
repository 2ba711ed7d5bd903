#!/usr/bin/env bash
# sbatch [--nodes=N] slurm/score.sh [--dry-run] [CONFIG.yaml] [overrides...]   (slurm/submit.sh: the whole chain)
# Reloads <run_dir>/ranker/best from disk and scores every user's candidates on every GPU of N nodes,
# then, on node 0, exports the adapter and merged model (when export.in_run) and writes the report.
# Preemption: on USR1 the processes save the users scored so far (scores/<split>/) and the job requeues
# itself; the requeued job scores only the rest (none lost, none scored twice).
# Site settings (partition, account, GPUs, container, ...): slurm/site.env, see slurm/site.env.example.
#SBATCH --job-name=rerank-score
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
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
RD_USAGE="sbatch [--nodes=N] slurm/score.sh [--dry-run] [CONFIG.yaml] [overrides...]"

rd_load_site
rd_parse_args "$@"
rd_job_start score
status=0
rd_launch_on_nodes score "${RD_CONFIG_ARGS[@]}" "${RD_OVERRIDES[@]}" || status=$?
if [ "$status" != 0 ]; then rd_finish "$status"; fi
# One process each, here on node 0: export follows the run's export.in_run, as `rerank-dist run` does.
in_run=true
if [ "$RD_DRY_RUN" = 0 ]; then
  in_run="$("${RD_CMD[@]}" config "${RD_CONFIG_ARGS[@]}" "${RD_OVERRIDES[@]}" |
    awk '/^export:/ {s = 1; next} /^[^ ]/ {s = 0} s && $1 == "in_run:" {print $2}')" || rd_finish $?
else
  echo "(export only when the run's export.in_run is true)"
fi
if [ "$in_run" != false ]; then
  rd_run "${RD_CMD[@]}" export "${RD_CONFIG_ARGS[@]}" "${RD_OVERRIDES[@]}" || rd_finish $?
fi
rd_run "${RD_CMD[@]}" report "${RD_CONFIG_ARGS[@]}" "${RD_OVERRIDES[@]}" || rd_finish $?
# The doctor's verdict goes into report.md and doctor.md; its findings (exit 1/2) are about the
# model, not the job, so they do not fail it.
if [ "$RD_DRY_RUN" = 0 ]; then
  run_dir="$("${RD_CMD[@]}" config "${RD_CONFIG_ARGS[@]}" "${RD_OVERRIDES[@]}" | awk '/^run_dir:/ {print $2}')"
  rd_run "${RD_CMD[@]}" doctor "$run_dir" || echo "doctor: exit $? (see $run_dir/doctor.md)"
else
  echo "(then: rerank-dist doctor RUN_DIR; its findings do not fail the job)"
fi
rd_finish 0
