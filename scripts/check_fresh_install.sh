#!/usr/bin/env bash
# `pip install .` into a fresh virtual environment (torch pinned as scripts/install.sh pins it, no
# pip cache) gives a working `rerank-dist --help` and `rerank-dist doctor`, leaves the extras'
# packages (bitsandbytes, deepspeed) out, and a feature that needs one names its pip extra.
# .ci/run runs it after the tests; about 1.5 minutes, most of it downloading the dependencies.
#   bash scripts/check_fresh_install.sh        TORCH_SPEC="torch==2.13.0" overrides the torch requirement
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
fail() { echo "check_fresh_install: $*" >&2; exit 1; }

# The files git would ship (tracked, or new and not ignored), copied: building in the checkout
# would leave build/ and *.egg-info behind.
mkdir "$WORK/src"
git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf - | tar -xf - -C "$WORK/src"
python3 -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
start=$SECONDS
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
"$PY" -m pip install -q --no-cache-dir "$TORCH_SPEC"
"$PY" -m pip install -q --no-cache-dir "$WORK/src"
echo "check_fresh_install: installed in $((SECONDS - start)) s"

for module in bitsandbytes deepspeed; do
  if "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)"; then
    fail "$module is installed by \`pip install .\`; it belongs to an extra only"
  fi
done
"$WORK/venv/bin/rerank-dist" --help > /dev/null || fail "rerank-dist --help failed"

# A foreign predictions file whose scores rank the target first for most users: the doctor must
# read it, pass it (exit 0) and write its report, plots included.
"$PY" - "$WORK/predictions.jsonl" << 'PYEOF'
import json, random, sys
rng = random.Random(0)
with open(sys.argv[1], "w") as f:
    for user in range(200):
        candidates = rng.sample(range(1, 1000), 20)
        target = candidates[rng.randrange(20)]
        scores = [round(rng.random() + (1.0 if c == target and user % 4 else 0.0), 4) for c in candidates]
        f.write(json.dumps({"user": user, "candidates": candidates, "scores": scores, "target": target}) + "\n")
PYEOF
code=0
"$WORK/venv/bin/rerank-dist" doctor "$WORK/predictions.jsonl" --out "$WORK/doctor" > "$WORK/doctor.txt" || code=$?
[ "$code" = 0 ] || { cat "$WORK/doctor.txt"; fail "rerank-dist doctor exited $code, expected 0"; }
if [ ! -s "$WORK/doctor/doctor.json" ] || ! ls "$WORK/doctor"/*.png > /dev/null; then
  fail "the doctor wrote no report or no plots"
fi

# A feature without its extra: one line naming the pip command, exit status 2, nothing run.
code=0
"$WORK/venv/bin/rerank-dist" train "run_dir=$WORK/run" train.backend=zero2 2> "$WORK/err.txt" || code=$?
if [ "$code" != 2 ] || [ "$(wc -l < "$WORK/err.txt")" != 1 ] || ! grep -qF "pip install 'rerank_dist[deepspeed]'" "$WORK/err.txt"; then
  cat "$WORK/err.txt"
  fail "train.backend=zero2 without deepspeed: exit $code, expected 2 and one line naming the [deepspeed] extra"
fi
echo "check_fresh_install: rerank-dist --help, doctor and the missing-extra message work in a fresh environment"
