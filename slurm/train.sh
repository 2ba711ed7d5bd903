#!/usr/bin/env bash
# sbatch [--nodes=N] slurm/train.sh configs/qwen3_4b_qlora.yaml [overrides...]
# One task per node; on each node `rerank-dist launch` starts one process per GPU, with that node's own
# rank (read inside the task, not by the batch shell) and node 0 as the meeting point.
# The run directory must be on a filesystem every node sees. Not yet tested on a real Slurm cluster.
#SBATCH --job-name=rerank-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
CONFIG="${1:?usage: sbatch slurm/train.sh CONFIG.yaml [overrides...]}"
shift
MAIN_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MAIN_PORT="${MAIN_PORT:-29500}"
mkdir -p logs
# Single quotes: SLURM_NODEID must be expanded by each node's task, not once here.
srun bash -c 'exec rerank-dist launch --nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" \
  --master-addr "$0" --master-port "$1" run -c "$2" "${@:3}"' "$MAIN_ADDR" "$MAIN_PORT" "$CONFIG" "$@"
