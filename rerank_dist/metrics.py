"""Ranking metrics that cannot lie: pure functions of the target's rank.

Conventions (LlamaRec protocol): every user counts; a user whose target is not among the
candidates is a miss (rank = -1) and scores 0 on every metric. Ties are broken *against* the
target, so a constant scorer cannot look good. Ranks are 0-based.

Pure numpy on purpose: the doctor and the report import this without torch.
"""

from __future__ import annotations

import re

import numpy as np

MISS = -1
# Metric families whose value at K >= number of candidates is the same for every order of the
# candidates: they only ask "is the target in the top K?", and the top K is then the whole list.
# NDCG and MRR are not among them: they weigh *where* in the list the target is, at any K.
ORDER_INVARIANT = ("recall", "hit", "precision")
FAMILIES = ("recall", "hit", "precision", "ndcg", "mrr")
_NAME = re.compile(r"^(recall|hit|precision|ndcg|mrr)@(\d+)$")


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


def ranked_order(scores: np.ndarray, target_index: np.ndarray) -> np.ndarray:
    """Candidate positions best first, ties broken exactly as ``target_ranks`` breaks them.

    scores: (U, N) higher is better; target_index: (U,) the target's position, -1 if absent.
    Returns (U, N) int64: row u lists the positions 0..N-1 of user u's candidates, best first.
    Equal scores keep their displayed order, except that the target goes after every candidate
    it ties with (pessimistic, like ``target_ranks``), so for every row whose target is present
    ``ranked_order(s, t)[u].tolist().index(t[u]) == target_ranks(s, t)[u]``: the list a user is
    shown and the rank the metrics count are the same ranking. Scores must not be NaN (+-inf is fine).
    """
    scores = np.asarray(scores, dtype=np.float64)
    target_index = np.asarray(target_index, dtype=np.int64)
    if scores.ndim != 2 or target_index.shape != (scores.shape[0],):
        raise ValueError(f"expected scores (U, N) and target_index (U,), got {scores.shape} and {target_index.shape}")
    if np.isnan(scores).any():
        raise ValueError("ranked_order: NaN scores have no order (target_ranks would count them as misses)")
    is_target = np.arange(scores.shape[1])[None, :] == target_index[:, None]  # (U, N), all False for a miss
    # lexsort: the last key is the primary one, and it is stable, so equal (score, is_target) pairs keep
    # their displayed order. Sorting on -score (not reversing an ascending sort) keeps that stability.
    return np.lexsort((is_target, -scores), axis=-1).astype(np.int64)


def parse_metric(metric: str) -> tuple[str, int]:
    """("ndcg", 10) from "ndcg@10" (any case). Raises ValueError for a name this module cannot compute."""
    m = _NAME.match(metric.strip().lower())
    if not m or int(m.group(2)) < 1:
        raise ValueError(f"unknown metric {metric!r}: expected <family>@<K> with K >= 1, family one of "
                         f"{', '.join(FAMILIES)}")
    return m.group(1), int(m.group(2))


def per_user(ranks: np.ndarray, metric: str) -> np.ndarray:
    """Each user's value of one metric: (U,) float64 from (U,) 0-based target ranks (-1 = miss -> 0).

    metric: "recall@K" (= "hit@K": one target per user), "precision@K" (hit / K), "ndcg@K" (one
    relevant item, so the ideal DCG is 1: 1 / log2(rank + 2) inside the top K), "mrr@K" (1 / (rank + 1)
    inside the top K). The means of these are the numbers ``metrics_from_ranks`` reports.
    """
    family, k = parse_metric(metric)
    ranks = np.asarray(ranks)
    hit = (ranks >= 0) & (ranks < k)
    safe = np.where(hit, ranks, 0).astype(np.float64)  # ranks outside the top K never reach the formulas
    if family in ("recall", "hit"):
        return hit.astype(np.float64)
    if family == "precision":
        return hit / float(k)
    if family == "ndcg":
        return np.where(hit, 1.0 / np.log2(safe + 2.0), 0.0)
    return np.where(hit, 1.0 / (safe + 1.0), 0.0)  # mrr


def metrics_from_ranks(ranks: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K, NDCG@K, MRR@K averaged over all rows (misses count as 0)."""
    ranks = np.asarray(ranks)
    out: dict[str, float] = {}
    for k in ks:
        for family in ("recall", "ndcg", "mrr"):
            name = f"{family}@{k}"
            out[name] = float(per_user(ranks, name).mean()) if len(ranks) else float("nan")
    return out


def is_order_invariant(metric: str, num_candidates: int) -> bool:
    """True when the metric has the same value for every order of num_candidates candidates."""
    family, k = parse_metric(metric)
    return family in ORDER_INVARIANT and k >= num_candidates


def ranking_report(ranks: np.ndarray, num_candidates: int, ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """Metrics over all users and over the users whose target was retrieved, plus honesty notes.

    Recall@K with K >= num_candidates is listed under ``ranking_blind``: it is the same for every
    ordering of the candidates (it only measures whether the retriever found the target). NDCG@K and
    MRR@K are not: they still depend on where in the list the target is.
    """
    ranks = np.asarray(ranks)
    retrieved = ranks >= 0
    reported = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg", "mrr")]
    blind = [name for name in reported if is_order_invariant(name, num_candidates)]
    return {
        "num_users": int(len(ranks)),
        "num_retrieved": int(retrieved.sum()),
        "retrieval_rate": float(retrieved.mean()) if len(ranks) else float("nan"),
        "num_candidates": int(num_candidates),
        "all_users": metrics_from_ranks(ranks, ks),
        "retrieved_subset": metrics_from_ranks(ranks[retrieved], ks),
        "ranking_blind": blind,
    }


# ---------------------------------------------------------------- paired comparisons


def bootstrap_means(values: np.ndarray, resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """Means of rows of per-user values over users resampled with replacement.

    values: (U,) or (M, U); every row is resampled with the *same* users, so M metrics of one
    comparison stay paired with each other. Returns (resamples,) or (M, resamples) float64.
    """
    values = np.asarray(values, dtype=np.float64)
    rows = values[None, :] if values.ndim == 1 else values  # (M, U)
    users = rows.shape[1]
    means = np.empty((len(rows), resamples))
    if users == 0:
        means.fill(np.nan)
        return means[0] if values.ndim == 1 else means
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // users)  # bounded memory: (chunk, U) indices at a time
    for start in range(0, resamples, chunk):
        n = min(chunk, resamples - start)
        idx = rng.integers(0, users, size=(n, users))  # (n, U)
        for m, row in enumerate(rows):
            means[m, start:start + n] = row[idx].mean(axis=1)
    return means[0] if values.ndim == 1 else means


def paired_bootstrap(diff: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-user differences and its 95% percentile interval, resampling users with replacement.

    diff: (U,) per-user differences (a - b on the same users). Returns (mean, low, high); NaNs for no users.
    """
    diff = np.asarray(diff, dtype=np.float64)
    if len(diff) == 0:
        return float("nan"), float("nan"), float("nan")
    low, high = np.percentile(bootstrap_means(diff, resamples, seed), [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def paired_comparison(ranks_a: np.ndarray, ranks_b: np.ndarray, metrics: tuple[str, ...] = ("ndcg@10", "recall@5"),
                      resamples: int = 2000, seed: int = 0) -> dict[str, dict[str, float]]:
    """Order a against order b on the same users: means, difference, 95% interval, share of wins.

    ranks_a, ranks_b: (U,) target ranks of the same users under two orders (-1 = miss: 0 under
    both, and still counted, so the difference is over all users like the headline numbers).
    Returns {metric: {"a", "b", "diff" (= a - b), "low", "high" (95% percentile interval of the
    mean difference over users resampled with replacement), "p_better" (share of resamples in
    which a is ahead)}}. All metrics use the same resampled users; the result depends on seed only.
    """
    ranks_a, ranks_b = np.asarray(ranks_a), np.asarray(ranks_b)
    if ranks_a.shape != ranks_b.shape or ranks_a.ndim != 1:
        raise ValueError(f"expected two (U,) rank arrays of the same users, got {ranks_a.shape} and {ranks_b.shape}")
    a = np.stack([per_user(ranks_a, m) for m in metrics]) if metrics else np.empty((0, len(ranks_a)))  # (M, U)
    b = np.stack([per_user(ranks_b, m) for m in metrics]) if metrics else np.empty((0, len(ranks_b)))  # (M, U)
    means = bootstrap_means(a - b, resamples, seed)  # (M, R)
    out: dict[str, dict[str, float]] = {}
    for i, metric in enumerate(metrics):
        if len(ranks_a) == 0:
            out[metric] = {key: float("nan") for key in ("a", "b", "diff", "low", "high", "p_better")}
            continue
        low, high = np.percentile(means[i], [2.5, 97.5])
        out[metric] = {"a": float(a[i].mean()), "b": float(b[i].mean()), "diff": float((a[i] - b[i]).mean()),
                       "low": float(low), "high": float(high), "p_better": float((means[i] > 0).mean())}
    return out
