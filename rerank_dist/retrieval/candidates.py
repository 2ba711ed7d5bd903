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
from rerank_dist.retrieval.scoring import batch_starts, full_catalogue_ranks, masked_catalogue_scores
from rerank_dist.retrieval.sequences import split_examples

COLUMNS = ["user", "prefix_len", "target", "candidates", "retriever_scores", "target_rank"]
INT_COLUMNS = ["user", "prefix_len", "target", "target_rank"]
TEST_KS = (5, 10, 20)


def generate_candidates(model: LRURec, sequences: Mapping[int, Sequence[int]], split: str, top_k: int,
                        max_len: int, train_prefixes_per_user: int = 1, batch_size: int = 32,
                        starts: Sequence[int] | None = None) -> pd.DataFrame:
    """Top-K candidates for every example of a split (see the module docstring for the columns).

    starts: which batches of the split's examples to compute (``scoring.batch_starts``; default all),
    rows in that order: the frames of disjoint shares of the starts, concatenated in order, equal the
    whole split's frame exactly.
    """
    examples = split_examples(sequences, split, train_prefixes_per_user)
    histories = [list(sequences[u][:n]) for u, n in examples]
    # Over every history, not only this share's: each process then refuses the same inputs alike.
    _check_enough_items(model.num_items, histories, top_k)
    starts = batch_starts(len(examples), batch_size) if starts is None else list(starts)
    rows = [i for start in starts for i in range(start, min(start + batch_size, len(examples)))]
    ids, scores = [], []
    for batch_scores in masked_catalogue_scores(model, histories, max_len, batch_size, starts):
        values, indices = torch.topk(batch_scores, top_k, dim=1)  # (b, K) each, best first
        ids.extend(indices.cpu().tolist())
        scores.extend(values.cpu().tolist())
    targets = [int(sequences[examples[i][0]][examples[i][1]]) for i in rows]
    frame = pd.DataFrame({
        "user": [examples[i][0] for i in rows],
        "prefix_len": [examples[i][1] for i in rows],
        "target": targets,
        "candidates": ids,
        "retriever_scores": scores,
        "target_rank": [c.index(t) if t in c else MISS for c, t in zip(ids, targets)],
    }, columns=COLUMNS)
    # Integer columns stay int64 in an empty share too, so shares concatenate to the one-process types.
    return frame.astype({c: "int64" for c in INT_COLUMNS})


def concat_candidates(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """One split's frame from its shares' frames (in order), as generate_candidates makes it at once."""
    kept = [f for f in frames if len(f)] or list(frames[:1])
    return pd.concat(kept, ignore_index=True) if len(kept) > 1 else kept[0].reset_index(drop=True)


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


def ranks_on_test_split(model: LRURec, sequences: Mapping[int, Sequence[int]], max_len: int,
                        batch_size: int = 32, starts: Sequence[int] | None = None) -> np.ndarray:
    """Full-catalogue rank of each test target -> (N,) ints; starts: which batches (default all), as in
    generate_candidates, so shares' ranks concatenate to the whole split's."""
    examples = split_examples(sequences, "test")
    histories = [list(sequences[u][:n]) for u, n in examples]
    targets = [int(sequences[u][n]) for u, n in examples]
    return full_catalogue_ranks(model, histories, targets, max_len, batch_size, starts)


def _check_enough_items(num_items: int, histories: list[list[int]], top_k: int) -> None:
    """Every example needs top_k items outside its history, or its candidate list would hold excluded ones."""
    fewest = num_items - max((len(set(h)) for h in histories), default=0)
    if top_k > fewest:
        raise ValueError(f"top_k={top_k}, but some history leaves only {fewest} of {num_items} items to retrieve")
