#!/usr/bin/env bash
# The GPU kit: the speed benchmark on one GPU, in one call of at most ~9 minutes. Results under ${OUT:-runs/bench}.
#   bash bench/gpu_prepare.sh        # first, where pip works: wheels (bitsandbytes, deepspeed, trl) + a prepared run into .gpu/
#   bash bench/gpu.sh                # then on the GPU machine, from the checkout root (with .gpu/)
#   python3 bench/gpu_table.py "$OUT" --dest bench/results/gpu   # back here: the table into the repository
# Every row trains a random-weight Qwen3-4B on the bundled ml-latest-small prompts (<= 1536 tokens) for
# $STEPS optimizer steps of 16 examples, micro-batch 4, LoRA r=16 on q/k/v/o in every layer (as
# configs/qwen3_4b_qlora.yaml; the CPU default's last-10-layers would skip most of the backward), bf16 autocast:
#   trl            TRL SFTTrainer with the baseline's settings (bench/gpu_trl.py says what differs)
#   ours           rerank-dist train with the baseline's settings: NF4, gradient checkpointing (today's recipe)
#   ours_all       every option below at once
#   grouping, packing, bf16_norms, ckpt_auto, quant_auto, compile   each option alone
#   score_nf4, score_merged   rerank-dist score of the ours adapter: 4-bit + adapter, and merged 16-bit weights
#                  (their scores compared user by user in the table)
#   zero3, fsdp    smoke runs of the two sharding backends on this one GPU (2 steps)
# then, time permitting, the memory estimate against measured peaks (tests/test_memory.py -m gpu).
# Rows run in that order until $BUDGET_S seconds have passed; the ones left are marked skipped. A failing
# row is marked failed (its log's tail in NAME.log) and the next one runs.
# KIT_DEVICE=cpu rehearses the whole kit on a CPU with a tiny random Qwen3 (every row, the table), so a
# script error costs no GPU time; its figures say nothing about speed:
#   .venv/bin/pip install '.[all,bench]'   # bitsandbytes, deepspeed and trl in the venv
#   PATH=.venv/bin:$PATH KIT_DEVICE=cpu STEPS=2 BUDGET_S=1800 OUT=runs/rehearsal bash bench/gpu.sh
set -uo pipefail
OUT="${OUT:-runs/bench}"
STEPS="${STEPS:-5}"
BUDGET_S="${BUDGET_S:-480}"  # no row starts after this; a running one is cut 40 s past it
DEVICE="${KIT_DEVICE:-cuda}"
case $DEVICE in
  cuda) LAUNCH=(python3 -m rerank_dist.cli launch --nproc-per-node 1); TINY=() ;;
  cpu) LAUNCH=(python3 -m rerank_dist.cli launch --cpu --nproc-per-node 1); TINY=(--tiny) ;;
  *) echo "KIT_DEVICE=$DEVICE: expected cuda or cpu"; exit 2 ;;
esac
START=$SECONDS
mkdir -p "$OUT"
: > "$OUT/rows.txt"
if ! python3 -c "import bitsandbytes, deepspeed, trl" 2>/dev/null; then
  ls .gpu/whl/*.whl >/dev/null 2>&1 || { echo "bitsandbytes/deepspeed/trl missing: run bench/gpu_prepare.sh and carry .gpu/"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target .gpu/site .gpu/whl/*.whl
  export PYTHONPATH="$PWD/.gpu/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
[ -f .gpu/run/retriever/stage.json ] || { echo "no prepared run in .gpu/run: run bench/gpu_prepare.sh"; exit 1; }
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1 | tee "$OUT/gpu.txt"
else
  python3 -c "import torch; print('CPU rehearsal,', torch.backends.cpu.get_cpu_capability(), '(tiny random Qwen3, no speed figures)')" \
    | tee "$OUT/gpu.txt"
fi
python3 -c "import torch, transformers, accelerate, peft, trl, bitsandbytes as b, deepspeed; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__, \
'trl', trl.__version__, 'bitsandbytes', b.__version__, 'deepspeed', deepspeed.__version__)" | tee -a "$OUT/gpu.txt"
cp configs/models/qwen3-4b/config.json "$OUT/model_config.json"

MODEL="$(mktemp -d)/qwen3-4b-random"  # 8 GB of random bf16 weights, outside the checkout
python3 bench/random_model.py --arch configs/models/qwen3-4b --out "$MODEL" --device "$DEVICE" "${TINY[@]}" \
  | tee -a "$OUT/gpu.txt"
BASE=(run_dir=.gpu/run "model.name_or_path=$MODEL" model.gguf_fallback=false model.dtype=bfloat16
  model.quantization=nf4 model.lora_r=16 model.lora_alpha=32 "model.lora_target_modules=[q_proj,k_proj,v_proj,o_proj]"
  model.lora_layers=0 model.gradient_checkpointing=true prompt.history_items=20 prompt.title_max_tokens=32 prompt.max_prompt_tokens=1536
  prompt.max_train_examples=0 train.mixed_precision=bf16 train.batch_size=16 train.micro_batch_size=4 train.lr=1e-4
  train.warmup_steps=1 "train.max_steps=$STEPS" train.eval_every=1000 train.eval_users=16 train.save_every=0
  train.save_every_minutes=0 train.max_minutes=0 score.batch_size=16 score.max_users=320 score.fusion=false
  export.in_run=false)
# The scorer's batching by tokens, where this checkout has it.
SCORE_BUDGET=()
if python3 -m rerank_dist.cli config --fields | grep -q '^score.token_budget '; then SCORE_BUDGET=(score.token_budget=16384); fi
PACK_ATTN=()  # packing saves attention work with the variable-length kernel only
if python3 -c "import flash_attn" 2>/dev/null; then PACK_ATTN=(model.attn_implementation=flash_attention_2); fi

# row NAME KIND ARGS...: run one row (KIND: trl | train | score) in its own run directory.
row() {
  local name=$1 kind=$2
  shift 2
  echo "$name" >> "$OUT/rows.txt"
  echo "$*" > "$OUT/$name.args"
  if (( SECONDS - START > BUDGET_S )); then
    echo "skipped the kit's ${BUDGET_S} s budget was spent" > "$OUT/$name.status"
    return
  fi
  local dir=".gpu/rows/$name" rc=0 left=$(( BUDGET_S + 40 - (SECONDS - START) ))
  (( left > 300 )) && left=300
  rm -rf "$dir" && mkdir -p .gpu/rows && cp -r .gpu/run "$dir"  # data, retriever and (after ours) the examples store
  echo "== $name ($kind) $* [$(( SECONDS - START )) s]"
  case $kind in
    trl) timeout "$left" python3 bench/gpu_trl.py --device "$DEVICE" --out "$OUT/$name.summary.json" -- "${BASE[@]}" \
           "run_dir=$dir" "$@" \
           > "$OUT/$name.log" 2>&1 || rc=$? ;;
    train) timeout "$left" "${LAUNCH[@]}" train "${BASE[@]}" "run_dir=$dir" "$@" \
             > "$OUT/$name.log" 2>&1 || rc=$?
           [ "$rc" = 0 ] && cp "$dir/ranker/train_summary.json" "$OUT/$name.summary.json" ;;
    score) rm -rf "$dir/ranker" && cp -r .gpu/rows/ours/ranker "$dir/ranker"
           timeout "$left" "${LAUNCH[@]}" score "${BASE[@]}" "run_dir=$dir" "$@" \
             > "$OUT/$name.log" 2>&1 || rc=$?
           [ "$rc" = 0 ] && cp "$dir/metrics_test.json" "$OUT/$name.metrics.json" \
             && cp "$dir/rankings_test.parquet" "$OUT/$name.rankings.parquet" ;;
  esac
  if [ "$rc" = 0 ]; then echo "ok" > "$OUT/$name.status"
  elif [ "$rc" = 124 ]; then echo "failed cut at the kit's budget (timeout)" > "$OUT/$name.status"
  else echo "failed exit $rc" > "$OUT/$name.status"; tail -5 "$OUT/$name.log"; fi
}

"${LAUNCH[@]}" train "${BASE[@]}" --dry-run | tee "$OUT/plan.txt"
row ours train
# The examples store is built once (by ours): every later row copies it with the run.
[ -d .gpu/rows/ours/examples ] && rm -rf .gpu/run/examples && cp -r .gpu/rows/ours/examples .gpu/run/examples
row trl trl
row ours_all train train.length_grouping=64 model.upcast_fp32=false model.gradient_checkpointing=auto \
  model.quantization=auto model.compile=inductor
row grouping train train.length_grouping=64
row packing train train.packing=true "${PACK_ATTN[@]}"
row bf16_norms train model.upcast_fp32=false
row ckpt_auto train model.gradient_checkpointing=auto
row quant_auto train model.quantization=auto
row score_nf4 score "${SCORE_BUDGET[@]}"
row score_merged score score.merged_weights=true "${SCORE_BUDGET[@]}"
row compile train model.compile=inductor
row zero3 train train.backend=zero3 train.max_steps=2
if [ "$DEVICE" = cuda ]; then
  row fsdp train train.backend=fsdp train.max_steps=2
else  # accelerate runs FSDP on accelerators only
  echo fsdp >> "$OUT/rows.txt" && echo "train.backend=fsdp train.max_steps=2" > "$OUT/fsdp.args"
  echo "skipped FSDP2 needs a GPU (CPU rehearsal)" > "$OUT/fsdp.status"
fi
if [ "$DEVICE" = cuda ] && (( SECONDS - START < BUDGET_S - 60 )); then  # the estimate against measured peaks, time permitting
  timeout 100 python3 -m pytest -q -m gpu tests/test_memory.py -p no:cacheprovider > "$OUT/memory_check.log" 2>&1 \
    || echo "memory check did not pass (see memory_check.log)"
fi
echo "kit: $(( SECONDS - START )) s"
python3 bench/gpu_table.py "$OUT"
