"""Small statistics the checks need, in numpy alone (no scipy): curve windows, a chi-square tail,
a paired bootstrap over users, Jensen-Shannon divergence, and expected metrics of a random order."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# The paired bootstrap and per-user metrics live with the metrics (the report uses them too); the checks
# call them through this module, so stats.paired_bootstrap is metrics.paired_bootstrap.
from rerank_dist.metrics import paired_bootstrap, per_user  # noqa: F401  (re-exported)


# ---------------------------------------------------------------- curves


def window_size(n: int) -> int:
    """Points averaged at each end of a curve: a fifth of it (noisy per-step losses), 1 to 50."""
    return max(1, min(50, n // 5))


def moving_average(values: np.ndarray, width: int) -> np.ndarray:
    """Means of every run of `width` consecutive values: (n - width + 1,)."""
    values = np.asarray(values, dtype=np.float64)
    if width <= 1 or len(values) < width:
        return values.copy() if width <= 1 else np.array([values.mean()]) if len(values) else values
    kernel = np.ones(width) / width
    return np.convolve(values, kernel, mode="valid")


def ends(values: np.ndarray) -> tuple[float, float, int]:
    """(mean of the first window, mean of the last window, window size)."""
    values = np.asarray(values, dtype=np.float64)
    w = window_size(len(values))
    return float(values[:w].mean()), float(values[-w:].mean()), w


# ---------------------------------------------------------------- distributions


def _gammaincc(a: float, x: float) -> float:
    """Regularized upper incomplete gamma Q(a, x) (series below a + 1, continued fraction above)."""
    if x <= 0:
        return 1.0
    gln = math.lgamma(a)
    if x < a + 1.0:
        term = total = 1.0 / a
        ap = a
        for _ in range(1000):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(-x + a * math.log(x) - gln))
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return min(1.0, math.exp(-x + a * math.log(x) - gln) * h)


def uniformity_p_value(counts: Sequence[int]) -> float:
    """Chi-square goodness-of-fit p-value of counts against equal shares (1.0 when undefined)."""
    counts = np.asarray(counts, dtype=np.float64)
    n, k = counts.sum(), len(counts)
    if k < 2 or n <= 0:
        return 1.0
    expected = n / k
    stat = float(((counts - expected) ** 2 / expected).sum())
    return _gammaincc((k - 1) / 2.0, stat / 2.0)


def entropy(counts: Sequence[int]) -> float:
    """Shannon entropy in nats of the distribution the counts describe."""
    p = np.asarray(counts, dtype=np.float64)
    p = p[p > 0] / p.sum() if p.sum() > 0 else p[:0]
    return float(-(p * np.log(p)).sum())


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence in bits, 0 (same) to 1 (disjoint)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        keep = a > 0
        return float((a[keep] * np.log2(a[keep] / b[keep])).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


# ---------------------------------------------------------------- ranking


def ndcg_at(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user NDCG@k from 0-based target ranks (-1 = target not among the candidates): (U,)."""
    return per_user(ranks, f"ndcg@{k}")


def expected_random_ndcg(present: np.ndarray, num_candidates: np.ndarray, k: int) -> np.ndarray:
    """Per-user NDCG@k expected under a uniformly random order of that user's N candidates: (U,).

    Exact, so the random baseline carries no sampling noise of its own into the comparison.
    """
    present = np.asarray(present, dtype=bool)
    num_candidates = np.asarray(num_candidates, dtype=np.int64)
    gains = 1.0 / np.log2(np.arange(max(int(num_candidates.max(initial=1)), k)) + 2.0)  # gain at each rank
    cumulative = np.concatenate([[0.0], np.cumsum(gains)])
    top = np.minimum(num_candidates, k)
    return np.where(present, cumulative[top] / np.maximum(num_candidates, 1), 0.0)
