"""Distributed batched scorer.

Every process scores its own shard of the prompts (``split_between_processes``), sorted by length so
that a batch pads little, left-padded so the answer position is the last one for every row, with
logits taken only there and only for the label tokens. Shards are gathered (``gather_object``) and
put back in input order, so the result does not depend on the number of processes.

``score_split`` is the test-time entry point: it always reloads the saved adapter from disk, so
what gets scored is exactly what was saved.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from rerank_dist.config import RunConfig, labels_for
from rerank_dist.io import read_json, write_json, write_parquet
from rerank_dist.label_scoring import label_logits, left_pad
from rerank_dist.metrics import ranking_report, target_ranks
from rerank_dist.paths import RunPaths


@torch.no_grad()
def _score_shard(model, token_lists, indices, label_ids, pad_id, batch_size, device, show) -> list[tuple[int, list[float]]]:
    order = sorted(indices, key=lambda i: len(token_lists[i]), reverse=True)  # longest first: OOM shows at once
    out: list[tuple[int, list[float]]] = []
    bar = tqdm(total=len(order), desc="scoring", unit="prompt", disable=not show, dynamic_ncols=True)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        input_ids, attention_mask = left_pad([token_lists[i] for i in batch], pad_id)
        logits = label_logits(model, input_ids.to(device), attention_mask.to(device), label_ids.to(device))  # (B, K)
        for i, row in zip(batch, logits.float().cpu().tolist()):
            out.append((i, row))
        bar.update(len(batch))
    bar.close()
    return out


def score_prompts(accelerator: Accelerator, model, token_lists: list[list[int]], label_ids: torch.Tensor,
                  pad_id: int, batch_size: int) -> np.ndarray:
    """Label scores for every prompt, in input order: (N, K) float32. All processes must call this."""
    was_training = model.training
    model.eval()
    with accelerator.split_between_processes(list(range(len(token_lists)))) as shard:
        local = _score_shard(model, token_lists, shard, label_ids, pad_id, batch_size,
                             accelerator.device, accelerator.is_local_main_process)
    gathered = gather_object(local) if accelerator.num_processes > 1 else local
    if was_training:
        model.train()
    scores = np.full((len(token_lists), len(label_ids)), np.nan, dtype=np.float32)
    for i, row in gathered:
        scores[i] = row
    if np.isnan(scores).any():
        missing = int(np.isnan(scores).any(axis=1).sum())
        raise RuntimeError(f"scoring lost {missing} of {len(token_lists)} prompts while gathering shards")
    return scores


def baseline_scores(examples, seed: int) -> dict[str, np.ndarray]:
    """Scores that reproduce the retriever's order and a random order on the same displayed candidates."""
    retriever = np.array([[-p for p in ex.retriever_positions] for ex in examples], dtype=np.float64)  # (N, K)
    rng = np.random.default_rng(seed)
    random = rng.random(retriever.shape)  # (N, K)
    return {"retriever_order": retriever, "random_order": random}


def evaluate_scores(examples, scores: np.ndarray, seed: int, ks=(1, 5, 10)) -> dict:
    """Reranker metrics next to the retriever-order and random-order baselines on the same candidates."""
    target_index = np.array([ex.label_index for ex in examples])
    num_candidates = scores.shape[1]
    report = {"reranker": ranking_report(target_ranks(scores, target_index), num_candidates, ks)}
    for name, base in baseline_scores(examples, seed).items():
        report[name] = ranking_report(target_ranks(base, target_index), num_candidates, ks)
    return report


def rankings_frame(examples, scores: np.ndarray) -> pd.DataFrame:
    """One row per user: displayed candidates, their scores, the reranked list and the target's rank."""
    ranks = target_ranks(scores, np.array([ex.label_index for ex in examples]))
    ranked = np.argsort(-scores, axis=1, kind="stable")  # (N, K) best first
    return pd.DataFrame({
        "user": [ex.user for ex in examples],
        "prefix_len": [ex.prefix_len for ex in examples],
        "target": [ex.target for ex in examples],
        "candidates": [list(ex.candidate_ids) for ex in examples],
        "scores": [row.tolist() for row in scores],
        "reranked": [[ex.candidate_ids[j] for j in order] for ex, order in zip(examples, ranked)],
        "target_rank": ranks,
        "retriever_rank": [ex.retriever_positions[ex.label_index] if ex.label_index >= 0 else -1 for ex in examples],
    })


def score_split(cfg: RunConfig, split: str) -> dict:
    """Reload the best adapter from disk, score every user of ``split``, write rankings and metrics."""
    from rerank_dist.data.prepare import load_dataset
    from rerank_dist.examples import build_examples, tokenize_examples
    from rerank_dist.modeling import load_for_scoring, load_tokenizer

    paths = RunPaths(Path(cfg.run_dir))
    accelerator = Accelerator()
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
    examples, stats = build_examples(candidates, dataset, cfg.prompt, labels, tokenizer, split, dataset.num_items)
    token_lists = tokenize_examples(examples, tokenizer)
    label_ids = torch.tensor(verbalizer["label_ids"], dtype=torch.long)
    model = load_for_scoring(cfg.model, adapter_dir, device=accelerator.device)

    scores = score_prompts(accelerator, model, token_lists, label_ids, tokenizer.pad_token_id, cfg.score.batch_size)
    result = {}
    if accelerator.is_main_process:
        result = evaluate_scores(examples, scores, seed=cfg.prompt.seed)
        result["split"] = split
        result["adapter"] = str(adapter_dir)
        result["adapter_step"] = verbalizer.get("step")
        result["scored_all_users"] = not cfg.score.max_users
        result["prompt_stats"] = stats
        result["seconds"] = round(time.time() - started, 1)
        result["prompts_per_second"] = round(len(examples) / max(result["seconds"], 1e-9), 3)
        write_parquet(paths.rankings(split), rankings_frame(examples, scores))
        write_json(paths.metrics(split), result)
    accelerator.wait_for_everyone()
    return result
