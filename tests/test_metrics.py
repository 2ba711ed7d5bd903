import math

import numpy as np
import pytest

from rerank_dist.metrics import MISS, metrics_from_ranks, ranking_report, target_ranks


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
