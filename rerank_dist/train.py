"""The ranker's training loop: setup, loop, log, evaluate, save; read ``train()`` top to bottom.

Loss: cross-entropy over the K label tokens' logits at the answer position (a softmax restricted to
the labels, not to the whole vocabulary). The ranker is only ever asked to order those K tokens, so
that is the quantity to train; it starts at ln(K) (3.00 for 20 labels) for a model with no
preference, which makes "is the loss falling?" easy to read. Only the answer position's logits are
computed, never full-vocabulary logits for every token.

The same code runs as one process and as N processes on one or several nodes (``rerank-dist
launch``). The batch plan fixes how a step of ``train.batch_size`` examples is cut across them, so
the loss trajectory does not depend on the world size; every distributed concern (accumulation,
sharded validation, who writes what) is here, in ``score.py`` or in ``distributed.py``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from rerank_dist import preemption
from rerank_dist.checkpoint import TrainerState, latest_step_dir, prune_step_dirs, publish_best, reconcile_run
from rerank_dist.config import RunConfig, labels_for, save_config
from rerank_dist.distributed import (BACKEND_NAMES, agreed, build_accelerator, describe, keep_adapter_only,
                                     load_checkpoint, peak_memory_gib, release_backend, save_checkpoint,
                                     shards_weights, weights_held)
from rerank_dist.evaluation import evaluate_scores, validation_users
from rerank_dist.hardware import device_memory_bytes, resolve_dtype
from rerank_dist.io import append_jsonl, read_jsonl, write_json
from rerank_dist.label_scoring import label_logits, left_pad, pack, packed_label_logits
from rerank_dist.paths import RunPaths
from rerank_dist.plan import plan_for, recorded_memory_options, resolve_auto
from rerank_dist.score import score_prompts


@dataclass
class TrainingData:
    examples: Any                      # example_store.StoredExamples: (prompt token ids, target label index) per row
    stats: dict[str, Any]              # label balance, target insertion rate, prompt lengths
    val_examples: list[Any]            # validation examples (selection of best/ only)
    val_tokens: list[list[int]]
    verbalizer: dict[str, Any]         # labels, their token ids in context, their tokens
    pad_id: int


def train(cfg: RunConfig, upstream_key: str) -> dict:
    """Train the ranker of cfg's run. upstream_key: the key the stage before recorded (pipeline.py),
    which names the examples store: examples built from other candidates are never reused."""
    from rerank_dist.modeling import compile_stats, load_model, load_tokenizer

    # ------------------------------------------------------------------ setup
    paths = RunPaths(Path(cfg.run_dir))
    tc = cfg.train
    plan = plan_for(cfg)
    accelerator = build_accelerator(cfg, plan, trackers_dir=paths.ranker / "trackers")
    keep_adapter_only(accelerator)
    set_seed(tc.seed)
    say = accelerator.print
    say(f"{describe(accelerator)}; backend {BACKEND_NAMES[tc.backend]}")

    # model.gradient_checkpointing / quantization auto: decided here, for this device, before loading;
    # a resumed run keeps what it decided when it started, whatever device it restarts on.
    resume_from = latest_step_dir(paths.ranker) if tc.resume else None
    model_cfg, memory_choice = resolve_auto(cfg, plan, device_memory_bytes(accelerator.device), accelerator.device.type,
                                            decided=recorded_memory_options(resume_from) if resume_from else None)
    if memory_choice["reason"] != "set in the config":
        say(f"auto: quantization {memory_choice['quantization']}, gradient checkpointing "
            f"{memory_choice['gradient_checkpointing']} ({memory_choice['reason']})")
    cfg = dataclasses.replace(cfg, model=model_cfg)  # the checkpoints' config.yaml records the choice; scoring reads it
    tokenizer = load_tokenizer(cfg.model)
    data = _load_data(accelerator, cfg, paths, tokenizer, upstream_key, say)
    # Under zero3 / fsdp the backend places the weights (sharded); otherwise each process loads them all.
    compiled_before = compile_stats()  # model.compile: what Dynamo compiled before this run, in this process
    model = load_model(cfg.model, training=True, device=accelerator.device, sharded=shards_weights(cfg))
    dtype, dtype_reason = resolve_dtype(cfg.model.dtype, accelerator.device)  # as load_model resolved it
    say(f"model dtype: {dtype} ({dtype_reason})")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=tc.lr, weight_decay=tc.weight_decay)
    # A generator of its own: a DataLoader without one draws its worker seed from the global RNG each
    # time an epoch starts, so a resumed run would shift the LoRA-dropout stream by one draw.
    order = _order(data.examples, tc)
    loader = DataLoader(data.examples, batch_size=plan.micro_batch_size, shuffle=order is None, sampler=order,
                        collate_fn=_collate(data.pad_id, tc.packing), generator=torch.Generator().manual_seed(tc.seed))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    held, whole = weights_held(model)  # under zero3 / fsdp about 1/W of the model per process
    say(f"weights on this process: {held:,} of {whole:,} elements ({held / whole:.0%}) under {BACKEND_NAMES[tc.backend]}")
    total_steps = _total_steps(cfg, len(loader), plan.accumulation)
    # Stepped by hand once per optimizer step (not prepared: accelerate would step it once per
    # process), and checkpointed as JSON in trainer_state.json.
    warmup = _warmup(tc.warmup_steps, total_steps, say)
    scheduler = (get_linear_schedule_with_warmup(optimizer, warmup, total_steps) if tc.lr_schedule == "linear"
                 else get_constant_schedule_with_warmup(optimizer, warmup))

    state = TrainerState(total_steps=total_steps, world_size=plan.world_size, accumulation=plan.accumulation,
                         backend=tc.backend)
    if resume_from is not None:
        state = _resume(accelerator, model, optimizer, resume_from, scheduler, total_steps, say)
    if accelerator.is_main_process:
        for change in reconcile_run(paths, state if resume_from is not None else None):
            say(f"restart: {change}")
    accelerator.wait_for_everyone()
    accelerator.init_trackers("rerank_dist", config=_flat(cfg.to_dict()),
                              init_kwargs={"tensorboard": {"purge_step": state.step + 1}})

    label_ids = torch.tensor(data.verbalizer["label_ids"], dtype=torch.long, device=accelerator.device)  # (K,)
    num_labels = len(data.verbalizer["labels"])
    num_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in trainable)  # ZeRO-3: whole size, not the shard
    say(f"training: {len(data.examples):,} examples, {total_steps} optimizer steps; {plan.describe()}; "
        f"{num_trainable:,} trainable parameters; chance loss ln({num_labels}) = {math.log(num_labels):.3f}")
    say(f"training negatives: {cfg.prompt.negatives}; target inserted into "
        f"{data.stats.get('target_insertion_rate') or 0:.1%} of retriever candidate lists; "
        f"label balance max/min = {data.stats.get('label_balance_ratio')}")
    if data.stats.get("rows_left_out_target_not_retrieved"):
        say(f"training rows: {data.stats['rows_left_out_target_not_retrieved']:,} left out whose target the retriever "
            f"missed (prompt.train_targets=retrieved)")

    # ------------------------------------------------------------------ loop
    started = last_save = last_step_end = time.time()
    stopped_early = False
    # (loss x examples, examples, real tokens, padded slots) since the last step
    window = torch.zeros(4, device=accelerator.device)
    model.train()
    bar = tqdm(total=total_steps, initial=state.step, desc="training", unit="step",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    while state.step < total_steps and state.epoch < tc.epochs:
        loader.set_epoch(state.epoch)
        skip = state.steps_in_epoch * plan.accumulation  # this process's batches already trained this epoch
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in batches:
            with accelerator.accumulate(model):
                logits = _label_logits(model, batch, label_ids)  # (B, K)
                loss = F.cross_entropy(logits.float(), batch["labels"])
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    # max_norm inf measures without clipping, so the norm is logged either way
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm or math.inf)
                optimizer.step()
                optimizer.zero_grad()
            n = len(batch["labels"])
            window[0] += loss.detach().float() * n
            window[1] += n
            window[2] += batch["tokens"]
            window[3] += batch["input_ids"].numel()
            if not accelerator.sync_gradients:
                continue

            # -------------------------------------------------------------- log
            scheduler.step()
            state.step += 1
            state.steps_in_epoch += 1
            loss_sum, examples, tokens, slots = accelerator.reduce(window, "sum").tolist()
            window.zero_()
            now = time.time()
            record = {"step": state.step, "epoch": state.epoch, "loss": round(loss_sum / examples, 5),
                      "lr": scheduler.get_last_lr()[0],
                      "grad_norm": round(float(grad_norm), 5) if grad_norm is not None else None,
                      "tokens": int(tokens), "padding": int(slots - tokens),
                      "tokens_per_s": round(tokens / max(now - last_step_end, 1e-9), 1),
                      "elapsed_s": round(now - started, 1)}
            last_step_end = now
            accelerator.log({f"train/{k}": record[k] for k in ("loss", "lr", "grad_norm", "tokens_per_s")
                             if record[k] is not None}, step=state.step)
            if accelerator.is_main_process:
                append_jsonl(paths.train_log, record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                tqdm.write(f"step {state.step:>5}/{total_steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                           f"grad {record['grad_norm'] or float('nan'):.3f}  {record['tokens_per_s']:.0f} tok/s  "
                           f"{(now - started) / 60:.1f} min")

            # -------------------------------------------------------------- evaluate
            out_of_time, save_by_time, preempted = agreed(accelerator, [
                bool(tc.max_minutes) and now - started > tc.max_minutes * 60,
                bool(tc.save_every_minutes) and now - last_save > tc.save_every_minutes * 60,
                preemption.requested()])  # a scheduler's warning signal (preemption.py)
            last = state.step >= total_steps or out_of_time
            improved = False
            if state.step % tc.eval_every == 0 or last:
                improved = _evaluate(accelerator, model, data, cfg, state, paths)
                # Every process computed the same validation score (gathered), so they agree here.
                if tc.patience and state.evals_since_best >= tc.patience and not last:
                    stopped_early = last = True
                    _log_early_stop(accelerator, paths, state, tc.patience)

            # -------------------------------------------------------------- save
            if improved or last or save_by_time or preempted or (tc.save_every and state.step % tc.save_every == 0):
                _save(accelerator, model, optimizer, paths, cfg, data.verbalizer, state, scheduler, improved)
                last_save = time.time()
            last_step_end = time.time()  # tokens/s counts training time only, not validation or saving
            if preempted and not last:  # preemption: this step's checkpoint is written; the requeued job resumes it
                _stop_for_requeue(accelerator, paths, state, bar)
            if last:
                if out_of_time and state.step < total_steps:
                    say(f"stopping at step {state.step}: train.max_minutes={tc.max_minutes} reached")
                break
        else:  # the epoch ran out: on to the next one
            state.epoch, state.steps_in_epoch = state.epoch + 1, 0
            continue
        break  # the for loop broke: the run is done
    bar.close()
    for tracker in accelerator.trackers:  # not end_training(): it would also end the process group that
        tracker.finish()                  # scoring and the stages after this one still use
    release_backend(accelerator)

    summary = _summary(paths, cfg, state, data, started, resume_from, accelerator.device)
    summary["stopped_by"] = ("early_stopping" if stopped_early else "steps" if state.step >= total_steps
                             else "max_minutes")
    summary["weights_held_share"] = round(held / whole, 4)  # of the main process
    summary["memory_options"] = memory_choice  # gradient checkpointing and quantization, and why
    summary["compile_stats"] = None  # model.compile: Dynamo's graphs and graph breaks in this run
    if cfg.model.compile != "none":  # (its counters are per process and cumulative: the difference is this run's)
        summary["compile_stats"] = {k: v - compiled_before[k] for k, v in compile_stats().items()}
        # Many graphs or breaks mean the layers run in pieces (under ZeRO-3: at its gather hooks).
        say(f"torch.compile ({cfg.model.compile}): {summary['compile_stats']['graphs']} graphs, "
            f"{summary['compile_stats']['graph_breaks']} graph breaks (this process)")
    if accelerator.is_main_process:
        write_json(paths.ranker / "train_summary.json", summary)
    accelerator.wait_for_everyone()
    return summary


# ---------------------------------------------------------------- setup helpers


def _load_data(accelerator, cfg: RunConfig, paths: RunPaths, tokenizer: Any, upstream_key: str, say) -> TrainingData:
    """Training examples (the on-disk store) and validation examples, with label ids resolved in context."""
    from rerank_dist.data.prepare import load_dataset
    from rerank_dist.examples import build_examples
    from rerank_dist.verbalizer import describe_label_ids, verify_label_ids

    dataset = load_dataset(paths.data)
    labels = labels_for(cfg)
    examples = _training_examples(accelerator, cfg, paths, dataset, labels, tokenizer, upstream_key, say)
    informative, note = validation_users(pd.read_parquet(paths.candidates("val")), cfg.train.eval_users)
    say(f"validation: {note}")
    val_examples, _ = build_examples(informative, dataset, cfg.prompt, labels, tokenizer, "val", dataset.num_items)
    # The label ids are resolved in context from real prompts and must agree across them: the id the
    # loss trains is then the id the scorer reads.
    probes = [*examples.probes[:1], *examples.probes[-1:], val_examples[0].prompt, val_examples[-1].prompt]
    label_ids = verify_label_ids(tokenizer, probes, labels)
    say(f"label tokens in context: {describe_label_ids(tokenizer, labels, label_ids)}")
    verbalizer = {"labels": labels, "label_ids": label_ids, "label_tokens": tokenizer.convert_ids_to_tokens(label_ids)}
    return TrainingData(examples=examples, stats=examples.stats, val_examples=val_examples,
                        val_tokens=[e.input_ids for e in val_examples], verbalizer=verbalizer,
                        pad_id=tokenizer.pad_token_id)


def _training_examples(accelerator, cfg: RunConfig, paths: RunPaths, dataset: Any, labels: list[str], tokenizer: Any,
                       upstream_key: str, say) -> Any:
    """The training examples, built once into the run's store (see example_store.py), then mapped.

    A store that is complete is opened as it is (resume, requeue, another process count). Otherwise
    every process builds its share of the parts still missing, the main process then writes
    meta.json, and all of them map the same files.
    """
    from rerank_dist import example_store as store

    from_candidates = cfg.retriever.train_candidates != "none"
    source = store.StoreSource(dataset, paths.candidates("train") if from_candidates else None,
                               cfg.retriever.train_prefixes_per_user)
    spec = store.store_spec(cfg, upstream_key, tokenizer, labels)
    if store.is_complete(spec):
        opened = time.time()
        examples = store.StoredExamples(spec.directory)
        say(f"examples: reusing {spec.directory} ({len(examples):,} rows, opened in {time.time() - opened:.2f} s)")
        return examples
    if accelerator.is_main_process:
        store.reset_if_stale(spec, say)
    accelerator.wait_for_everyone()
    started = time.time()
    plan = store.row_plan(source, cfg.prompt, len(labels))
    todo = store.missing_parts(spec, len(plan))
    total = len(store.part_ranges(len(plan)))
    say(f"examples: building {len(plan):,} training examples into {spec.directory}: {len(todo)} of {total} parts "
        f"to make, shared by {accelerator.num_processes} process(es)")
    with accelerator.split_between_processes(todo) as mine:
        titles = store.prompt_pieces(source, cfg.prompt, labels, tokenizer) if mine else None
        for done, part in enumerate(mine, start=1):
            store.build_part(spec, plan, part, source, cfg.prompt, labels, tokenizer, titles)
            say(f"examples: part {part + 1}/{total} written ({done}/{len(mine)} of this process's, "
                f"{time.time() - started:.0f} s)")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        store.finish(spec, plan, source, cfg.prompt, labels, tokenizer)
    accelerator.wait_for_everyone()
    say(f"examples: {len(plan):,} built in {time.time() - started:.0f} s")
    return store.StoredExamples(spec.directory)


def _order(examples: Any, tc: Any) -> Any:
    """The training order's sampler: length-grouped (train.length_grouping) or None, a uniform shuffle
    (the DataLoader's, seeded by its generator). Both depend on the seed and the epoch alone."""
    if not tc.length_grouping:
        return None
    from rerank_dist.length_grouping import LengthGroupedSampler

    return LengthGroupedSampler(examples.lengths(), tc.batch_size, tc.length_grouping, tc.seed)


def _collate(pad_id: int, packing: bool):
    def collate(rows: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        prompts = [tokens for tokens, _ in rows]
        batch = {"labels": torch.tensor([label for _, label in rows], dtype=torch.long),  # (B,)
                 "tokens": torch.tensor(sum(map(len, prompts)))}  # real tokens, padding left out
        if packing:  # one row, no padding (label_scoring.pack)
            batch["input_ids"], batch["position_ids"], batch["ends"] = pack(prompts)  # (1, T), (1, T), (B,)
        else:
            batch["input_ids"], batch["attention_mask"] = left_pad(prompts, pad_id)  # (B, L), (B, L)
        return batch
    return collate


def _label_logits(model, batch: dict[str, torch.Tensor], label_ids: torch.Tensor) -> torch.Tensor:
    if "ends" in batch:
        return packed_label_logits(model, batch["input_ids"], batch["position_ids"], batch["ends"], label_ids)
    return label_logits(model, batch["input_ids"], batch["attention_mask"], label_ids)


def _total_steps(cfg: RunConfig, batches_per_epoch: int, accumulation: int) -> int:
    """Optimizer steps of the whole run; batches_per_epoch is this process's (loader after prepare)."""
    total = cfg.train.epochs * math.ceil(batches_per_epoch / accumulation)
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def _warmup(configured: int, total_steps: int, say) -> int:
    if configured < total_steps:
        return configured
    warmup = max(1, total_steps // 10)
    say(f"train.warmup_steps={configured} >= {total_steps} total steps; warming up for {warmup} instead")
    return warmup


def _resume(accelerator, model, optimizer, step_dir: Path, scheduler, total_steps: int, say) -> TrainerState:
    """Adapter, optimizer, RNG streams and scheduler from step_dir; the step count continues."""
    state = TrainerState.read(step_dir)
    exact = load_checkpoint(accelerator, model, optimizer, step_dir, state.world_size, state.backend)
    scheduler.load_state_dict(state.scheduler)
    if state.total_steps != total_steps:
        say(f"resuming with {total_steps} total steps (the checkpoint planned {state.total_steps})")
    state.total_steps = total_steps
    say(f"resuming from {step_dir} at step {state.step}"
        + ("" if exact else f" (written by {state.world_size} processes, now {accelerator.num_processes}: "
                            "the data order continues, the dropout streams do not)"))
    state.world_size, state.accumulation = accelerator.num_processes, accelerator.gradient_accumulation_steps
    return state


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": ..}} -> {"train.lr": ..}, lists as text: trackers take scalar hyperparameters."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = ",".join(map(str, value)) if isinstance(value, list) else value
    return out


# ---------------------------------------------------------------- loop helpers


def _stop_for_requeue(accelerator, paths: RunPaths, state: TrainerState, bar) -> None:
    """Preempted (see preemption.py): every process agreed to stop after this step, whose checkpoint
    is on disk. No extra validation: the resumed run must see the same evaluations as an unbroken one."""
    bar.close()
    for tracker in accelerator.trackers:
        tracker.finish()
    waited = preemption.seconds_since_signal()
    if accelerator.is_main_process:
        append_jsonl(paths.train_log, {"step": state.step, "event": "preempted", "signal_to_checkpoint_s": waited})
    raise preemption.Preempted(f"training stopped after step {state.step}/{state.total_steps}; checkpoint "
                               f"{paths.step_dir(state.step)} written{preemption.describe_wait()}")


def _evaluate(accelerator, model, data: TrainingData, cfg: RunConfig, state: TrainerState, paths: RunPaths) -> bool:
    """Validation NDCG@10 of the in-memory model (selection only; test scoring reloads from disk).
    Returns whether it is the best so far (state is updated)."""
    label_ids = torch.tensor(data.verbalizer["label_ids"], dtype=torch.long)
    scores = score_prompts(accelerator, accelerator.unwrap_model(model), data.val_tokens, label_ids,
                           data.pad_id, cfg.score.batch_size, lockstep=shards_weights(cfg),
                           token_budget=cfg.score.token_budget)
    report = evaluate_scores(data.val_examples, scores, cfg.prompt.seed)
    ndcg = report["reranker"]["all_users"]["ndcg@10"]
    base = report["retriever_order"]["all_users"]["ndcg@10"]
    improved = ndcg > state.best_ndcg
    if improved:
        state.best_ndcg, state.best_step, state.evals_since_best = ndcg, state.step, 0
    else:
        state.evals_since_best += 1
    accelerator.log({"val/ndcg@10": ndcg, "val/retriever_order_ndcg@10": base}, step=state.step)
    if accelerator.is_main_process:
        append_jsonl(paths.train_log, {"step": state.step, "event": "eval", "val_ndcg@10": ndcg,
                                       "val_retriever_ndcg@10": base, "best": improved,
                                       "val_users": len(data.val_examples)})
        tqdm.write(f"step {state.step:>5}  val NDCG@10 {ndcg:.4f} (retriever order {base:.4f})"
                   f"{'  -> best' if improved else ''}")
    return improved


def _log_early_stop(accelerator, paths: RunPaths, state: TrainerState, patience: int) -> None:
    message = (f"early stopping at step {state.step}: no better validation NDCG@10 in {patience} validations; "
               f"best {state.best_ndcg:.4f} at step {state.best_step} (best/, what gets scored)")
    accelerator.print(message)
    if accelerator.is_main_process:
        append_jsonl(paths.train_log, {"step": state.step, "event": "early_stop", "best_step": state.best_step,
                                       "best_val_ndcg@10": state.best_ndcg, "patience": patience})


def _save(accelerator, model, optimizer, paths: RunPaths, cfg: RunConfig, verbalizer: dict, state: TrainerState,
          scheduler, improved: bool) -> None:
    """step-NNNNNN/ from every process; best/ from it when validation improved; old checkpoints pruned."""
    state.scheduler = scheduler.state_dict()
    step_dir = paths.step_dir(state.step)

    def extras(tmp: Path) -> None:
        state.write(tmp)
        save_config(cfg, tmp / "config.yaml")
        write_json(tmp / "verbalizer.json", {**verbalizer, "step": state.step})

    save_checkpoint(accelerator, model, optimizer, step_dir, extras)
    if accelerator.is_main_process:
        if improved:
            publish_best(step_dir, paths.best)
        prune_step_dirs(paths.ranker, cfg.train.keep_last, state.best_step)
    accelerator.wait_for_everyone()


def _summary(paths: RunPaths, cfg: RunConfig, state: TrainerState, data: TrainingData, started: float,
             resume_from: Path | None, device: torch.device) -> dict:
    """The run as a whole, from the (reconciled) log: every step once, across restarts. Throughput
    leaves out the first step (start-up, memory allocation)."""
    records = [r for r in (read_jsonl(paths.train_log).records if paths.train_log.is_file() else []) if "loss" in r]
    losses = [r["loss"] for r in records]
    num_labels = len(data.verbalizer["labels"])
    dtype, dtype_reason = resolve_dtype(cfg.model.dtype, device)  # model.dtype as this run loaded it
    return {"steps": state.step, "total_steps": state.total_steps, "examples": len(data.examples),
            "loss_first_steps": _mean(losses[:5]), "loss_last_steps": _mean(losses[-5:]),
            "chance_loss": math.log(num_labels), "best_val_ndcg@10": state.best_ndcg, "best_step": state.best_step,
            "val_users": len(data.val_examples), "val_users_selection": "target retrieved",
            "examples_seen": state.step * cfg.train.batch_size,
            "train_order": cfg.prompt.train_order, "eval_order": cfg.prompt.eval_order,
            "world_size": state.world_size, "backend": state.backend,
            "accumulation": state.accumulation, "mixed_precision": cfg.train.mixed_precision,
            "dtype": dtype, "dtype_reason": dtype_reason,
            "tokens_per_s": _mean([r["tokens_per_s"] for r in records[1:] if "tokens_per_s" in r]),
            # tokens/s counts real tokens only; padding: the share of computed slots that were padding
            "length_grouping": cfg.train.length_grouping, "packing": cfg.train.packing,
            "upcast_fp32": cfg.model.upcast_fp32, "compile": cfg.model.compile,
            "padding_share": _padding_share(records),
            "peak_memory_gib": peak_memory_gib(device),
            "minutes": round((time.time() - started) / 60, 2), "resumed_from": str(resume_from or ""),
            "train_prompt_stats": data.stats, "verbalizer": data.verbalizer}


def _padding_share(records: list[dict]) -> float | None:
    tokens = sum(r.get("tokens", 0) for r in records)
    padding = sum(r.get("padding", 0) for r in records)
    return round(padding / (tokens + padding), 4) if tokens + padding else None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
