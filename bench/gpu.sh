#!/usr/bin/env bash
# The GPU kit: every check that needs a CUDA GPU, through the paths users run. Results under ${OUT:-runs/bench}.
#   bash bench/gpu_prepare.sh        # first, where pip works: wheels + a prepared run into .gpu/
#   bash bench/gpu.sh                # then on the GPU machine, from the checkout root (with .gpu/)
# 1. the dry-run plan (memory estimate before any weight is loaded);
# 2. `rerank-dist launch train`: one process per visible GPU, QLoRA (NF4, bf16 autocast, LoRA r=16 on
#    q/k/v/o, gradient checkpointing, batch 16 = GPUs x micro-batch x accumulation) of a random-weight
#    Qwen3-4B on the bundled ml-latest-small prompts (<= 1536 tokens): tokens/s, peak memory;
# 3. `rerank-dist launch score`: all 610 test users, batch 16: prompts/s, peak memory;
# 4. the same training under DeepSpeed ZeRO-3 (train.backend=zero3: sharded NF4 stored as bf16, the
#    adapter gathered at save), its tokens/s and peak memory next to its dry-run estimate;
# 5. the memory estimate against measured peaks (tests/test_memory.py -m gpu).
set -euo pipefail
OUT="${OUT:-runs/bench}"
STEPS="${STEPS:-8}"
mkdir -p "$OUT"
if ! python3 -c "import bitsandbytes, deepspeed" 2>/dev/null; then
  ls .gpu/whl/*.whl >/dev/null 2>&1 || { echo "bitsandbytes/deepspeed missing: run bench/gpu_prepare.sh and carry .gpu/"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target .gpu/site .gpu/whl/*.whl
  export PYTHONPATH="$PWD/.gpu/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
[ -f .gpu/run/retriever/stage.json ] || { echo "no prepared run in .gpu/run: run bench/gpu_prepare.sh"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, accelerate, peft, bitsandbytes as b, deepspeed; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__, \
'bitsandbytes', b.__version__, 'deepspeed', deepspeed.__version__)" | tee -a "$OUT/gpu.txt"

MODEL="$(mktemp -d)/qwen3-4b-random"  # 8 GB of random bf16 weights, outside the checkout
python3 bench/random_model.py --arch configs/models/qwen3-4b --out "$MODEL" --device cuda | tee -a "$OUT/gpu.txt"
SETTINGS=(run_dir=.gpu/run "model.name_or_path=$MODEL" model.gguf_fallback=false model.dtype=bfloat16
  model.quantization=nf4 model.lora_r=16 model.lora_alpha=32 "model.lora_target_modules=[q_proj,k_proj,v_proj,o_proj]"
  model.gradient_checkpointing=true prompt.history_items=20 prompt.title_max_tokens=32 prompt.max_prompt_tokens=1536
  prompt.max_train_examples=0 train.mixed_precision=bf16 train.batch_size=16 train.micro_batch_size=4 train.lr=1e-4
  train.warmup_steps=2 "train.max_steps=$STEPS" train.eval_every=1000 train.eval_users=32 train.save_every=0
  train.save_every_minutes=0 train.max_minutes=0 score.batch_size=16 export.in_run=false)

rm -rf .gpu/run_zero3 && cp -r .gpu/run .gpu/run_zero3 && rm -rf .gpu/run_zero3/ranker  # data + retriever only
python3 -m rerank_dist.cli launch train "${SETTINGS[@]}" --dry-run | tee "$OUT/plan.txt"
python3 -m rerank_dist.cli launch train "${SETTINGS[@]}" > "$OUT/train.log" 2>&1 || { tail -40 "$OUT/train.log"; exit 1; }
python3 -m rerank_dist.cli launch score "${SETTINGS[@]}" > "$OUT/score.log" 2>&1 || { tail -40 "$OUT/score.log"; exit 1; }
cp .gpu/run/ranker/train_summary.json .gpu/run/ranker/train_log.jsonl .gpu/run/metrics_test.json "$OUT/"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
s, m = json.load(open(f"{out}/train_summary.json")), json.load(open(f"{out}/metrics_test.json"))
print(f"train: {s['steps']} steps on {s['world_size']} process(es), accumulation {s['accumulation']}, "
      f"{s['tokens_per_s']:.0f} tokens/s (steps 2..), peak {s['peak_memory_gib']} GiB, "
      f"loss {s['loss_first_steps']:.3f} -> {s['loss_last_steps']:.3f}")
print(f"score: {m['reranker']['num_users']} users on {m['world_size']} process(es), {m['prompts_per_second']:.1f} "
      f"prompts/s, peak {m['peak_memory_gib']} GiB")
PY
# 4. ZeRO-3: the same run, weights sharded over the GPUs.
python3 -m rerank_dist.cli launch train "${SETTINGS[@]}" run_dir=.gpu/run_zero3 train.backend=zero3 --dry-run \
  | tee "$OUT/plan_zero3.txt"
python3 -m rerank_dist.cli launch train "${SETTINGS[@]}" run_dir=.gpu/run_zero3 train.backend=zero3 \
  > "$OUT/train_zero3.log" 2>&1 || { tail -40 "$OUT/train_zero3.log"; exit 1; }
cp .gpu/run_zero3/ranker/train_summary.json "$OUT/train_summary_zero3.json"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
for name, summary in (("ddp", "train_summary.json"), ("zero3", "train_summary_zero3.json")):
    s = json.load(open(f"{out}/{summary}"))
    plan = open(f"{out}/{'plan.txt' if name == 'ddp' else 'plan_zero3.txt'}").read()
    estimate = next((line.split("≈ ")[1].split(" GiB")[0] for line in plan.splitlines() if line.startswith("memory: ≈")), "?")
    print(f"{name}: {s['world_size']} GPU(s), {s['tokens_per_s']:.0f} tokens/s, peak {s['peak_memory_gib']} GiB per GPU "
          f"(dry-run estimate {estimate} GiB), loss {s['loss_first_steps']:.3f} -> {s['loss_last_steps']:.3f}")
PY
timeout 120 python3 -m pytest -q -m gpu tests/test_memory.py -p no:cacheprovider > "$OUT/memory_check.log" 2>&1 \
  || echo "memory check did not pass (see memory_check.log)"
tail -3 "$OUT/memory_check.log"
