"""Training throughput: this project's training step against TRL's SFTTrainer, same everything else.

    .venv/bin/python bench/train_throughput.py --steps 3 --threads 1 --profile  # ~6 minutes on a busy 2-core CPU
    .venv/bin/python bench/train_throughput.py --steps 2 --threads 1 --trl-gradient-checkpointing  # TRL's default

Both sides train SmolLM2-135M-Instruct in the config's ``model.dtype`` (auto: bfloat16 on a CPU
with AVX512-BF16; ``--dtype`` overrides) with the config's LoRA (r 8, alpha 32, q_proj/v_proj,
dropout 0.05; PEFT keeps the adapter in float32 on both sides), AdamW at ``train.lr``, gradient
clipping at ``train.max_grad_norm``, ``train.batch_size`` examples per optimizer step cut as the
batch plan cuts them (micro-batch 1 x 8 accumulation by default), no mixed precision
(``train.mixed_precision``), no gradient checkpointing (``model.gradient_checkpointing``), on the
same real prompts of the run's train split in the same order:

* **ours**: the loop body of ``rerank_dist.train.train``: the project's Accelerator
  (``build_accelerator`` with the batch plan), ``load_model(training=True)``, the project's
  DataLoader / collate, ``label_logits`` + ``F.cross_entropy`` over the K label logits at the
  answer position, ``accelerator.accumulate`` / ``backward`` / ``clip_grad_norm_``, the scheduler;
  no validation or saving.
* **TRL**: ``SFTTrainer`` with a prompt-completion dataset (prompt = the same prompt text,
  completion = the answer letter; TRL appends EOS), completion-only loss, no packing, CPU,
  ``report_to="none"``, no evaluation, no saving, its own LoRA wrapping of the same base model;
  TRL's defaults that would make the comparison unequal are set to this project's values
  (``gradient_checkpointing=False``, ``bf16=False``: the model is already in the config's dtype)
  and examples are read in the order ours reads them (``train_sampling_strategy="sequential"``).

The two run interleaved in one process: a TRL optimizer step, then (inside TRL's ``on_step_end``
callback) one of ours, and so on, so load from other processes falls on both alike. The first
``--warmup`` steps of each side are not timed. accelerate keeps one gradient-accumulation state per
process, which the Trainer sets to 1 (it accumulates by hand); each of our steps runs under our own
Accelerator's settings and puts TRL's back afterwards. A check of the reproduction: run with the
config a run directory was trained with, our first two losses equal those in its
ranker/train_log.jsonl (same seed and data order; LoRA B starts at zero and the first update has
lr 0, so they do not yet depend on the dropout stream, which TRL's interleaved steps also draw from).

Results: bench/results/train_throughput.json and a row appended to
bench/results/train_throughput.md (with ``--profile`` also the top operators of one step per side
in bench/results/train_profile.md; ``--tag T`` names the JSON / profile ``..._T``).

TRL is an optional dependency: ``pip install -e .[bench]``.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


def _require_trl() -> Any:
    try:
        import trl
        from trl import SFTConfig, SFTTrainer  # noqa: F401
    except ImportError as err:
        sys.exit(f"error: TRL is needed for this bench ({err}); install it with: pip install -e .[bench]")
    return trl


def environment(threads: int) -> dict[str, Any]:
    """What the numbers depend on: CPU capability, threads, load from other processes, versions."""
    import accelerate
    import peft
    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "peft": peft.__version__}


def load_run(config: str, run_dir: str, dtype: str | None, split: str = "train"):
    """(cfg, tokenizer, examples, token lists) of ``split`` as the project builds them from a run directory."""
    import pandas as pd

    from rerank_dist.config import checkpointing_on, labels_for
    from rerank_dist.settings import load_config
    from rerank_dist.data.prepare import load_dataset
    from rerank_dist.examples import build_examples, tokenize_examples
    from rerank_dist.modeling import load_tokenizer
    from rerank_dist.paths import RunPaths

    overrides = [f"run_dir={run_dir}"] + ([f"model.dtype={dtype}"] if dtype else [])
    cfg = load_config(config, overrides=overrides)
    paths = RunPaths(Path(cfg.run_dir))
    tokenizer = load_tokenizer(cfg.model)
    dataset = load_dataset(paths.data)
    examples, _ = build_examples(pd.read_parquet(paths.candidates(split)), dataset, cfg.prompt, labels_for(cfg),
                                 tokenizer, split, dataset.num_items)
    return cfg, tokenizer, examples, tokenize_examples(examples, tokenizer)


# ---------------------------------------------------------------- ours: train.py's loop body, step by step

# Lines of rerank_dist/train.py this bench reproduces; a change there shows up as a warning.
_TRAIN_LINES = (
    'logits = _label_logits(model, batch, label_ids)',
    'loss = F.cross_entropy(logits.float(), batch["labels"])',
    "accelerator.backward(loss)",
    "grad_norm = accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm or math.inf)",
    "optimizer = torch.optim.AdamW(trainable, lr=tc.lr, weight_decay=tc.weight_decay)",
)


class OurLoop:
    """rerank_dist.train.train's setup and loop body, stepping one optimizer step per call."""

    def __init__(self, cfg, plan, rows: list[tuple[list[int], int]], pad_id: int, label_ids: list[int],
                 total_steps: int) -> None:
        import torch
        from accelerate.utils import set_seed
        from torch.utils.data import DataLoader
        from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

        from rerank_dist import train as train_module
        from rerank_dist.distributed import build_accelerator
        from rerank_dist.modeling import load_model

        source = inspect.getsource(train_module)
        self.drift = [line for line in _TRAIN_LINES if line not in source]
        if self.drift:
            print(f"warning: rerank_dist/train.py no longer contains {self.drift}; this bench may not match it")
        tc = cfg.train
        self.cfg, self.plan, self.tc = cfg, plan, tc
        self.accelerator = accelerator = build_accelerator(cfg, plan)
        # accelerate's GradientState is one per process: TRL's Trainer, built later, sets its accumulation
        # to 1 (it accumulates by hand). Each of our steps runs under our own settings (see step()).
        self.plugin_kwargs = dict(accelerator.gradient_state.plugin_kwargs)
        set_seed(tc.seed)
        model = load_model(cfg.model, training=True, device=accelerator.device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.trainable_params = sum(p.numel() for p in trainable)
        self.adapter_dtypes = sorted({str(p.dtype) for p in trainable})
        optimizer = torch.optim.AdamW(trainable, lr=tc.lr, weight_decay=tc.weight_decay)
        loader = DataLoader(rows, batch_size=plan.micro_batch_size, shuffle=True,
                            collate_fn=train_module._collate(pad_id, packing=False),
                            generator=torch.Generator().manual_seed(tc.seed))
        self.model, self.optimizer, self.loader = accelerator.prepare(model, optimizer, loader)
        warmup = train_module._warmup(tc.warmup_steps, total_steps, lambda s: None)
        self.scheduler = (get_linear_schedule_with_warmup(self.optimizer, warmup, total_steps)
                          if tc.lr_schedule == "linear" else get_constant_schedule_with_warmup(self.optimizer, warmup))
        self.label_ids = torch.tensor(label_ids, dtype=torch.long, device=accelerator.device)
        # The order the loop will read the rows in (epoch 0), so TRL can be fed the same order.
        index = {tuple(tokens): i for i, (tokens, _) in enumerate(rows)}
        self.loader.set_epoch(0)
        self.order = [index[tuple(ids[mask.bool()].tolist())] for batch in self.loader
                      for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        self.loader.set_epoch(0)  # iterating advanced accelerate's epoch counter; back to epoch 0
        self.rows = rows
        self.batches = iter(self.loader)
        self.seen = 0
        self.window = torch.zeros(3, device=accelerator.device)
        self.records: list[dict] = []
        self.model.train()

    def step(self) -> dict:
        """One optimizer step (plan.accumulation micro-batches), exactly as train.py's loop runs it."""
        state = self.accelerator.gradient_state
        theirs, state.plugin_kwargs = state.plugin_kwargs, dict(self.plugin_kwargs)
        try:
            if self.accelerator.gradient_accumulation_steps != self.plan.accumulation:
                raise RuntimeError("our accumulation differs from the batch plan's")
            return self._step()
        finally:
            state.plugin_kwargs = theirs

    def _step(self) -> dict:
        import torch.nn.functional as F

        from rerank_dist.label_scoring import label_logits

        accelerator, model, optimizer, tc = self.accelerator, self.model, self.optimizer, self.tc
        label_ids = self.label_ids
        started = time.perf_counter()
        grad_norm = None
        for _ in range(self.plan.accumulation):
            batch = next(self.batches)
            expected = self.order[self.seen:self.seen + len(batch["labels"])]
            got = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
            if got != [tuple(self.rows[i][0]) for i in expected]:
                raise RuntimeError("our loader's order changed between the peek and the run")
            self.seen += len(batch["labels"])
            with accelerator.accumulate(model):
                logits = label_logits(model, batch["input_ids"], batch["attention_mask"], label_ids)  # (B, K)
                loss = F.cross_entropy(logits.float(), batch["labels"])
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm or math.inf)
                optimizer.step()
                optimizer.zero_grad()
            n = len(batch["labels"])
            self.window[0] += loss.detach().float() * n
            self.window[1] += n
            self.window[2] += batch["attention_mask"].sum()
        if not accelerator.sync_gradients:
            raise RuntimeError("the accumulation window did not end on a synchronising step")
        self.scheduler.step()
        loss_sum, examples, tokens = accelerator.reduce(self.window, "sum").tolist()
        self.window.zero_()
        record = {"seconds": time.perf_counter() - started, "examples": int(examples), "tokens": int(tokens),
                  "loss": loss_sum / examples, "grad_norm": float(grad_norm) if grad_norm is not None else None}
        self.records.append(record)
        return record


# ---------------------------------------------------------------- TRL


def build_trl(cfg, plan, tokenizer, examples, order: list[int], max_steps: int, labels: list[str], callback,
              workdir: str, trl_checkpointing: bool = False):
    """SFTTrainer on the same base model, prompts (in ``order``), batch plan, LoRA and optimizer."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from rerank_dist.config import checkpointing_on
    from rerank_dist.modeling import load_base_model, lora_config, num_decoder_layers

    tc = cfg.train
    rows = [{"prompt": examples[i].prompt, "completion": labels[examples[i].label_index]} for i in order]
    args = SFTConfig(
        output_dir=workdir, report_to="none", save_strategy="no", eval_strategy="no",
        use_cpu=True, bf16=False, fp16=False,  # the model is loaded in model.dtype; train.mixed_precision=no
        # TRL's default is True; the config's (ours) unless --trl-gradient-checkpointing
        gradient_checkpointing=checkpointing_on(cfg.model) or trl_checkpointing,
        per_device_train_batch_size=plan.micro_batch_size, gradient_accumulation_steps=plan.accumulation,
        learning_rate=tc.lr, weight_decay=tc.weight_decay, max_grad_norm=tc.max_grad_norm or 0.0,
        optim="adamw_torch", lr_scheduler_type="linear" if tc.lr_schedule == "linear" else "constant_with_warmup",
        warmup_steps=tc.warmup_steps, max_steps=max_steps, seed=tc.seed,
        packing=False, completion_only_loss=True, max_length=None,
        train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True,
    )
    model = load_base_model(cfg.model)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora_config(cfg.model, num_decoder_layers(model)), callbacks=[callback])
    return trainer


class Interleave:
    """TrainerCallback: times TRL's steps and runs one of ours after each, outside TRL's timing."""

    def __init__(self, ours: OurLoop, total: int, warmup: int, profile: bool, say) -> None:
        self.ours, self.total, self.warmup, self.profile, self.say = ours, total, warmup, profile, say
        self.trl_records: list[dict] = []
        self.mark = 0.0
        self.tokens = 0
        self.profiles: dict[str, Any] = {}
        self._prof = None

    def callback(self):
        from transformers import TrainerCallback

        outer = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                outer.mark = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                outer.on_step_end(state.global_step)

        return _Callback()

    def count_tokens(self, trainer) -> None:
        """Wrap the trainer's training_step to count the tokens it is given (attention mask sum)."""
        original = trainer.training_step

        def training_step(model, inputs, *a, **kw):
            self.tokens += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else 0
            return original(model, inputs, *a, **kw)

        trainer.training_step = training_step

    def on_step_end(self, step: int) -> None:
        import torch

        now = time.perf_counter()
        profiled = self._prof is not None
        if profiled:
            self._prof.stop()
            self.profiles["trl"] = self._prof
            self._prof = None
        else:
            self.trl_records.append({"seconds": now - self.mark, "tokens": self.tokens})
        self.tokens = 0
        timed = "warmup" if step <= self.warmup else ("profiled" if profiled else "timed")
        trl_s = now - self.mark
        if profiled:
            with torch.profiler.profile(record_shapes=True) as prof:
                ours = self.ours.step()
            self.profiles["ours"] = prof
            self.ours.records.pop()  # a profiled step is not a timed one
        else:
            ours = self.ours.step()
        self.say(f"step {step}/{self.total} ({timed}): TRL {trl_s:6.1f} s, ours {ours['seconds']:6.1f} s "
                 f"(ours loss {ours['loss']:.3f}); load {os.getloadavg()[0]:.2f}")
        if self.profile and step == self.total - 1:
            self._prof = torch.profiler.profile(record_shapes=True)
            self._prof.start()
        self.mark = time.perf_counter()


# ---------------------------------------------------------------- reporting


def _profile_table(prof, rows: int = 20) -> str:
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)


def _profile_summary(prof) -> dict[str, float]:
    """Seconds of one step by kind of work: matmuls, attention, TRL's fused LM head, the rest."""
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    by = {"total_s": total}
    by["matmul_s"] = sum(e.self_cpu_time_total for e in events
                         if e.key in ("aten::mm", "aten::bmm", "aten::addmm", "aten::linear")) / 1e6
    by["attention_s"] = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key) / 1e6
    # TRL's chunked log-prob function (forward) and its backward node: inclusive times (not the autograd
    # engine's "evaluate_function: ..." wrapper, which would count the backward twice)
    by["trl_fused_head_s"] = sum(e.cpu_time_total for e in events
                                 if e.key in ("ChunkedLogProbFunction", "ChunkedLogProbFunctionBackward")) / 1e6
    by["rest_s"] = total - by["trl_fused_head_s"]
    # matmuls with a vocabulary-sized operand (TRL projects the vocabulary in chunks of 32768 columns;
    # no other dimension of these models reaches 16384)
    head = [e for e in prof.events() if e.name in ("aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_")
            and any(isinstance(s, list) and any(d >= 16384 for d in s) for s in (e.input_shapes or []))]
    by["vocab_matmul_s"] = sum(e.cpu_time_total for e in head) / 1e6
    by["vocab_matmul_calls"] = len(head)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in by.items()}


def summarize(name: str, records: list[dict], warmup: int, batch: int) -> dict:
    timed = records[warmup:]
    seconds = sum(r["seconds"] for r in timed)
    tokens = sum(r["tokens"] for r in timed)
    return {"side": name, "timed_steps": len(timed), "seconds": round(seconds, 2),
            "step_seconds": [round(r["seconds"], 2) for r in records],
            "median_step_s": round(statistics.median(r["seconds"] for r in timed), 2) if timed else None,
            "examples_per_s": round(len(timed) * batch / seconds, 4) if seconds else None,
            "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
            "tokens_per_example": round(tokens / max(len(timed) * batch, 1), 1)}


def _append_md(path: Path, header: list[str], row: list[Any], intro: str) -> None:
    from rerank_dist.io import atomic_write_text

    line = "| " + " | ".join(map(str, row)) + " |\n"
    text = path.read_text() if path.is_file() else (
        intro + "\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
    atomic_write_text(path, text + line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/smollm2_cpu.yaml", help="run config (model, LoRA, batch, lr)")
    parser.add_argument("--run-dir", default="runs/default",
                        help="prepared run directory: data/ and retriever/candidates_train.parquet are read")
    parser.add_argument("--dtype", default=None, help="override model.dtype (default: the config's, auto resolved)")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps per side first")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default). On cores other processes also use, 1 avoids "
                             "OpenMP threads waiting on each other")
    parser.add_argument("--profile", action="store_true", help="profile one more step per side (train_profile.md)")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="leave TRL's own default (gradient checkpointing on) instead of matching the config: "
                             "the out-of-the-box recipe, not a like-for-like comparison")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--tag", default="",
                        help="JSON / profile go to train_throughput_TAG.json, train_profile_TAG.md "
                             "(the markdown row is appended to train_throughput.md either way)")
    args = parser.parse_args()

    trl = _require_trl()
    env = environment(args.threads)
    env["trl"] = trl.__version__
    print(f"cpu {env['cpu_capability']}, {env['torch_threads']} torch threads, load {env['loadavg_start']}", flush=True)

    from rerank_dist.config import checkpointing_on, labels_for
    from rerank_dist.hardware import resolve_dtype
    from rerank_dist.plan import plan_for
    from rerank_dist.verbalizer import verify_label_ids

    cfg, tokenizer, examples, token_lists = load_run(args.config, args.run_dir, args.dtype)
    plan = plan_for(cfg, world_size=1)
    labels = labels_for(cfg)
    label_ids = verify_label_ids(tokenizer, [examples[0].prompt, examples[-1].prompt], labels)
    rows = [(tokens, ex.label_index) for tokens, ex in zip(token_lists, examples)]
    if any(label < 0 for _, label in rows):
        raise SystemExit("training examples without a target: not a train split")
    dtype = resolve_dtype(cfg.model.dtype)
    total = args.warmup + args.steps + (1 if args.profile else 0)
    if total * plan.batch_size > len(rows):
        raise SystemExit(f"{total} steps x {plan.batch_size} examples > {len(rows)} training examples")
    print(f"{len(rows)} train prompts, mean {statistics.mean(map(len, token_lists)):.0f} tokens; {plan.describe()}; "
          f"dtype {dtype[0]} ({dtype[1]})", flush=True)

    ours = OurLoop(cfg, plan, rows, tokenizer.pad_token_id, label_ids, total)
    inter = Interleave(ours, total, args.warmup, args.profile, lambda s: print(s, flush=True))
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as workdir:
        trainer = build_trl(cfg, plan, tokenizer, examples, ours.order, total, labels, inter.callback(), workdir,
                            args.trl_gradient_checkpointing)
        # Same prompt tokens? TRL tokenizes prompt + completion itself; ours are the project's ids.
        same = sum(trainer.train_dataset[j]["input_ids"][:len(token_lists[i])] == token_lists[i]
                   for j, i in enumerate(ours.order[:total * plan.batch_size]))
        completion = [sum(t != -100 for t in trainer.train_dataset[j]["labels"])
                      for j in range(total * plan.batch_size)]
        trl_adapter = sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad})
        trl_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        if trainer.args.gradient_accumulation_steps != plan.accumulation:
            raise SystemExit("TRL's accumulation differs from the batch plan's")
        inter.count_tokens(trainer)
        print(f"TRL dataset: {same}/{total * plan.batch_size} prompts tokenized as ours; completion tokens "
              f"{min(completion)}-{max(completion)} (letter + EOS); starting {total} interleaved steps", flush=True)
        trainer.train()

    batch = plan.batch_size
    result = {
        "bench": "train_throughput", "when": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
        "environment": {**env, "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "setup": {"model": cfg.model.name_or_path, "dtype": dtype[0], "dtype_reason": dtype[1],
                  "batch_plan": plan.describe(), "lora": {"r": cfg.model.lora_r, "alpha": cfg.model.lora_alpha,
                                                          "dropout": cfg.model.lora_dropout,
                                                          "targets": list(cfg.model.lora_target_modules)},
                  "lr": cfg.train.lr, "optimizer": "AdamW", "max_grad_norm": cfg.train.max_grad_norm,
                  "mixed_precision": cfg.train.mixed_precision,
                  "gradient_checkpointing": {
                      "ours": checkpointing_on(cfg.model),
                      "trl": checkpointing_on(cfg.model) or args.trl_gradient_checkpointing},
                  "trainable_params": {"ours": ours.trainable_params, "trl": trl_trainable},
                  "adapter_dtypes": {"ours": ours.adapter_dtypes, "trl": trl_adapter},
                  "prompts_tokenized_alike": f"{same}/{total * batch}",
                  "trl_completion_tokens": [min(completion), max(completion)],
                  "warmup_steps_untimed": args.warmup, "train_py_drift": ours.drift},
        "ours": summarize("ours", ours.records, args.warmup, batch),
        "trl": summarize("trl", inter.trl_records, args.warmup, batch),
    }
    o, t = result["ours"], result["trl"]
    result["ratio_examples_per_s"] = round(o["examples_per_s"] / t["examples_per_s"], 3)
    paired = [tr["seconds"] / orr["seconds"] for orr, tr in zip(ours.records[args.warmup:],
                                                                 inter.trl_records[args.warmup:])]
    result["ratio_per_round"] = [round(x, 3) for x in paired]
    result["ratio_median_of_rounds"] = round(statistics.median(paired), 3) if paired else None
    result["target"] = ">= 2.5x examples/s"
    out = Path(args.out_dir)
    suffix = f"_{args.tag}" if args.tag else ""
    if args.profile and "ours" in inter.profiles and "trl" in inter.profiles:
        from rerank_dist.io import atomic_write_text

        result["profile"] = {side: _profile_summary(inter.profiles[side]) for side in ("ours", "trl")}
        text = ["# One optimizer step profiled (torch.profiler, CPU)\n",
                f"{env['cpu_capability']}, {env['torch_threads']} threads, {dtype[0]}; {plan.describe()}\n"]
        for side in ("ours", "trl"):
            text.append(f"\n## {side}: {result['profile'][side]}\n\n```\n{_profile_table(inter.profiles[side])}\n```\n")
        atomic_write_text(out / f"train_profile{suffix}.md", "".join(text))

    from rerank_dist.io import write_json

    write_json(out / f"train_throughput{suffix}.json", result)
    header = ["when", "cpu", "threads", "load (1 min, start/end)", "dtype", "batch plan", "TRL grad. ckpt",
              "timed steps",
              "ours ex/s", "TRL ex/s", "ratio", "ours tok/s", "TRL tok/s"]
    row = [result["when"], env["cpu_capability"], env["torch_threads"],
           f"{env['loadavg_start'][0]} / {result['environment']['loadavg_end'][0]}", dtype[0],
           plan.describe().split(" = ")[-1] + f"; LoRA in {'the last ' + str(cfg.model.lora_layers) if cfg.model.lora_layers else 'all'} "
           f"layers, {cfg.prompt.history_items} history titles", "on" if result["setup"]["gradient_checkpointing"]["trl"] else "off",
           args.steps, o["examples_per_s"], t["examples_per_s"],
           f"{result['ratio_examples_per_s']}x", o["tokens_per_s"], t["tokens_per_s"]]
    _append_md(out / "train_throughput.md", header, row,
               "# Training throughput: rerank_dist's step vs TRL SFTTrainer\n\n"
               "bench/train_throughput.py; SmolLM2-135M-Instruct, same prompts / batch / LoRA / optimizer; "
               "interleaved steps, first step of each side untimed. The target is >= 2.5x.")
    print(f"ours {o['examples_per_s']} ex/s ({o['tokens_per_s']} tok/s), TRL {t['examples_per_s']} ex/s "
          f"({t['tokens_per_s']} tok/s): {result['ratio_examples_per_s']}x (median of rounds "
          f"{result['ratio_median_of_rounds']}x); results in {out}/train_throughput{suffix}.json", flush=True)


if __name__ == "__main__":
    main()
