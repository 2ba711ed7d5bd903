"""Top-K candidates per example, and the retriever's own full-catalogue test metrics.

Candidates are the K best-scored items over the whole catalogue with the example's whole
history excluded (LlamaRec's protocol). One row per (user, prefix_len) example:
user, prefix_len, target, candidates (K ids, best first), retriever_scores (K floats),
target_rank (0-based position of the target in candidates, -1 when it was not retrieved).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from rerank_dist.metrics import MISS, metrics_from_ranks
from rerank_dist.retrieval.lrurec import LRURec
from rerank_dist.retrieval.scoring import full_catalogue_ranks, masked_catalogue_scores
from rerank_dist.retrieval.sequences import split_examples

COLUMNS = ["user", "prefix_len", "target", "candidates", "retriever_scores", "target_rank"]
TEST_KS = (5, 10, 20)


def generate_candidates(model: LRURec, sequences: Mapping[int, Sequence[int]], split: str, top_k: int,
                        max_len: int, train_prefixes_per_user: int = 1, batch_size: int = 32) -> pd.DataFrame:
    """Top-K candidates for every example of a split (see the module docstring for the columns)."""
    examples = split_examples(sequences, split, train_prefixes_per_user)
    histories = [list(sequences[u][:n]) for u, n in examples]
    targets = [int(sequences[u][n]) for u, n in examples]
    _check_enough_items(model.num_items, histories, top_k)
    ids, scores = [], []
    for batch_scores in masked_catalogue_scores(model, histories, max_len, batch_size):
        values, indices = torch.topk(batch_scores, top_k, dim=1)  # (b, K) each, best first
        ids.extend(indices.tolist())
        scores.extend(values.tolist())
    return pd.DataFrame({
        "user": [u for u, _ in examples],
        "prefix_len": [n for _, n in examples],
        "target": targets,
        "candidates": ids,
        "retriever_scores": scores,
        "target_rank": [c.index(t) if t in c else MISS for c, t in zip(ids, targets)],
    }, columns=COLUMNS)


def target_in_top_k(frame: pd.DataFrame) -> float:
    """Share of examples whose target was retrieved (the ceiling for any reranker's Recall@K)."""
    return float((frame["target_rank"] >= 0).mean()) if len(frame) else float("nan")


def retriever_test_metrics(model: LRURec, sequences: Mapping[int, Sequence[int]], max_len: int,
                           ks: tuple[int, ...] = TEST_KS) -> dict[str, float]:
    """Recall/NDCG/MRR@ks of the test target ranked over the whole catalogue, history excluded.

    Every user with a test example counts (LlamaRec reports LRURec this way).
    """
    ranks = ranks_on_test_split(model, sequences, max_len)
    return metrics_from_ranks(ranks, ks=ks)


def ranks_on_test_split(model: LRURec, sequences: Mapping[int, Sequence[int]], max_len: int) -> np.ndarray:
    examples = split_examples(sequences, "test")
    histories = [list(sequences[u][:n]) for u, n in examples]
    targets = [int(sequences[u][n]) for u, n in examples]
    return full_catalogue_ranks(model, histories, targets, max_len)


def _check_enough_items(num_items: int, histories: list[list[int]], top_k: int) -> None:
    """Every example needs top_k items outside its history, or its candidate list would hold excluded ones."""
    fewest = num_items - max((len(set(h)) for h in histories), default=0)
    if top_k > fewest:
        raise ValueError(f"top_k={top_k}, but some history leaves only {fewest} of {num_items} items to retrieve")
