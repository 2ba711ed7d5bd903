"""TRL's SFTTrainer on one GPU with the settings of a rerank-dist training run: the GPU kit's comparison row.

    python3 bench/gpu_trl.py --out OUT/trl.summary.json -- run_dir=... model.name_or_path=... (overrides)

Reads the run's config from the same overrides ``rerank-dist train`` gets (bench/gpu.sh passes both the
same list) and trains with them: the base model loaded by this project's loader (NF4 / dtype as the
config says), the same LoRA (``modeling.lora_config``), AdamW at train.lr, the batch plan's micro-batch
and accumulation, bf16 autocast (``bf16=True``) when train.mixed_precision=bf16, gradient checkpointing
as model.gradient_checkpointing says (non-reentrant, as ours), the run's training prompts in the
order the rows are stored (``train_sampling_strategy="sequential"``).

What differs, by TRL's design: a prompt-completion dataset (completion = the answer letter, to which
TRL appends EOS) with completion-only loss, so the loss is full-vocabulary cross-entropy on two
tokens, and the model computes (B, L, V) logits at every position (ours: the K label logits at the
answer position only); TRL's default per-step metrics (token accuracy, entropy) are left on; TRL
pads each micro-batch to its longest row on the right (ours: on the left).

Writes a summary in train_summary.json's fields (tokens_per_s over real tokens, the first step left
out; peak_memory_gib; gradient_checkpointing; quantization) for bench/gpu_table.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="summary JSON to write")
    parser.add_argument("--device", default="cuda", help="cuda (the kit) | cpu (a smoke run of this script)")
    parser.add_argument("overrides", nargs="*", help="section.field=value, as given to rerank-dist train")
    args = parser.parse_args()

    import pandas as pd
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from rerank_dist.config import checkpointing_on, labels_for
    from rerank_dist.data.prepare import load_dataset
    from rerank_dist.examples import build_examples
    from rerank_dist.modeling import load_base_model, load_tokenizer, lora_config, num_decoder_layers
    from rerank_dist.paths import RunPaths
    from rerank_dist.plan import plan_for
    from rerank_dist.settings import load_config

    cfg = load_config(None, overrides=args.overrides, world_size=1)
    tc, plan = cfg.train, plan_for(cfg, 1)
    paths = RunPaths(Path(cfg.run_dir))
    tokenizer = load_tokenizer(cfg.model)
    labels = labels_for(cfg)
    rows_needed = (tc.max_steps + 1) * tc.batch_size
    dataset = load_dataset(paths.data)
    candidates = pd.read_parquet(paths.candidates("train")).head(rows_needed)
    examples, _ = build_examples(candidates, dataset, cfg.prompt, labels, tokenizer, "train", dataset.num_items)
    rows = [{"prompt": e.prompt, "completion": labels[e.label_index]} for e in examples[:rows_needed]]
    checkpointing = checkpointing_on(cfg.model)
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    class Timer(TrainerCallback):
        """Seconds and real tokens of each optimizer step (the rows are read in order, batch_size a step)."""

        def __init__(self) -> None:
            self.steps: list[tuple[float, int]] = []
            self.mark = 0.0

        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            step = len(self.steps)
            lengths = trainer.train_dataset[step * tc.batch_size:(step + 1) * tc.batch_size]["input_ids"]
            self.steps.append((time.perf_counter() - self.mark, sum(map(len, lengths))))

    with tempfile.TemporaryDirectory() as workdir:
        sft = SFTConfig(
            output_dir=workdir, report_to="none", save_strategy="no", eval_strategy="no", use_cpu=not cuda,
            bf16=tc.mixed_precision == "bf16", fp16=False,
            gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False},
            per_device_train_batch_size=plan.micro_batch_size, gradient_accumulation_steps=plan.accumulation,
            learning_rate=tc.lr, weight_decay=tc.weight_decay, max_grad_norm=tc.max_grad_norm or 0.0,
            optim="adamw_torch", lr_scheduler_type="linear", warmup_steps=tc.warmup_steps, max_steps=tc.max_steps,
            seed=tc.seed, packing=False, completion_only_loss=True, max_length=None,
            train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True, logging_steps=1,
        )
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        model = load_base_model(cfg.model, device=device)
        timer = Timer()
        trainer = SFTTrainer(model=model, args=sft, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             peft_config=lora_config(cfg.model, num_decoder_layers(model)), callbacks=[timer])
        trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    timed = timer.steps[1:] or timer.steps
    summary = {"steps": len(timer.steps), "tokens_per_s": round(sum(t for _, t in timed) / sum(s for s, _ in timed), 1),
               "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 1024**3, 2) if cuda else None,
               "gradient_checkpointing": checkpointing, "quantization": cfg.model.quantization,
               "world_size": 1, "backend": "trl SFTTrainer",
               "loss_first_steps": sum(losses[:2]) / max(len(losses[:2]), 1) if losses else None,
               "loss_last_steps": sum(losses[-2:]) / max(len(losses[-2:]), 1) if losses else None,
               "loss": "full-vocabulary cross-entropy on the letter and EOS (not comparable to ours)",
               "step_seconds": [round(s, 3) for s, _ in timer.steps], "step_tokens": [t for _, t in timer.steps]}
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
