#!/usr/bin/env bash
# Create a virtual environment with everything rerank_dist needs (CPU build of torch by default).
#   bash scripts/install.sh [VENV_DIR]        TORCH_SPEC="torch==2.13.0" overrides the torch requirement
set -euo pipefail
VENV="${1:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PIP_QUIET="${PIP_QUIET:--q}"

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install $PIP_QUIET --upgrade pip setuptools wheel
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
"$PY" -m pip install $PIP_QUIET "$TORCH_SPEC"
# deepspeed's setup imports torch; without --no-build-isolation pip would build it against a fresh
# (CUDA) torch in an isolated environment.
"$PY" -m pip install $PIP_QUIET --no-build-isolation "deepspeed>=0.16"
"$PY" -m pip install $PIP_QUIET -e ".[test]"
touch "$VENV/.installed"
