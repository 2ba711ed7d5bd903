"""Orders of the displayed candidates, evaluated on examples: which validation users can compare
orders, reports next to the retriever-order and random-order baselines, paired comparisons, and the
rankings table the scorer writes.

Pure numpy / pandas on examples (anything with ``label_index``, ``retriever_positions``,
``candidate_ids``, ``user``, ...); the metrics themselves are ``metrics.py``'s.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from rerank_dist.metrics import paired_comparison, ranked_order, ranking_report, target_ranks


def validation_users(candidates: pd.DataFrame, limit: int = 0) -> tuple[pd.DataFrame, str]:
    """The validation users on which orders are compared (training's selection of best/ and the
    fusion weight alike), with one line saying which they are.

    Those whose target the retriever found: a user whose target is missing scores 0 under every
    order, so adding them only dilutes a comparison (64 users would hold ~13 useful ones). The first
    ``limit`` of them when limit > 0.

    When the retriever found no validation target at all, no order can beat another on validation.
    The selection is then the first validation user alone (a prompt still to probe the label tokens
    with), and the line says what follows: every validation scores 0, so best/ holds the first
    validation's adapter and the fusion weight is the largest of the grid (the retriever's order, by
    the tie rule of ``fusion.choose_fusion_weight``).
    """
    if len(candidates) == 0:
        raise ValueError("no validation users in the retriever's candidates (candidates_val.parquet is empty)")
    found = candidates[candidates["target_rank"] >= 0] if "target_rank" in candidates else candidates
    if len(found) == 0:
        return candidates.head(1), (
            f"WARNING: the retriever found the target of none of the {len(candidates)} validation users, so "
            f"validation cannot tell orders apart (every order scores 0); using the first user alone: best/ "
            f"will be the first validation's adapter and the fusion weight the largest (the retriever's order)")
    chosen = found.head(limit) if limit else found
    return chosen, (f"{len(chosen)} of {len(candidates)} validation users, those whose target the retriever "
                    f"found (the others score 0 under any order)")


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
