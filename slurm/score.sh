#!/usr/bin/env bash
# sbatch slurm/score.sh configs/qwen3_4b_qlora.yaml [overrides...]
# Reloads <run_dir>/ranker/best from disk and scores every user's candidates across all GPUs.
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
GPUS_PER_NODE="${SLURM_GPUS_ON_NODE:-8}"
MAIN_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
mkdir -p logs
srun accelerate launch \
  --multi_gpu --mixed_precision bf16 \
  --num_machines "$SLURM_NNODES" --num_processes "$((SLURM_NNODES * GPUS_PER_NODE))" \
  --machine_rank "$SLURM_NODEID" --main_process_ip "$MAIN_ADDR" --main_process_port "${MAIN_PORT:-29500}" \
  launch/score.py -c "$CONFIG" "$@"
