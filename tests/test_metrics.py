import math

import numpy as np
import pytest

from rerank_dist.metrics import (MISS, is_order_invariant, metrics_from_ranks, paired_bootstrap, paired_comparison,
                                 per_user, ranked_order, ranking_report, target_ranks)


def test_target_ranks_and_pessimistic_ties():
    scores = np.array([[0.1, 0.9, 0.5],    # target index 2 -> one better (0.9) -> rank 1
                       [1.0, 1.0, 1.0],    # all tied: pessimistic rank 2, never 0
                       [0.3, 0.2, 0.1]])   # target absent -> miss
    ranks = target_ranks(scores, np.array([2, 0, -1]))
    assert ranks.tolist() == [1, 2, MISS]


def test_metrics_hand_computed():
    # ranks: 0 (hit at top), 3, 12 (beyond @10), miss
    m = metrics_from_ranks(np.array([0, 3, 12, MISS]), ks=(1, 5, 10))
    assert m["recall@1"] == pytest.approx(1 / 4)
    assert m["recall@5"] == pytest.approx(2 / 4)
    assert m["recall@10"] == pytest.approx(2 / 4)
    assert m["ndcg@5"] == pytest.approx((1.0 + 1 / math.log2(5)) / 4)
    assert m["mrr@10"] == pytest.approx((1.0 + 1 / 4) / 4)
    assert m["mrr@1"] == pytest.approx(1 / 4)


def test_report_counts_misses_and_marks_blind_k():
    ranks = np.array([0, 1, MISS, MISS])
    rep = ranking_report(ranks, num_candidates=5, ks=(1, 5, 10))
    assert rep["num_users"] == 4 and rep["num_retrieved"] == 2
    assert rep["all_users"]["recall@5"] == pytest.approx(0.5)       # misses count as zeros
    assert rep["retrieved_subset"]["recall@5"] == pytest.approx(1.0)
    assert "recall@5" in rep["ranking_blind"] and "recall@10" in rep["ranking_blind"]
    assert "recall@1" not in rep["ranking_blind"]


def test_recall_at_num_candidates_is_order_invariant():
    rng = np.random.default_rng(0)
    target_index = rng.integers(-1, 20, size=200)
    a = metrics_from_ranks(target_ranks(rng.random((200, 20)), target_index), ks=(20,))
    b = metrics_from_ranks(target_ranks(rng.random((200, 20)), target_index), ks=(20,))
    assert a["recall@20"] == b["recall@20"]  # why the report marks @K >= K as ranking-blind


# ---------------------------------------------------------------- which metrics are blind to the order


def test_ndcg_and_mrr_at_num_candidates_still_see_the_order_recall_does_not():
    rng = np.random.default_rng(1)
    target_index = rng.integers(-1, 20, size=300)
    scores = rng.random((300, 20))
    good = scores.copy()
    good[np.arange(300), np.maximum(target_index, 0)] = 2.0  # the target first wherever it is present
    a = metrics_from_ranks(target_ranks(scores, target_index), ks=(20,))
    b = metrics_from_ranks(target_ranks(good, target_index), ks=(20,))
    assert a["recall@20"] == b["recall@20"]
    assert b["ndcg@20"] > a["ndcg@20"] + 0.1 and b["mrr@20"] > a["mrr@20"] + 0.1
    rep = ranking_report(target_ranks(scores, target_index), num_candidates=20, ks=(5, 10, 20))
    assert rep["ranking_blind"] == ["recall@20"]  # NDCG@20 and MRR@20 are not blind over 20 candidates


def test_blind_list_is_only_recall_at_or_above_the_candidate_count():
    rep = ranking_report(np.array([0, 3, MISS]), num_candidates=5, ks=(1, 5, 10))
    assert rep["ranking_blind"] == ["recall@5", "recall@10"]
    assert is_order_invariant("hit@5", 5) and is_order_invariant("precision@7", 5)
    assert not is_order_invariant("ndcg@5", 5) and not is_order_invariant("recall@4", 5)


# ---------------------------------------------------------------- the displayed order agrees with the rank


def _check_order_matches_ranks(scores, target_index):
    order = ranked_order(scores, target_index)
    ranks = target_ranks(scores, target_index)
    assert order.shape == np.shape(scores)
    for u, row in enumerate(order.tolist()):
        assert sorted(row) == list(range(np.shape(scores)[1]))  # a permutation of the positions
        if target_index[u] >= 0:
            assert row.index(target_index[u]) == ranks[u]


def test_ranked_order_puts_the_target_where_target_ranks_counts_it():
    rng = np.random.default_rng(2)
    # few distinct values: many ties, including ties with the target
    scores = rng.integers(0, 4, size=(500, 20)).astype(np.float32)
    target_index = rng.integers(-1, 20, size=500)
    _check_order_matches_ranks(scores, target_index)
    _check_order_matches_ranks(rng.random((100, 7)), rng.integers(-1, 7, size=100))


def test_ranked_order_with_constant_scores_puts_the_target_last_and_keeps_the_display_order():
    scores = np.ones((3, 5))
    target_index = np.array([0, 2, -1])
    order = ranked_order(scores, target_index)
    assert order.tolist() == [[1, 2, 3, 4, 0], [0, 1, 3, 4, 2], [0, 1, 2, 3, 4]]
    _check_order_matches_ranks(scores, target_index)


def test_ranked_order_best_first_with_stable_ties_and_infinite_padding():
    scores = np.array([[0.1, 0.9, 0.5, 0.9, -np.inf]])
    assert ranked_order(scores, np.array([1])).tolist() == [[3, 1, 2, 0, 4]]  # target 1 after its tie 3
    assert ranked_order(scores, np.array([3])).tolist() == [[1, 3, 2, 0, 4]]
    assert ranked_order(scores, np.array([-1])).tolist() == [[1, 3, 2, 0, 4]]  # plain stable order
    with pytest.raises(ValueError):
        ranked_order(np.array([[0.1, np.nan]]), np.array([0]))


# ---------------------------------------------------------------- per-user metrics and paired comparisons


def test_per_user_values_average_to_the_reported_metrics():
    ranks = np.array([0, 3, 12, MISS, 7, 1])
    reported = metrics_from_ranks(ranks, ks=(1, 5, 10))
    for name, value in reported.items():
        assert per_user(ranks, name).mean() == pytest.approx(value)
    assert per_user(ranks, "ndcg@10").tolist() == pytest.approx(
        [1.0, 1 / math.log2(5), 0.0, 0.0, 1 / math.log2(9), 1 / math.log2(3)])
    assert per_user(ranks, "hit@5").tolist() == per_user(ranks, "recall@5").tolist()
    assert per_user(ranks, "precision@5").tolist() == pytest.approx([0.2, 0.2, 0, 0, 0, 0.2])
    with pytest.raises(ValueError):
        per_user(ranks, "map@10")


def test_paired_comparison_of_an_order_with_itself_is_exactly_zero():
    ranks = np.random.default_rng(3).integers(-1, 20, size=400)
    out = paired_comparison(ranks, ranks.copy(), metrics=("ndcg@10", "recall@5", "mrr@10"))
    for entry in out.values():
        assert entry["diff"] == 0.0 and entry["low"] == 0.0 and entry["high"] == 0.0
        assert entry["p_better"] == 0.0 and entry["a"] == entry["b"]


def test_paired_comparison_finds_a_clearly_better_order():
    rng = np.random.default_rng(4)
    target_index = np.where(rng.random(2000) < 0.2, rng.integers(0, 20, size=2000), -1)  # ~20% retrieved
    noise = rng.random((2000, 20))
    good = noise.copy()
    boost = rng.random(2000) < 0.5  # half the retrieved targets moved to the top
    good[np.arange(2000), np.maximum(target_index, 0)] += np.where(boost, 1.0, 0.0)
    a, b = target_ranks(good, target_index), target_ranks(noise, target_index)
    out = paired_comparison(a, b, resamples=1000, seed=0)
    for metric, entry in out.items():
        assert entry["low"] > 0 and entry["high"] > entry["low"], metric
        assert entry["diff"] == pytest.approx(entry["a"] - entry["b"])
        assert entry["low"] <= entry["diff"] <= entry["high"]
        assert entry["p_better"] == 1.0
    assert out["ndcg@10"]["a"] == pytest.approx(metrics_from_ranks(a, ks=(10,))["ndcg@10"])
    reverse = paired_comparison(b, a, resamples=1000, seed=0)
    assert reverse["ndcg@10"]["high"] < 0 and reverse["ndcg@10"]["p_better"] == 0.0


def test_paired_comparison_is_deterministic_for_a_seed_and_counts_every_user():
    rng = np.random.default_rng(5)
    a, b = rng.integers(-1, 20, size=300), rng.integers(-1, 20, size=300)
    first = paired_comparison(a, b, seed=7)
    assert first == paired_comparison(a, b, seed=7)
    assert first != paired_comparison(a, b, seed=8)
    # misses are zeros in the mean over all users, not dropped
    assert first["recall@5"]["a"] == pytest.approx(((a >= 0) & (a < 5)).sum() / 300)
    empty = paired_comparison(np.array([], dtype=int), np.array([], dtype=int))
    assert math.isnan(empty["ndcg@10"]["diff"])
    with pytest.raises(ValueError):
        paired_comparison(a, b[:10])


def test_paired_bootstrap_interval_and_the_doctor_uses_the_same_function():
    from rerank_dist.doctor import stats

    assert stats.paired_bootstrap is paired_bootstrap
    diff = np.random.default_rng(6).normal(0.05, 0.2, size=500)
    mean, low, high = paired_bootstrap(diff, 2000, 0)
    assert mean == pytest.approx(diff.mean()) and low < mean < high
    assert (mean, low, high) == paired_bootstrap(diff, 2000, 0)
    # the interval's width is about that of the normal approximation: 2 x 1.96 standard errors
    assert high - low == pytest.approx(2 * 1.96 * diff.std() / math.sqrt(len(diff)), rel=0.15)
