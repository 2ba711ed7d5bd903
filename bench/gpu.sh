#!/usr/bin/env bash
# One GPU check, for a machine with a CUDA GPU (results under ${OUT:-runs/bench}):
#   bash bench/gpu.sh
# 20 training steps of 4-bit QLoRA on a randomly initialised Qwen3-4B, then 200 prompts scored.
# bitsandbytes may be missing on GPU images: install it first, or put its wheel in .whl/.
set -euo pipefail
OUT="${OUT:-runs/bench}"
mkdir -p "$OUT"
if ! python3 -c "import bitsandbytes" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target .whl/site .whl/*.whl
  export PYTHONPATH="$PWD/.whl/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 bench/qlora_throughput.py --arch configs/models/qwen3-4b --steps 20 --micro-batch 4 \
  --score-prompts 200 --score-batch 16 --out "$OUT/qwen3-4b-qlora.json" 2>&1 | tee "$OUT/qwen3-4b-qlora.log"
