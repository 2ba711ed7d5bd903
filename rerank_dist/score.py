"""Distributed batched scorer.

The prompts are cut into batches first, by length so that a batch pads little, and those same
batches are then shared out between the processes (``split_between_processes``): a prompt is scored
in the same batch, with the same padding, whatever the number of processes, so 1 and N processes
give bit-identical scores. Rows are left-padded so the answer position is the last one, and logits
are taken only there and only for the label tokens. Shards are gathered (``gather_object``) and put
back in input order.

``score_split`` is the test-time entry point: it always reloads the saved adapter from disk, so
what gets scored is exactly what was saved. It can stop and resume: every process saves the scores
it has made to ``scores/<split>/`` on a preemption signal (``preemption.py``, agreed between batches
like training's steps) and every ``train.save_every_minutes``; a rerun scores only the batches not
saved yet, and the result equals an unbroken run's bit for bit (same batches, same padding).
"""

from __future__ import annotations

import hashlib
import json
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
from rerank_dist.hardware import resolve_dtype
from rerank_dist.io import atomic_path, read_json, write_json, write_parquet
from rerank_dist.label_scoring import label_logits, left_pad
from rerank_dist.metrics import metrics_from_ranks, paired_comparison, ranked_order, ranking_report, target_ranks
from rerank_dist.paths import RunPaths


def _batches(token_lists: list[list[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices in batches that do not depend on the number of processes.

    Sorted by length so each batch pads little; then put in a fixed pseudo-random order, so that the
    contiguous share each process gets mixes long and short batches rather than all the long ones.
    """
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]), reverse=True)
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    return [batches[j] for j in np.random.default_rng(0).permutation(len(batches))]


@torch.no_grad()
def _score_batches(model, token_lists, batches, label_ids, pad_id, device, show,
                   idle_passes: list[list[int]] = ()) -> list[tuple[int, list[float]]]:
    """(prompt index, K scores) for every prompt in batches; idle_passes are run and their scores dropped."""
    batches = sorted(batches, key=lambda b: len(token_lists[b[0]]), reverse=True)  # longest first: OOM shows at once
    out: list[tuple[int, list[float]]] = []
    bar = tqdm(total=sum(map(len, batches)), desc="scoring", unit="prompt", disable=not show, dynamic_ncols=True)
    for batch in batches:
        input_ids, attention_mask = left_pad([token_lists[i] for i in batch], pad_id)  # (B, L), (B, L)
        logits = label_logits(model, input_ids.to(device), attention_mask.to(device), label_ids.to(device))  # (B, K)
        for i, row in zip(batch, logits.float().cpu().tolist()):
            out.append((i, row))
        bar.update(len(batch))
    bar.close()
    for batch in idle_passes:
        input_ids, attention_mask = left_pad([token_lists[i] for i in batch], pad_id)  # (B, L), (B, L)
        label_logits(model, input_ids.to(device), attention_mask.to(device), label_ids.to(device))
    return out


def score_prompts(accelerator: Accelerator, model, token_lists: list[list[int]], label_ids: torch.Tensor,
                  pad_id: int, batch_size: int, lockstep: bool = False) -> np.ndarray:
    """Label scores for every prompt, in input order: (N, K) float32. All processes must call this.

    lockstep: every process runs the same number of forward passes (a process with fewer batches
    repeats one and drops its scores). Needed when the weights are sharded (ZeRO-3, FSDP): each
    forward gathers them from all processes, so one process with an extra batch would wait forever.

    Raises RuntimeError when a prompt's scores did not come back from the shards, and (a different
    message) when the model produced NaN or inf scores for some prompt.
    """
    was_training = model.training
    model.eval()
    batches = _batches(token_lists, batch_size)
    with accelerator.split_between_processes(batches) as mine:
        mine = list(mine)
        extra = math.ceil(len(batches) / accelerator.num_processes) - len(mine) if lockstep else 0
        local = _score_batches(model, token_lists, mine, label_ids, pad_id, accelerator.device,
                               accelerator.is_local_main_process, idle_passes=[batches[-1]] * extra)
    gathered = gather_object(local) if accelerator.num_processes > 1 else local
    if was_training:
        model.train()
    scores = np.zeros((len(token_lists), len(label_ids)), dtype=np.float32)
    filled = np.zeros(len(token_lists), dtype=bool)  # which prompts came back from the shards
    for i, row in gathered:
        scores[i] = row
        filled[i] = True
    if not filled.all():
        missing = int((~filled).sum())
        raise RuntimeError(f"scoring lost {missing} of {len(token_lists)} prompts while gathering shards")
    non_finite = int((~np.isfinite(scores)).any(axis=1).sum())
    if non_finite:
        dtype = getattr(model, "dtype", None)
        raise RuntimeError(
            f"the model produced non-finite label scores (NaN or inf) for {non_finite} of {len(token_lists)} "
            f"prompts{f' (model dtype {dtype})' if dtype is not None else ''}; float16 activations overflow "
            f"easily: use model.dtype=bfloat16 or float32 (and no fp16 mixed precision)")
    return scores


def baseline_scores(examples, seed: int) -> dict[str, np.ndarray]:
    """Scores that reproduce the retriever's order and a random order on the same displayed candidates."""
    retriever = np.array([[-p for p in ex.retriever_positions] for ex in examples], dtype=np.float64)  # (N, K)
    rng = np.random.default_rng(seed)
    random = rng.random(retriever.shape)  # (N, K)
    return {"retriever_order": retriever, "random_order": random}


def evaluate_orders(examples, orders: dict[str, np.ndarray], seed: int, ks=(1, 5, 10)) -> dict:
    """ranking_report of each named order (N, K scores on the displayed candidates), next to the
    retriever-order and random-order baselines on the same candidates."""
    target_index = np.array([ex.label_index for ex in examples])
    report = {}
    for name, scores in {**orders, **baseline_scores(examples, seed)}.items():
        report[name] = ranking_report(target_ranks(scores, target_index), scores.shape[1], ks)
    return report


def evaluate_scores(examples, scores: np.ndarray, seed: int, ks=(1, 5, 10)) -> dict:
    """Reranker metrics next to the retriever-order and random-order baselines on the same candidates."""
    return evaluate_orders(examples, {"reranker": scores}, seed, ks)


def paired_comparisons(examples, orders: dict[str, np.ndarray], seed: int, pairs: list[tuple[str, str]],
                       resamples: int = 2000) -> dict:
    """Paired bootstrap over users (every user, misses included) for each (a, b) pair of order names."""
    target_index = np.array([ex.label_index for ex in examples])
    every = {**orders, **baseline_scores(examples, seed)}
    ranks = {name: target_ranks(scores, target_index) for name, scores in every.items()}
    return {f"{a}_vs_{b}": paired_comparison(ranks[a], ranks[b], ("ndcg@10", "recall@5"), resamples, seed)
            for a, b in pairs if a in ranks and b in ranks}


def log_probs(scores: np.ndarray) -> np.ndarray:
    """Label logits (N, K) -> log-probabilities over the K labels (N, K), float64."""
    x = np.asarray(scores, dtype=np.float64)
    top = x.max(axis=1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=1, keepdims=True))


def zscore(x: np.ndarray) -> np.ndarray:
    """Per-row standardisation (N, K) -> (N, K); a constant row becomes 0, NaN (not retrieved) the row's minimum."""
    x = np.asarray(x, dtype=np.float64)
    x = np.where(np.isnan(x), np.nanmin(np.where(np.isnan(x), np.inf, x), axis=1, keepdims=True), x)
    std = x.std(axis=1, keepdims=True)
    return np.where(std > 0, (x - x.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0), 0.0)


def fuse(llm: np.ndarray, retriever: np.ndarray, weight: float) -> np.ndarray:
    """(1 - w) * z(LLM log-probs) + w * z(retriever scores), per user: w = 0 is the LLM's order, 1 the retriever's."""
    return (1.0 - weight) * zscore(llm) + weight * zscore(retriever)


def retriever_score_matrix(examples) -> np.ndarray:
    """The retriever's scores of the displayed candidates (N, K)."""
    return np.array([ex.retriever_scores for ex in examples], dtype=np.float64)


def choose_fusion_weight(examples, llm: np.ndarray, weights: list[float], num_users: int) -> tuple[float, dict]:
    """The weight with the best NDCG@10 on these (validation) examples; ties go to the larger weight
    (the retriever's order is the default to beat). NDCG is over ``num_users`` (users not scored
    here are misses under any weight). Returns (weight, {weight: ndcg@10})."""
    target_index = np.array([ex.label_index for ex in examples])
    retriever = retriever_score_matrix(examples)
    grid = {}
    for w in weights:
        ranks = target_ranks(fuse(llm, retriever, w), target_index)
        grid[float(w)] = metrics_from_ranks(ranks, (10,))["ndcg@10"] * len(examples) / max(num_users, 1)
    best = max(grid, key=lambda w: (round(grid[w], 12), w))
    return best, grid


def to_display_order(base_examples, examples, scores: np.ndarray) -> np.ndarray:
    """Scores (N, K) of ``examples`` (another display order of the same prompts) rearranged into
    ``base_examples``' display order, by item id."""
    out = np.empty_like(scores)
    for n, (base, other) in enumerate(zip(base_examples, examples)):
        where = {item: j for j, item in enumerate(other.candidate_ids)}
        out[n] = scores[n, [where[item] for item in base.candidate_ids]]
    return out


def rankings_frame(examples, llm_logits: np.ndarray, final: np.ndarray | None = None,
                   extra: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """One row per user: displayed candidates, the LLM's label logits (``scores``), the reranked list
    and the target's rank.

    ``reranked`` and ``target_rank`` follow the final order (``final``, e.g. the fusion; default the
    LLM's own) and break ties identically (metrics.ranked_order: the target after its ties).
    ``final_scores`` and any ``extra`` score columns (N, K each) are added when given."""
    final = llm_logits if final is None else final
    target_index = np.array([ex.label_index for ex in examples])
    ranked = ranked_order(final, target_index)  # (N, K) best first
    frame = pd.DataFrame({
        "user": [ex.user for ex in examples],
        "prefix_len": [ex.prefix_len for ex in examples],
        "target": [ex.target for ex in examples],
        "candidates": [list(ex.candidate_ids) for ex in examples],
        "scores": [row.tolist() for row in llm_logits],
        "reranked": [[ex.candidate_ids[j] for j in order] for ex, order in zip(examples, ranked)],
        "target_rank": target_ranks(final, target_index),
        "retriever_rank": [ex.retriever_positions[ex.label_index] if ex.label_index >= 0 else -1 for ex in examples],
    })
    if final is not llm_logits:
        frame["final_scores"] = [row.tolist() for row in final]
    for name, values in (extra or {}).items():
        frame[name] = [row.tolist() for row in values]
    return frame


def _llm_scores(accelerator, model, cfg: RunConfig, split: str, candidates: pd.DataFrame, dataset, tokenizer,
                labels: list[str], label_ids: torch.Tensor, adapter_dir: Path, saved_name: str) -> dict:
    """The LLM's label scores for every prompt of ``candidates`` under score.permutations display
    orders, resumable per order (scores/<saved_name>[-pP]/).

    Returns examples (the first order's), stats, single (N, K: the first order's label logits),
    averaged (N, K: mean log-probability over the orders, in the first order's layout), seconds
    (forward passes per order), resumed (prompts saved by an earlier run), saved_dirs."""
    from rerank_dist.examples import build_examples, tokenize_examples

    paths = RunPaths(Path(cfg.run_dir))
    first, per_order, seconds, resumed = None, [], [], 0
    stats: dict = {}
    for p in range(cfg.score.permutations):
        examples, st = build_examples(candidates, dataset, cfg.prompt, labels, tokenizer, split, dataset.num_items,
                                      permutation=p)
        token_lists = tokenize_examples(examples, tokenizer)
        saved = SavedScores(paths.scores(saved_name if p == 0 else f"{saved_name}-p{p}"), len(token_lists),
                            len(label_ids))
        if accelerator.is_main_process:
            saved.start(_progress_key(cfg, adapter_dir, split, token_lists, label_ids, accelerator.device),
                        accelerator.print)
        accelerator.wait_for_everyone()
        saved.load()
        if saved.count and accelerator.is_main_process:  # one line for the job, not one per node
            print(f"[score] {saved_name} (order {p + 1}/{cfg.score.permutations}): resuming, {saved.count} of "
                  f"{len(token_lists)} prompts already scored", flush=True)
        started = time.time()
        with accelerator.autocast():  # train.mixed_precision, as validation during training saw the model
            logits = score_resumable(accelerator, model, token_lists, label_ids, tokenizer.pad_token_id,
                                     cfg.score.batch_size, saved, cfg.train.save_every_minutes * 60)
        seconds.append(time.time() - started)
        resumed += saved.count
        if p == 0:
            first, stats, single = examples, st, logits
            per_order.append(log_probs(logits))
        else:
            per_order.append(to_display_order(first, examples, log_probs(logits)))
    return {"examples": first, "stats": stats, "single": single, "averaged": np.mean(per_order, axis=0),
            "seconds": seconds, "resumed": resumed,
            "saved_dirs": [paths.scores(saved_name if p == 0 else f"{saved_name}-p{p}")
                           for p in range(cfg.score.permutations)]}


def _fusion_weight(accelerator, model, cfg: RunConfig, dataset, tokenizer, labels, label_ids, adapter_dir) -> dict:
    """score.fusion: the retriever weight chosen on validation users (never test), with its grid and cost.

    Only validation users whose target was retrieved are scored: every other user is a miss under
    any weight, so they change no comparison (NDCG is still reported over all validation users)."""
    paths = RunPaths(Path(cfg.run_dir))
    frame = pd.read_parquet(paths.candidates("val"))
    informative = frame[frame["target_rank"] >= 0] if "target_rank" in frame else frame
    if cfg.score.fusion_val_users:
        informative = informative.head(cfg.score.fusion_val_users)
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
            "seconds": round(sum(got["seconds"]), 1), "saved_dirs": got["saved_dirs"]}


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
    model = load_for_scoring(cfg.model, adapter_dir, device=accelerator.device)
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
            result["fusion"] = {k: v for k, v in fusion.items() if k != "saved_dirs"}
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
        extra = {"permuted_scores": orders["permuted"]} if "permuted" in orders else None
        write_parquet(paths.rankings(split), rankings_frame(examples, got["single"], orders[final], extra))
        write_json(paths.metrics(split), result)
        for directory in got["saved_dirs"] + (fusion["saved_dirs"] if fusion else []):
            shutil.rmtree(directory, ignore_errors=True)  # the rankings and metrics hold every score now
    accelerator.wait_for_everyone()
    return result


# ---------------------------------------------------------------- resumable scoring


class SavedScores:
    """Scores saved by runs of score_split that were stopped: ``scores/<split>/part-*.npz``, each one
    process's prompts since its previous save, valid for the inputs named by ``progress.json``."""

    def __init__(self, directory: Path, num_prompts: int, num_labels: int) -> None:
        self.directory = directory
        self.scores = np.zeros((num_prompts, num_labels), dtype=np.float32)  # (N, K)
        self.mask = np.zeros(num_prompts, dtype=bool)  # which prompts have saved scores

    @property
    def count(self) -> int:
        return int(self.mask.sum())

    def start(self, key: str, say) -> None:
        """Main process: keep saved scores made from these inputs (key), discard any others."""
        progress = self.directory / "progress.json"
        recorded = read_json(progress).get("key") if progress.is_file() else None
        if recorded != key and self.directory.exists():
            if recorded is not None:
                say(f"{self.directory}: saved scores from another adapter or other prompts; discarded")
            shutil.rmtree(self.directory)
        if recorded != key:
            write_json(progress, {"key": key, "prompts": len(self.mask)})

    def load(self) -> None:
        """Every process: read all saved parts. A prompt saved twice means two runs overlapped: refused."""
        for part in sorted(self.directory.glob("part-*.npz")):
            with np.load(part) as data:
                index, rows = data["index"], data["scores"]
            if self.mask[index].any():
                raise RuntimeError(f"{part}: holds prompts already saved in another part; delete "
                                   f"{self.directory} and score again")
            self.scores[index], self.mask[index] = rows, True

    def write(self, rank: int, rows: list[tuple[int, list[float]]]) -> None:
        """One process's new scores, as one part (atomically: a killed writer leaves no part)."""
        if not rows:
            return
        with atomic_path(self.directory / f"part-{time.time_ns()}-rank{rank:03d}.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, index=np.array([i for i, _ in rows], dtype=np.int64),
                     scores=np.array([row for _, row in rows], dtype=np.float32))


def _progress_key(cfg: RunConfig, adapter_dir: Path, split: str, token_lists: list[list[int]],
                  label_ids: torch.Tensor, device: torch.device | str) -> str:
    """What saved scores were made from: the adapter's bytes, every prompt's tokens, the label ids, the
    batching and the numerics. Scores saved under another key are never mixed in."""
    digest = hashlib.sha256((adapter_dir / "adapter_model.safetensors").read_bytes())
    model = {k: v for k, v in cfg.model.__dict__.items() if k not in ("cache_dir", "gguf_fallback")}
    # The resolved dtype, not "auto": a rerun on a machine that resolves auto otherwise (a CPU
    # without native bf16) must not mix its scores with the saved ones.
    model["dtype"] = resolve_dtype(cfg.model.dtype, device)[0]
    digest.update(json.dumps({"split": split, "labels": label_ids.tolist(), "batch_size": cfg.score.batch_size,
                              "model": model, "mixed_precision": cfg.train.mixed_precision},
                             sort_keys=True, default=str).encode())
    for tokens in token_lists:
        digest.update(np.asarray(tokens, dtype=np.int64).tobytes() + b"|")
    return digest.hexdigest()[:16]


def _any_process(accelerator: Accelerator, flags: list[bool]) -> list[bool]:
    """Decisions made the same on every process (any one says yes)."""
    votes = torch.tensor([float(f) for f in flags], device=accelerator.device)
    return [v > 0 for v in accelerator.reduce(votes, "max").tolist()]


@torch.no_grad()
def score_resumable(accelerator: Accelerator, model, token_lists: list[list[int]], label_ids: torch.Tensor,
                    pad_id: int, batch_size: int, saved: SavedScores, save_every_s: float) -> np.ndarray:
    """score_prompts for score_split, skipping the batches ``saved`` holds and able to stop.

    After each round (one batch per process) the processes vote; on a preemption signal, or every
    save_every_s seconds, each saves its new scores; on a signal they then raise Preempted together.
    Returns (N, K) float32 in input order, every prompt scored exactly once across all runs.
    """
    model.eval()
    todo = [b for b in _batches(token_lists, batch_size) if not saved.mask[b].all()]
    with accelerator.split_between_processes(todo) as mine:
        mine = sorted(mine, key=lambda b: len(token_lists[b[0]]), reverse=True)  # longest first: OOM shows at once
    rounds = math.ceil(len(todo) / accelerator.num_processes)  # the largest share: every process votes each round
    new: list[tuple[int, list[float]]] = []
    unsaved: list[tuple[int, list[float]]] = []
    last_save = time.time()
    bar = tqdm(total=len(token_lists), initial=saved.count, desc="scoring", unit="prompt",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    device = accelerator.device
    for r in range(rounds):
        if r < len(mine):
            input_ids, attention_mask = left_pad([token_lists[i] for i in mine[r]], pad_id)  # (B, L), (B, L)
            logits = label_logits(model, input_ids.to(device), attention_mask.to(device),
                                  label_ids.to(device))  # (B, K)
            unsaved.extend(zip(mine[r], logits.float().cpu().tolist()))
            bar.update(len(mine[r]))
        preempted, save_due = _any_process(accelerator, [
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
    new += unsaved
    gathered = gather_object(new) if accelerator.num_processes > 1 else new
    scores, filled = saved.scores.copy(), saved.mask.copy()
    for i, row in gathered:
        if filled[i]:
            raise RuntimeError(f"prompt {i} was scored twice (saved by an earlier run and scored again)")
        scores[i], filled[i] = row, True
    if not filled.all():
        raise RuntimeError(f"scoring lost {int((~filled).sum())} of {len(token_lists)} prompts while gathering shards")
    non_finite = int((~np.isfinite(scores)).any(axis=1).sum())
    if non_finite:
        raise RuntimeError(f"the model produced non-finite label scores (NaN or inf) for {non_finite} of "
                           f"{len(token_lists)} prompts; float16 activations overflow easily: use "
                           f"model.dtype=bfloat16 or float32 (and no fp16 mixed precision)")
    return scores
