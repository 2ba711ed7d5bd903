# source slurm/lib.sh   (by prepare.sh, train.sh, score.sh and submit.sh; not run on its own)
# shellcheck shell=bash
# What the Slurm scripts share: site settings, argument parsing, --dry-run, the per-node launch and
# the requeue after a preemption.

# Site settings, in this order (later wins): the defaults below, slurm/site.env (or the file named by
# RERANK_SITE_ENV), then the environment the script was started with. See slurm/site.env.example.
rd_load_site() {
  local site="${RERANK_SITE_ENV:-$RD_SLURM_DIR/site.env}" name
  local -a given=()
  for name in $(compgen -v RERANK_); do given+=("$name=${!name}"); done
  if [ -n "${RERANK_SITE_ENV:-}" ] && [ ! -f "$site" ]; then
    echo "error: RERANK_SITE_ENV=$site: no such file" >&2
    exit 2
  fi
  if [ -f "$site" ]; then
    # shellcheck source=/dev/null
    source "$site"
  fi
  for name in "${given[@]}"; do export "${name?}"; done  # the caller's environment overrides the file
  : "${RERANK_PARTITION:=}" "${RERANK_ACCOUNT:=}" "${RERANK_SBATCH_ARGS:=}"
  : "${RERANK_NODES:=1}" "${RERANK_GPUS_PER_NODE:=8}" "${RERANK_CPUS_PER_TASK:=32}" "${RERANK_PREPARE_CPUS:=8}"
  : "${RERANK_TIME_PREPARE:=02:00:00}" "${RERANK_TIME_TRAIN:=24:00:00}" "${RERANK_TIME_SCORE:=04:00:00}"
  : "${RERANK_SIGNAL_LEAD:=300}" "${RERANK_MAX_REQUEUES:=20}" "${RERANK_LOG_DIR:=logs}"
  : "${RERANK_SETUP:=}" "${RERANK_CONTAINER:=}" "${RERANK_DIST:=rerank-dist}" "${RERANK_NPROC_PER_NODE:=}"
  export RERANK_PARTITION RERANK_ACCOUNT RERANK_SBATCH_ARGS RERANK_NODES RERANK_GPUS_PER_NODE \
    RERANK_CPUS_PER_TASK RERANK_PREPARE_CPUS RERANK_TIME_PREPARE RERANK_TIME_TRAIN RERANK_TIME_SCORE \
    RERANK_SIGNAL_LEAD RERANK_MAX_REQUEUES RERANK_LOG_DIR RERANK_SETUP RERANK_CONTAINER RERANK_DIST \
    RERANK_NPROC_PER_NODE
  # The command that runs rerank-dist: an optional container prefix, then the program (both may be
  # several words, e.g. "apptainer exec --nv image.sif" and "python -m rerank_dist.cli").
  read -r -a RD_CMD <<< "$RERANK_CONTAINER $RERANK_DIST"
}

# [--dry-run] [CONFIG.yaml | -c CONFIG.yaml] [overrides...] -> RD_DRY_RUN, RD_CONFIG_ARGS, RD_OVERRIDES
rd_parse_args() {
  RD_DRY_RUN=0
  RD_CONFIG_ARGS=()
  if [ "${1:-}" = "--dry-run" ]; then RD_DRY_RUN=1; shift; fi
  case "${1:-}" in
    -c|--config) RD_CONFIG_ARGS=(--config "${2:?error: $1 needs a file}"); shift 2 ;;
    *.yaml|*.yml) RD_CONFIG_ARGS=(--config "$1"); shift ;;
  esac
  RD_OVERRIDES=("$@")
  local arg
  for arg in "${RD_OVERRIDES[@]}"; do
    case "$arg" in
      *=*) ;;
      *) echo "error: '$arg' is not an override (section.field=value); usage: $RD_USAGE" >&2; exit 2 ;;
    esac
  done
  if [ "${#RD_CONFIG_ARGS[@]}" -gt 0 ] && [ ! -f "${RD_CONFIG_ARGS[1]}" ] && [ "$RD_DRY_RUN" = 0 ]; then
    echo "error: config file ${RD_CONFIG_ARGS[1]} not found (relative paths start at $(pwd))" >&2
    exit 2
  fi
}

# The arguments as one shell-quoted line; <placeholders> stay readable.
rd_quote() {
  local arg line=""
  for arg in "$@"; do
    case "$arg" in
      *'<'*'>'*) line+=" ${arg// /\\ }" ;;  # a placeholder, kept readable
      *) line+=" $(printf '%q' "$arg")" ;;
    esac
  done
  echo "${line# }"
}

# Before submitting jobs (submit.sh, tables.sh): the log folder (Slurm opens the log before the job
# starts, so it must exist) and the sbatch options every job gets (RD_COMMON) and a GPU job adds
# (RD_GPU_JOB), from the site settings. Descriptor 3 is the terminal, for rd_submit's --dry-run.
rd_submission_setup() {
  mkdir -p "$RERANK_LOG_DIR"
  RD_COMMON=(--output="$RERANK_LOG_DIR/%x-%j.out" --kill-on-invalid-dep=yes)
  if [ -n "$RERANK_PARTITION" ]; then RD_COMMON+=(--partition="$RERANK_PARTITION"); fi
  if [ -n "$RERANK_ACCOUNT" ]; then RD_COMMON+=(--account="$RERANK_ACCOUNT"); fi
  local -a extra
  read -r -a extra <<< "$RERANK_SBATCH_ARGS"
  RD_COMMON+=("${extra[@]}")
  # shellcheck disable=SC2034  # read by the scripts that source this file
  RD_GPU_JOB=(--nodes="$RERANK_NODES" --ntasks-per-node=1 --gpus-per-node="$RERANK_GPUS_PER_NODE"
    --cpus-per-task="$RERANK_CPUS_PER_TASK" --signal="USR1@$RERANK_SIGNAL_LEAD" --requeue)
  exec 3>&1
}

# rd_submit NAME SBATCH-ARGS... SCRIPT ARGS: prints the job id (a placeholder <NAME-job-id> under
# --dry-run, where the command itself goes to the terminal through descriptor 3, as $(rd_submit ...)
# captures stdout).
rd_submit() {
  local name="$1"
  shift
  if [ "$RD_DRY_RUN" = 1 ]; then
    rd_quote sbatch "$@" >&3
    echo "<$name-job-id>"
  else
    local id
    id="$(sbatch --parsable "$@")"
    echo "${id%%;*}"  # "id;cluster" on federated setups
  fi
}

# Run a command, or only print it under --dry-run.
rd_run() {
  if [ "$RD_DRY_RUN" = 1 ]; then
    rd_quote "$@"
  else
    "$@"
  fi
}

# Inside a job: say where and what; outside one, only --dry-run makes sense.
rd_job_start() {
  local what="$1"
  if [ -z "${SLURM_JOB_ID:-}" ] && [ "$RD_DRY_RUN" = 0 ]; then
    echo "error: not inside a Slurm job: submit it (sbatch slurm/$what.sh ... or slurm/submit.sh ...), or add --dry-run" >&2
    exit 2
  fi
  echo "$(date '+%F %T') job ${SLURM_JOB_ID:-<id>} (${SLURM_JOB_NAME:-rerank-$what}), restart ${SLURM_RESTART_COUNT:-0}," \
    "on ${SLURM_JOB_NODELIST:-<nodes>}: $(rd_quote "$what" "${RD_CONFIG_ARGS[@]}" "${RD_OVERRIDES[@]}")"
  if [ -n "$RERANK_SETUP" ]; then
    if [ "$RD_DRY_RUN" = 1 ]; then
      echo "setup: $RERANK_SETUP"
    else
      # module load / source a venv: the tasks inherit the environment it makes. Such scripts often
      # read unset variables, so not under set -u.
      set +u
      eval "$RERANK_SETUP"
      set -u
    fi
  fi
}

# The address the other nodes reach node 0 at: Slurm's own NodeAddr for it (the host name on most
# clusters), unless RERANK_MASTER_ADDR says otherwise.
rd_head_addr() {
  local head addr
  head="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)" || true
  if [ -z "$head" ]; then
    echo "error: scontrol show hostnames $SLURM_JOB_NODELIST gave no node" >&2
    return 2
  fi
  addr="$(scontrol show node "$head" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)" || true
  echo "${RERANK_MASTER_ADDR:-${addr:-$head}}"
}

# One task per node; on each, `rerank-dist launch` starts that node's processes for STAGE, with the
# node's rank read inside the task (SLURM_NODEID differs per node; the batch shell knows only its own).
rd_launch_on_nodes() {
  local stage="$1" addr port nodes
  shift
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    addr="$(rd_head_addr)" || return 2
    # Differs per job and per requeue: the previous run's port may still be held (TIME_WAIT).
    port="${RERANK_MASTER_PORT:-$((20000 + (SLURM_JOB_ID * 16 + ${SLURM_RESTART_COUNT:-0}) % 40000))}"
    nodes="$SLURM_NNODES"
  else
    addr="<node-0-address>" port="<port>" nodes="<N>"
  fi
  local -a launch=("${RD_CMD[@]}" launch)
  local -a rest=(--master-addr "$addr" --master-port "$port")
  if [ -n "$RERANK_NPROC_PER_NODE" ]; then rest+=(--nproc-per-node "$RERANK_NPROC_PER_NODE"); fi
  rest+=("$stage" "$@")
  # --label: each log line starts with its node's task number. --wait: a task that ended (a crashed
  # node) makes srun end the others 120 s later, instead of leaving them blocked in a collective.
  local -a step=(--nodes="$nodes" --ntasks-per-node=1 --label --wait=120)
  # Slurm 22.05+ no longer passes the job's --cpus-per-task on to srun: without this each node's
  # launcher and all its workers would share one CPU.
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then step+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
  if [ "$RD_DRY_RUN" = 1 ]; then
    echo "srun ${step[*]}, on each node:"
    echo "  $(rd_quote "${launch[@]}" --nnodes "$nodes" --node-rank "<SLURM_NODEID>" "${rest[@]}")"
    return 0
  fi
  # trap '' USR1: an ignored signal stays ignored across exec, so the preemption warning cannot kill
  # the launcher before it starts (the workers install their own handler, see rerank_dist/preemption.py).
  # shellcheck disable=SC2016  # expanded by each task's shell, on its node
  srun "${step[@]}" \
    bash -c 'trap "" USR1; n=$1; shift; exec "${@:1:n}" --nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" "${@:n+1}"' \
    rerank-task "${#launch[@]}" "${launch[@]}" "${rest[@]}"
}

# A launcher status of 75 means: preempted, state saved. Requeue the job (same id, same log) so it
# resumes; anything else ends the job with that status.
RD_EXIT_REQUEUE=75
rd_finish() {
  local status="$1" restarts="${SLURM_RESTART_COUNT:-0}"
  if [ "$status" = "$RD_EXIT_REQUEUE" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    if [ "$restarts" -ge "$RERANK_MAX_REQUEUES" ]; then
      echo "error: preempted after $restarts requeues (RERANK_MAX_REQUEUES=$RERANK_MAX_REQUEUES); the state is saved: submit the job again to go on" >&2
      exit "$status"
    fi
    echo "$(date '+%F %T') preempted with its state saved: requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
    scontrol requeue "$SLURM_JOB_ID" || echo "error: scontrol requeue $SLURM_JOB_ID failed; submit the job again to resume" >&2
  fi
  exit "$status"
}
