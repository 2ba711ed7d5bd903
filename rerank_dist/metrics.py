"""Ranking metrics that cannot lie: pure functions of the target's rank.

Conventions (LlamaRec protocol): every user counts; a user whose target is not among the
candidates is a miss (rank = -1) and scores 0 on every metric. Ties are broken *against* the
target, so a constant scorer cannot look good. Ranks are 0-based.
"""

from __future__ import annotations

import numpy as np

MISS = -1


def target_ranks(scores: np.ndarray, target_index: np.ndarray) -> np.ndarray:
    """Rank of each row's target among its candidates.

    scores: (U, N) higher is better; target_index: (U,) position of the target in the row,
    or -1 when the target is not among the candidates. Returns (U,) int ranks, -1 for misses.
    """
    scores = np.asarray(scores, dtype=np.float64)
    target_index = np.asarray(target_index, dtype=np.int64)
    if scores.ndim != 2 or target_index.shape != (scores.shape[0],):
        raise ValueError(f"expected scores (U, N) and target_index (U,), got {scores.shape} and {target_index.shape}")
    present = target_index >= 0
    safe = np.where(present, target_index, 0)
    target_scores = scores[np.arange(len(scores)), safe][:, None]  # (U, 1)
    better = (scores > target_scores).sum(axis=1)
    tied = (scores == target_scores).sum(axis=1) - 1  # other candidates with the same score
    return np.where(present, better + tied, MISS)


def metrics_from_ranks(ranks: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K, NDCG@K, MRR@K averaged over all rows (misses count as 0)."""
    ranks = np.asarray(ranks)
    out: dict[str, float] = {}
    if len(ranks) == 0:
        return {f"{m}@{k}": float("nan") for k in ks for m in ("recall", "ndcg", "mrr")}
    hit_rank = np.where(ranks >= 0, ranks, np.iinfo(np.int64).max // 2).astype(np.float64)
    for k in ks:
        hit = hit_rank < k
        out[f"recall@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(hit_rank + 2.0), 0.0).mean())
        out[f"mrr@{k}"] = float(np.where(hit, 1.0 / (hit_rank + 1.0), 0.0).mean())
    return out


def ranking_report(ranks: np.ndarray, num_candidates: int, ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """Metrics over all users and over the users whose target was retrieved, plus honesty notes.

    Any @K with K >= num_candidates is listed under ``ranking_blind``: there Recall@K is the same for
    every ordering of the candidates (it only measures whether the retriever found the target).
    """
    ranks = np.asarray(ranks)
    retrieved = ranks >= 0
    blind = [f"{m}@{k}" for k in ks if k >= num_candidates for m in ("recall", "ndcg", "mrr")]
    return {
        "num_users": int(len(ranks)),
        "num_retrieved": int(retrieved.sum()),
        "retrieval_rate": float(retrieved.mean()) if len(ranks) else float("nan"),
        "num_candidates": int(num_candidates),
        "all_users": metrics_from_ranks(ranks, ks),
        "retrieved_subset": metrics_from_ranks(ranks[retrieved], ks),
        "ranking_blind": blind,
    }
