#!/usr/bin/env bash
# shellcheck disable=SC2086  # $PIP_QUIET unquoted on purpose: PIP_QUIET= (empty) passes no argument
# Create a virtual environment with rerank_dist, every extra and the test tools (CPU build of torch by default).
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
# Every extra (qlora, deepspeed) and the test tools: `make test` runs the nf4 and DeepSpeed tests.
# DeepSpeed 0.19.8 builds under pip's build isolation (a pure-Python wheel, its ops compiled just in
# time), so no --no-build-isolation; only prebuilding its ops (DS_BUILD_OPS=1) would need torch there.
"$PY" -m pip install $PIP_QUIET -e ".[all,test]"
touch "$VENV/.installed"
