#!/usr/bin/env bash
# Run HERE (where pip and the bundled data are), before bench/gpu.sh runs on a GPU machine:
#   bash bench/gpu_prepare.sh [VENV]
# Writes .gpu/ (git-ignored; carry it to the GPU machine with the checkout):
#   .gpu/whl/  wheels the GPU image lacks: bitsandbytes (4-bit QLoRA), TRL (the kit's comparison row,
#              pure Python; its dependencies are the project's own), DeepSpeed (built here as a pure
#              Python wheel: its CUDA ops are compiled on first use, and the zero2/zero3 backends use
#              none of them, training with torch's AdamW) and DeepSpeed's own dependencies
#   .gpu/run/  a run directory with the data and retriever stages done (bundled ml-latest-small, a short
#              retriever training: its candidates feed the prompts; their quality does not matter here)
set -euo pipefail
VENV="${1:-.venv}"
mkdir -p .gpu/whl
if ! ls .gpu/whl/bitsandbytes-*.whl >/dev/null 2>&1; then
  "$VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    -d .gpu/whl "bitsandbytes==0.50.2"
fi
if ! ls .gpu/whl/trl-*.whl >/dev/null 2>&1; then
  "$VENV/bin/python" -m pip download -q --no-deps -d .gpu/whl "trl==1.16.0"
fi
if ! ls .gpu/whl/deepspeed-*.whl >/dev/null 2>&1; then
  "$VENV/bin/python" -m pip wheel -q --no-deps -w .gpu/whl "deepspeed==$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("deepspeed"))')"
  "$VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl hjson py-cpuinfo msgpack nvidia-ml-py ninja einops
fi
RUN=.gpu/run
"$VENV/bin/rerank-dist" prepare "run_dir=$RUN"
"$VENV/bin/rerank-dist" retrieve "run_dir=$RUN" retriever.max_epochs=2 retriever.max_minutes=1
du -sh .gpu/*
