"""Combining orders: the LLM's label scores averaged over display orders, and fused with the retriever's.

Pure numpy on examples (anything with ``label_index``, ``candidate_ids``, ``retriever_scores``):

* ``log_probs`` / ``to_display_order``: score.permutations scores the same prompts under several
  display orders; each order's label logits become log-probabilities over the K labels and are put
  back into the first order's layout (by item id) before they are averaged.
* ``fuse``: (1 - w) * z(LLM) + w * z(retriever), per user. Both sides are z-scored per user, so the
  weight trades orders, not scales: w = 0 is the LLM's order, w = 1 the retriever's.
* ``choose_fusion_weight``: w from a grid by validation NDCG@10 (never test), ties to the retriever.
"""

from __future__ import annotations

import numpy as np

from rerank_dist.metrics import metrics_from_ranks, target_ranks


def log_probs(scores: np.ndarray) -> np.ndarray:
    """Label logits (N, K) -> log-probabilities over the K labels (N, K), float64."""
    x = np.asarray(scores, dtype=np.float64)
    top = x.max(axis=1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=1, keepdims=True))


def to_display_order(base_examples, examples, scores: np.ndarray) -> np.ndarray:
    """Scores (N, K) of ``examples`` (another display order of the same prompts) rearranged into
    ``base_examples``' display order, by item id."""
    out = np.empty_like(scores)
    for n, (base, other) in enumerate(zip(base_examples, examples)):
        where = {item: j for j, item in enumerate(other.candidate_ids)}
        out[n] = scores[n, [where[item] for item in base.candidate_ids]]
    return out


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
