#!/usr/bin/env bash
# sbatch [--nodes=N] slurm/score.sh configs/qwen3_4b_qlora.yaml [overrides...]
# Reloads <run_dir>/ranker/best from disk and scores every user's candidates across all GPUs of all nodes.
# Not yet tested on a real Slurm cluster.
#SBATCH --job-name=rerank-score
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
CONFIG="${1:?usage: sbatch slurm/score.sh CONFIG.yaml [overrides...]}"
shift
MAIN_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MAIN_PORT="${MAIN_PORT:-29500}"
mkdir -p logs
srun bash -c 'exec rerank-dist launch --nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" \
  --master-addr "$0" --master-port "$1" score -c "$2" "${@:3}"' "$MAIN_ADDR" "$MAIN_PORT" "$CONFIG" "$@"
