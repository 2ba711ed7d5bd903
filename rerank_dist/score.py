"""Distributed batched scorer.

The prompts are cut into batches first, by length so that a batch pads little (score.batch_size
prompts each, or as many as fit in score.token_budget tokens), and those same batches are then
shared out between the processes (``split_between_processes``): a prompt is scored
in the same batch, with the same padding, whatever the number of processes, so 1 and N processes
give bit-identical scores. Rows are left-padded so the answer position is the last one, and logits
are taken only there and only for the label tokens. Shards are gathered (``gather_object``) and put
back in input order. A CUDA out-of-memory halves the batch and retries, counted in the metrics.

``score_split`` is the test-time entry point: it always reloads the saved adapter from disk, so
what gets scored is exactly what was saved. It can stop and resume: every process saves the scores
it has made to ``scores/<split>/`` on a preemption signal (``preemption.py``, agreed between batches
like training's steps) and every ``train.save_every_minutes``; a rerun scores only the batches not
saved yet, and the result equals an unbroken run's bit for bit (same batches, same padding).

One scoring loop (``score_prompts``) serves validation during training and ``score_split``;
resuming is only whether it is given saved scores (``saved_scores.py``). What is done with the
scores lives elsewhere: permutation averaging and fusion in ``fusion.py``, reports and the rankings
table in ``evaluation.py``.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from rerank_dist import preemption
from rerank_dist.config import RunConfig, labels_for
from rerank_dist.distributed import agreed
from rerank_dist.evaluation import evaluate_orders, paired_comparisons, rankings_frame, validation_users
from rerank_dist.fusion import choose_fusion_weight, fuse, log_probs, retriever_score_matrix, to_display_order
from rerank_dist.hardware import resolve_dtype
from rerank_dist.io import read_json, write_json, write_parquet
from rerank_dist.label_scoring import label_logits, left_pad
from rerank_dist.paths import RunPaths
from rerank_dist.saved_scores import SavedScores, progress_key


def _batches(token_lists: list[list[int]], batch_size: int, token_budget: int = 0) -> list[list[int]]:
    """Prompt indices in batches that do not depend on the number of processes.

    Cut from the prompts sorted by length, so each batch pads little: batch_size prompts each, or
    with a token_budget as many as fit in it once padded (rows x the batch's longest, at least one).
    Then put in a fixed pseudo-random order, so that the contiguous share each process gets mixes
    long and short batches rather than all the long ones.
    """
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]), reverse=True)
    batches, start = [], 0
    while start < len(order):
        rows = max(1, token_budget // max(1, len(token_lists[order[start]]))) if token_budget else batch_size
        batches.append(order[start:start + rows])
        start += rows
    return [batches[j] for j in np.random.default_rng(0).permutation(len(batches))]


def padding_waste(token_lists: list[list[int]], batches: list[list[int]]) -> float:
    """The share of the tokens the batches' forwards run on that are padding (0 = none)."""
    real = sum(len(token_lists[i]) for batch in batches for i in batch)
    padded = sum(len(batch) * max(len(token_lists[i]) for i in batch) for batch in batches)
    return 1.0 - real / padded if padded else 0.0


def _forward(model, token_lists: list[list[int]], batch: list[int], label_ids: torch.Tensor, pad_id: int,
             device, oom_retries: list[int] | None = None) -> list[list[float]]:
    """The K label scores of each prompt of one batch, as rows of floats.

    oom_retries (a one-element counter): a CUDA out-of-memory halves the batch and scores each half,
    counting the retry, down to single prompts; without it (sharded weights, where every process must
    run the same forwards) the error is raised as it is.
    """
    try:
        input_ids, attention_mask = left_pad([token_lists[i] for i in batch], pad_id)  # (B, L), (B, L)
        logits = label_logits(model, input_ids.to(device), attention_mask.to(device), label_ids.to(device))  # (B, K)
        return logits.float().cpu().tolist()
    except torch.cuda.OutOfMemoryError as err:
        if oom_retries is None:
            raise
        if len(batch) == 1:
            raise torch.cuda.OutOfMemoryError(
                f"scoring one prompt of {len(token_lists[batch[0]])} tokens ran out of GPU memory, with no smaller "
                f"batch to try: shorten the prompts (prompt.max_prompt_tokens) or use model.quantization=nf4") from err
    # Out of the except block, so the failed forward's tensors (held by the traceback) are freed first.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    oom_retries[0] += 1
    half = len(batch) // 2
    return (_forward(model, token_lists, batch[:half], label_ids, pad_id, device, oom_retries)
            + _forward(model, token_lists, batch[half:], label_ids, pad_id, device, oom_retries))


@torch.no_grad()
def score_prompts(accelerator: Accelerator, model, token_lists: list[list[int]], label_ids: torch.Tensor,
                  pad_id: int, batch_size: int, lockstep: bool = False, saved: SavedScores | None = None,
                  save_every_s: float = 0.0, token_budget: int = 0, stats: dict | None = None) -> np.ndarray:
    """Label scores for every prompt, in input order: (N, K) float32. All processes must call this.

    lockstep: every process runs the same number of forward passes (a process with fewer batches
    repeats one and drops its scores). Needed when the weights are sharded (ZeRO-3, FSDP): each
    forward gathers them from all processes, so one process with an extra batch would wait forever.

    token_budget: batches by tokens rather than by batch_size prompts (see ``_batches``).

    A CUDA out-of-memory halves the batch and retries (not in lockstep); ``stats``, when given, gets
    this process's count as "oom_retries". Halved batches pad differently, so their scores may
    differ from an unhalved run's by rounding.

    saved (score_split): resumable scoring. The batches ``saved`` holds are skipped; after each round
    (one batch per process) the processes vote, and on a preemption signal, or every save_every_s
    seconds, each saves its new scores; on a signal they then raise Preempted together. Without it
    (validation during training, which stops between steps) there is no vote and nothing is saved.

    Raises RuntimeError when a prompt's scores did not come back from the shards or came twice, and
    (a different message) when the model produced NaN or inf scores for some prompt.
    """
    was_training = model.training
    model.eval()
    batches = _batches(token_lists, batch_size, token_budget)
    if saved is not None:
        batches = [b for b in batches if not saved.mask[b].all()]
    with accelerator.split_between_processes(batches) as mine:
        mine = sorted(mine, key=lambda b: len(token_lists[b[0]]), reverse=True)  # longest first: OOM shows at once
    rounds = math.ceil(len(batches) / accelerator.num_processes)  # the largest share: every process votes each round
    device = accelerator.device
    retries = None if lockstep else [0]
    new: list[tuple[int, list[float]]] = []
    unsaved: list[tuple[int, list[float]]] = []
    last_save = time.time()
    bar = tqdm(total=len(token_lists), initial=saved.count if saved else 0, desc="scoring", unit="prompt",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    for r in range(rounds):
        if r < len(mine):
            unsaved.extend(zip(mine[r], _forward(model, token_lists, mine[r], label_ids, pad_id, device, retries)))
            bar.update(len(mine[r]))
        elif lockstep:  # an idle pass in step with the others' forwards; its scores are dropped
            _forward(model, token_lists, batches[-1], label_ids, pad_id, device)
        if saved is None:
            continue
        preempted, save_due = agreed(accelerator, [
            preemption.requested(), bool(save_every_s) and time.time() - last_save > save_every_s])
        if preempted or save_due:
            saved.write(accelerator.process_index, unsaved)
            new, unsaved = new + unsaved, []
            accelerator.wait_for_everyone()  # every share on disk before anyone stops
            last_save = time.time()
        if preempted and r < rounds - 1:
            bar.close()
            done = saved.count + int(accelerator.reduce(torch.tensor(len(new), device=device), "sum").item())
            raise preemption.Preempted(f"scoring stopped with {done} of {len(token_lists)} prompts scored, saved in "
                                       f"{saved.directory}{preemption.describe_wait()}")
    bar.close()
    if was_training:
        model.train()
    if stats is not None:
        stats["oom_retries"] = stats.get("oom_retries", 0) + (retries[0] if retries else 0)
    new += unsaved
    gathered = gather_object(new) if accelerator.num_processes > 1 else new
    scores = saved.scores.copy() if saved else np.zeros((len(token_lists), len(label_ids)), dtype=np.float32)
    filled = saved.mask.copy() if saved else np.zeros(len(token_lists), dtype=bool)  # prompts with scores
    for i, row in gathered:
        if filled[i]:
            raise RuntimeError(f"prompt {i} was scored twice (saved by an earlier run and scored again)")
        scores[i], filled[i] = row, True
    if not filled.all():
        raise RuntimeError(f"scoring lost {int((~filled).sum())} of {len(token_lists)} prompts while gathering shards")
    non_finite = int((~np.isfinite(scores)).any(axis=1).sum())
    if non_finite:
        dtype = getattr(model, "dtype", None)
        raise RuntimeError(
            f"the model produced non-finite label scores (NaN or inf) for {non_finite} of {len(token_lists)} "
            f"prompts{f' (model dtype {dtype})' if dtype is not None else ''}; float16 activations overflow "
            f"easily: use model.dtype=bfloat16 or float32 (and no fp16 mixed precision)")
    return scores


def _llm_scores(accelerator, model, cfg: RunConfig, split: str, candidates: pd.DataFrame, dataset, tokenizer,
                labels: list[str], label_ids: torch.Tensor, adapter_dir: Path, saved_name: str) -> dict:
    """The LLM's label scores for every prompt of ``candidates`` under score.permutations display
    orders, resumable per order (scores/<saved_name>[-pP]/).

    Returns examples (the first order's), stats, single (N, K: the first order's label logits),
    averaged (N, K: mean log-probability over the orders, in the first order's layout), seconds
    (forward passes per order), resumed (prompts saved by an earlier run), saved_dirs, batches and
    padding_waste (of the planned batches, over the orders) and oom_retries (this process's)."""
    from rerank_dist.examples import build_examples, tokenize_examples

    paths = RunPaths(Path(cfg.run_dir))
    first, per_order, seconds, resumed = None, [], [], 0
    stats: dict = {}
    loop_stats: dict = {"oom_retries": 0}
    batches, waste = 0, []
    for p in range(cfg.score.permutations):
        examples, st = build_examples(candidates, dataset, cfg.prompt, labels, tokenizer, split, dataset.num_items,
                                      permutation=p)
        token_lists = tokenize_examples(examples, tokenizer)
        planned = _batches(token_lists, cfg.score.batch_size, cfg.score.token_budget)
        batches, waste = batches + len(planned), waste + [padding_waste(token_lists, planned)]
        saved = SavedScores(paths.scores(saved_name if p == 0 else f"{saved_name}-p{p}"), len(token_lists),
                            len(label_ids))
        if accelerator.is_main_process:
            saved.start(progress_key(cfg, adapter_dir, split, token_lists, label_ids, accelerator.device),
                        accelerator.print)
        accelerator.wait_for_everyone()
        saved.load()
        if saved.count and accelerator.is_main_process:  # one line for the job, not one per node
            print(f"[score] {saved_name} (order {p + 1}/{cfg.score.permutations}): resuming, {saved.count} of "
                  f"{len(token_lists)} prompts already scored", flush=True)
        started = time.time()
        with accelerator.autocast():  # train.mixed_precision, as validation during training saw the model
            logits = score_prompts(accelerator, model, token_lists, label_ids, tokenizer.pad_token_id,
                                   cfg.score.batch_size, saved=saved, save_every_s=cfg.train.save_every_minutes * 60,
                                   token_budget=cfg.score.token_budget, stats=loop_stats)
        seconds.append(time.time() - started)
        resumed += saved.count
        if p == 0:
            first, stats, single = examples, st, logits
            per_order.append(log_probs(logits))
        else:
            per_order.append(to_display_order(first, examples, log_probs(logits)))
    return {"examples": first, "stats": stats, "single": single, "averaged": np.mean(per_order, axis=0),
            "seconds": seconds, "resumed": resumed, "batches": batches, "padding_waste": float(np.mean(waste)),
            "oom_retries": loop_stats["oom_retries"],
            "saved_dirs": [paths.scores(saved_name if p == 0 else f"{saved_name}-p{p}")
                           for p in range(cfg.score.permutations)]}


def _fusion_weight(accelerator, model, cfg: RunConfig, dataset, tokenizer, labels, label_ids, adapter_dir) -> dict:
    """score.fusion: the retriever weight chosen on validation users (never test), with its grid and cost.

    Only the validation users training validates on are scored (``evaluation.validation_users``: those
    whose target was retrieved; every other user is a miss under any weight, so they change no
    comparison); NDCG is still reported over all validation users."""
    paths = RunPaths(Path(cfg.run_dir))
    frame = pd.read_parquet(paths.candidates("val"))
    informative, note = validation_users(frame, cfg.score.fusion_val_users)
    if accelerator.is_main_process:
        accelerator.print(f"[score] fusion weight, validation users: {note}")
    got = _llm_scores(accelerator, model, cfg, "val", informative, dataset, tokenizer, labels, label_ids,
                      adapter_dir, "val-fusion")
    weight, grid = choose_fusion_weight(got["examples"], got["averaged"], cfg.score.fusion_weights, len(frame))
    if accelerator.is_main_process:
        accelerator.print(f"[score] fusion weight on the retriever: {weight} (best validation NDCG@10 "
                          f"{grid[weight]:.4f}; LLM alone {grid.get(0.0, float('nan')):.4f}, retriever alone "
                          f"{grid.get(1.0, float('nan')):.4f}; {len(informative)} of {len(frame)} validation users scored)")
    return {"weight": weight, "chosen_on": "val", "objective": "ndcg@10",
            "val_users": int(len(frame)), "val_users_scored": int(len(informative)),
            "grid": {str(w): round(v, 6) for w, v in grid.items()},
            "normalisation": "z-score per user of the LLM's label log-probabilities and of the retriever's scores",
            "seconds": round(sum(got["seconds"]), 1), "saved_dirs": got["saved_dirs"], "oom_retries": got["oom_retries"]}


def score_split(cfg: RunConfig, split: str) -> dict:
    """Reload the best adapter from disk, score every user of ``split``, write rankings and metrics.

    The LLM's order is always reported; with score.permutations > 1 also its average over display
    orders, and with score.fusion the fusion with the retriever's scores (weight chosen on
    validation), which is then the final order written to the rankings.
    """
    from rerank_dist.data.prepare import load_dataset
    from rerank_dist.distributed import build_accelerator, describe, peak_memory_gib
    from rerank_dist.modeling import load_for_scoring, load_tokenizer

    paths = RunPaths(Path(cfg.run_dir))
    accelerator = build_accelerator(cfg)
    accelerator.print(describe(accelerator))
    adapter_dir = paths.best
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{adapter_dir}: no saved adapter (adapter_model.safetensors); run the train stage first")
    verbalizer = read_json(adapter_dir / "verbalizer.json")
    labels = labels_for(cfg)
    if verbalizer["labels"] != labels:
        raise ValueError(f"{adapter_dir}/verbalizer.json: trained with labels {verbalizer['labels']}, config asks for {labels}")

    started = time.time()
    tokenizer = load_tokenizer(cfg.model)
    dataset = load_dataset(paths.data)
    candidates = pd.read_parquet(paths.candidates(split))
    if cfg.score.max_users:
        candidates = candidates.head(cfg.score.max_users)
    label_ids = torch.tensor(verbalizer["label_ids"], dtype=torch.long)
    model = load_for_scoring(cfg.model, adapter_dir, device=accelerator.device, merged=cfg.score.merged_weights)
    dtype, dtype_reason = resolve_dtype(cfg.model.dtype, accelerator.device)  # as load_for_scoring resolved it
    accelerator.print(f"model dtype: {dtype} ({dtype_reason})")

    fusion = (_fusion_weight(accelerator, model, cfg, dataset, tokenizer, labels, label_ids, adapter_dir)
              if cfg.score.fusion else None)
    got = _llm_scores(accelerator, model, cfg, split, candidates, dataset, tokenizer, labels, label_ids,
                      adapter_dir, split)
    examples, scoring_seconds = got["examples"], sum(got["seconds"])
    orders = {"reranker": got["single"]}
    final = "reranker"
    llm = got["single"]
    if cfg.score.permutations > 1:
        orders["permuted"] = llm = got["averaged"]
        final = "permuted"
    if fusion is not None:
        orders["fused"] = fuse(llm, retriever_score_matrix(examples), fusion["weight"])
        final = "fused"
    # Every process's out-of-memory retries (a collective: all processes run it).
    local_retries = got["oom_retries"] + (fusion["oom_retries"] if fusion else 0)
    oom_retries = int(accelerator.reduce(torch.tensor(local_retries, device=accelerator.device), "sum").item())
    result = {}
    if accelerator.is_main_process:
        result = evaluate_orders(examples, orders, seed=cfg.prompt.seed)
        result["final_order"] = final
        result["protocol"] = {"train_order": cfg.prompt.train_order, "eval_order": cfg.prompt.eval_order,
                              "negatives": cfg.prompt.negatives, "train_targets": cfg.prompt.train_targets,
                              "permutations": cfg.score.permutations}
        pairs = [(final, "retriever_order"), ("reranker", "random_order"), ("reranker", "retriever_order")]
        if final != "reranker":
            pairs.append((final, "reranker"))
        result["paired"] = paired_comparisons(examples, orders, cfg.prompt.seed, list(dict.fromkeys(pairs)))
        if fusion is not None:
            result["fusion"] = {k: v for k, v in fusion.items() if k not in ("saved_dirs", "oom_retries")}
        result["split"] = split
        result["adapter"] = str(adapter_dir)
        result["adapter_step"] = verbalizer.get("step")
        result["world_size"] = accelerator.num_processes
        result["dtype"] = dtype  # model.dtype as resolved on this machine (auto: see rerank_dist.hardware)
        result["scored_all_users"] = not cfg.score.max_users
        result["prompt_stats"] = got["stats"]
        result["seconds"] = round(time.time() - started, 1)  # with loading the model and building prompts
        result["scoring_seconds"] = round(scoring_seconds, 2)  # the forward passes and the gather alone
        result["permutation_cost"] = {"permutations": cfg.score.permutations,
                                      "seconds_per_order": [round(x, 1) for x in got["seconds"]],
                                      "cost_vs_one_order": round(scoring_seconds / max(got["seconds"][0], 1e-9), 2)}
        result["resumed_prompts"] = got["resumed"]  # scored by an earlier, preempted run of this stage
        total = len(examples) * cfg.score.permutations
        result["prompts_per_second"] = round((total - got["resumed"]) / max(scoring_seconds, 1e-9), 3)
        result["peak_memory_gib"] = peak_memory_gib(accelerator.device)
        result["batching"] = {"batch_size": cfg.score.batch_size, "token_budget": cfg.score.token_budget,
                              "batches": got["batches"], "padding_waste": round(got["padding_waste"], 4),
                              "oom_retries": oom_retries}  # padding_waste: pad share of the tokens run, planned
        result["merged_weights"] = cfg.score.merged_weights
        extra = {"permuted_scores": orders["permuted"]} if "permuted" in orders else None
        write_parquet(paths.rankings(split), rankings_frame(examples, got["single"], orders[final], extra))
        write_json(paths.metrics(split), result)
        for directory in got["saved_dirs"] + (fusion["saved_dirs"] if fusion else []):
            shutil.rmtree(directory, ignore_errors=True)  # the rankings and metrics hold every score now
    accelerator.wait_for_everyone()
    return result
