"""The ranker's training loop: setup, loop, log, evaluate, save; read it top to bottom.

Loss: cross-entropy over the K label tokens' logits at the answer position (a softmax restricted to
the labels, not to the whole vocabulary). The ranker is only ever asked to order those K tokens, so
that is the quantity to train; it starts at ln(K) (3.00 for 20 labels) for a model with no
preference, which makes "is the loss falling?" easy to read. Only the answer position's logits are
computed, never full-vocabulary logits for every token.

The same file runs on one CPU process, under ``accelerate launch --num_processes N`` and on a cluster:
every distributed concern (gradient accumulation, sharded evaluation, who writes files) is here or
in ``score.py``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from rerank_dist.checkpoint import latest_step_dir, load_step, save_best, save_step
from rerank_dist.config import ConfigError, RunConfig, labels_for
from rerank_dist.io import append_jsonl, write_json
from rerank_dist.paths import RunPaths
from rerank_dist.label_scoring import label_logits, left_pad
from rerank_dist.score import evaluate_scores, score_prompts


def _collate(pad_id: int):
    def collate(rows: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = left_pad([tokens for tokens, _ in rows], pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "labels": torch.tensor([label for _, label in rows], dtype=torch.long)}  # (B,)
    return collate


def _validate(accelerator, model, examples, token_lists, label_ids, pad_id, batch_size, seed) -> dict:
    """Validation metrics on the in-memory model (selection only; test scoring reloads from disk)."""
    scores = score_prompts(accelerator, accelerator.unwrap_model(model), token_lists, label_ids, pad_id, batch_size)
    return evaluate_scores(examples, scores, seed)


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint we restart from."""
    if not path.is_file():
        return
    import json

    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def train(cfg: RunConfig) -> dict:
    from rerank_dist.data.prepare import load_dataset
    from rerank_dist.examples import build_examples, tokenize_examples
    from rerank_dist.modeling import load_model, load_tokenizer
    from rerank_dist.verbalizer import describe_label_ids, verify_label_ids

    # ------------------------------------------------------------------ setup
    paths = RunPaths(Path(cfg.run_dir))
    tc = cfg.train
    from accelerate import PartialState

    world = PartialState().num_processes
    if tc.batch_size % (tc.micro_batch_size * world):
        raise ConfigError(f"train.batch_size: {tc.batch_size} must be a multiple of micro_batch_size x processes "
                          f"({tc.micro_batch_size} x {world})")
    grad_accum = tc.batch_size // (tc.micro_batch_size * world)
    accelerator = Accelerator(gradient_accumulation_steps=grad_accum,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    set_seed(tc.seed)
    say = accelerator.print

    tokenizer = load_tokenizer(cfg.model)
    dataset = load_dataset(paths.data)
    labels = labels_for(cfg)
    train_examples, train_stats = build_examples(pd.read_parquet(paths.candidates("train")), dataset, cfg.prompt,
                                                 labels, tokenizer, "train", dataset.num_items)
    val_candidates = pd.read_parquet(paths.candidates("val"))
    if tc.eval_users:
        val_candidates = val_candidates.head(tc.eval_users)
    val_examples, _ = build_examples(val_candidates, dataset, cfg.prompt, labels, tokenizer, "val", dataset.num_items)

    # The label ids are resolved in context from real prompts and must agree across them: the id the
    # loss trains is then the id the scorer reads.
    probes = [train_examples[0].prompt, train_examples[-1].prompt, val_examples[0].prompt, val_examples[-1].prompt]
    label_ids_list = verify_label_ids(tokenizer, probes, labels)
    say(f"label tokens in context: {describe_label_ids(tokenizer, labels, label_ids_list)}")
    label_ids = torch.tensor(label_ids_list, dtype=torch.long, device=accelerator.device)  # (K,)
    verbalizer = {"labels": labels, "label_ids": label_ids_list,
                  "label_tokens": tokenizer.convert_ids_to_tokens(label_ids_list)}
    train_tokens = tokenize_examples(train_examples, tokenizer)
    val_tokens = tokenize_examples(val_examples, tokenizer)
    pad_id = tokenizer.pad_token_id

    model = load_model(cfg.model, training=True, device=accelerator.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=tc.lr, weight_decay=tc.weight_decay)
    rows = [(tokens, ex.label_index) for tokens, ex in zip(train_tokens, train_examples)]
    loader = DataLoader(rows, batch_size=tc.micro_batch_size, shuffle=True, collate_fn=_collate(pad_id))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    steps_per_epoch = math.ceil(len(loader) / grad_accum)  # len(loader) is per process after prepare
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)
    warmup = tc.warmup_steps
    if warmup >= total_steps:
        warmup = max(1, total_steps // 10)
        say(f"train.warmup_steps={tc.warmup_steps} >= {total_steps} total steps; warming up for {warmup} instead")
    # Stepped by hand once per optimizer step (not prepared), so its count is the optimizer's.
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)

    step, epoch, batches_done, best_ndcg, best_step = 0, 0, 0, -1.0, 0
    resume_from = latest_step_dir(paths.ranker) if tc.resume else None
    if resume_from is not None:
        state = load_step(resume_from, accelerator.unwrap_model(model), optimizer, scheduler)
        step, epoch, batches_done = state["step"], state["epoch"], state["batches_done_in_epoch"]
        best_ndcg, best_step = state["best_ndcg@10"], state["best_step"]
        say(f"resuming from {resume_from} at step {step}")
        if accelerator.is_main_process:
            _truncate_log(paths.train_log, step)
    paths.ranker.mkdir(parents=True, exist_ok=True)

    n_params = sum(p.numel() for p in trainable)
    say(f"training: {len(train_examples)} examples, {total_steps} optimizer steps of {tc.batch_size} examples "
        f"({world} process(es) x micro-batch {tc.micro_batch_size} x {grad_accum} accumulation), "
        f"{n_params:,} trainable parameters; chance loss ln({len(labels)}) = {math.log(len(labels)):.3f}")
    say(f"training negatives: {cfg.prompt.negatives}; target inserted into "
        f"{train_stats.get('target_insertion_rate') or 0:.1%} of retriever candidate lists; "
        f"label balance max/min = {train_stats.get('label_balance_ratio')}")

    # ------------------------------------------------------------------ loop
    started = time.time()
    window_loss = torch.zeros((), device=accelerator.device)
    window_count = torch.zeros((), device=accelerator.device)
    window_tokens = 0
    losses: list[float] = []
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    done = step >= total_steps
    while not done and epoch < tc.epochs:
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, batches_done) if batches_done else loader
        for batch in batches:
            with accelerator.accumulate(model):
                logits = label_logits(model, batch["input_ids"], batch["attention_mask"], label_ids)  # (B, K)
                loss = F.cross_entropy(logits.float(), batch["labels"])
                accelerator.backward(loss)
                if accelerator.sync_gradients and tc.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            batches_done += 1
            window_loss += loss.detach() * len(batch["labels"])
            window_count += len(batch["labels"])
            window_tokens += int(batch["attention_mask"].sum())
            if not accelerator.sync_gradients:
                continue

            # -------------------------------------------------------------- log
            scheduler.step()
            step += 1
            step_loss = (accelerator.reduce(window_loss, "sum") / accelerator.reduce(window_count, "sum")).item()
            window_loss.zero_()
            window_count.zero_()
            losses.append(step_loss)
            elapsed = time.time() - started
            record = {"step": step, "epoch": epoch, "loss": round(step_loss, 5), "lr": scheduler.get_last_lr()[0],
                      "elapsed_s": round(elapsed, 1), "tokens": window_tokens * world}
            window_tokens = 0
            if accelerator.is_main_process:
                append_jsonl(paths.train_log, record)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}")
                tqdm.write(f"step {step:>5}/{total_steps}  loss {step_loss:.4f}  lr {record['lr']:.2e}  "
                           f"{elapsed / 60:.1f} min")

            # -------------------------------------------------------------- evaluate
            out_of_time = torch.tensor(float(bool(tc.max_minutes) and elapsed > tc.max_minutes * 60),
                                       device=accelerator.device)
            out_of_time = accelerator.reduce(out_of_time, "max").item() > 0  # every process stops together
            last = step >= total_steps or out_of_time
            if step % tc.eval_every == 0 or last:
                report = _validate(accelerator, model, val_examples, val_tokens, label_ids, pad_id,
                                   cfg.score.batch_size, cfg.prompt.seed)
                ndcg = report["reranker"]["all_users"]["ndcg@10"]
                base = report["retriever_order"]["all_users"]["ndcg@10"]
                improved = ndcg > best_ndcg
                if improved:
                    best_ndcg, best_step = ndcg, step
                    if accelerator.is_main_process:
                        save_best(accelerator.unwrap_model(model), paths.best, cfg, {**verbalizer, "step": step})
                if accelerator.is_main_process:
                    append_jsonl(paths.train_log, {"step": step, "event": "eval", "val_ndcg@10": ndcg,
                                                   "val_retriever_ndcg@10": base, "best": improved,
                                                   "val_users": len(val_examples)})
                    tqdm.write(f"step {step:>5}  val NDCG@10 {ndcg:.4f} (retriever order {base:.4f})"
                               f"{'  -> best, saved' if improved else ''}")

            # -------------------------------------------------------------- save
            if (tc.save_every and step % tc.save_every == 0) or last:
                state = {"step": step, "epoch": epoch, "batches_done_in_epoch": batches_done,
                         "best_ndcg@10": best_ndcg, "best_step": best_step, "total_steps": total_steps}
                if accelerator.is_main_process:
                    save_step(accelerator.unwrap_model(model), optimizer, scheduler, paths.step_dir(step), cfg,
                              verbalizer, state)
            accelerator.wait_for_everyone()
            if last:
                if out_of_time and step < total_steps:
                    say(f"stopping at step {step}: train.max_minutes={tc.max_minutes} reached")
                done = True
                break
        else:
            epoch, batches_done = epoch + 1, 0
    bar.close()

    head = float(np.mean(losses[:5])) if losses else float("nan")
    tail = float(np.mean(losses[-5:])) if losses else float("nan")
    summary = {"steps": step, "total_steps": total_steps, "examples": len(train_examples),
               "loss_first_steps": head, "loss_last_steps": tail, "chance_loss": math.log(len(labels)),
               "best_val_ndcg@10": best_ndcg, "best_step": best_step, "val_users": len(val_examples),
               "minutes": round((time.time() - started) / 60, 2), "resumed_from": str(resume_from or ""),
               "train_prompt_stats": train_stats, "verbalizer": verbalizer}
    if accelerator.is_main_process:
        write_json(paths.ranker / "train_summary.json", summary)
    accelerator.wait_for_everyone()
    return summary
