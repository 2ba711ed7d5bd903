"""Column roles of foreign tables and the names each is found under (case-insensitive, first match
wins); `--column ROLE=NAME` overrides a guess. Kept free of heavy imports: the CLI's help lists them."""

from __future__ import annotations

ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "user": ("user", "user_id", "userid", "uid", "session_id", "query_id"),
    "candidates": ("candidates", "candidate_ids", "candidate_items", "cands", "candidate_list", "items"),
    "scores": ("scores", "candidate_scores", "logits", "probs", "probabilities", "score"),
    "ranked": ("reranked", "ranked", "ranking", "ranked_items", "ranked_candidates", "predictions", "prediction",
               "preds", "pred", "recommended", "top_k"),
    "target": ("target", "target_item", "target_id", "ground_truth", "gt", "positive", "next_item", "label",
               "answer"),
    "retriever_scores": ("retriever_scores", "retrieval_scores", "retriever_score"),
    "retriever_rank": ("retriever_rank", "retrieval_rank"),
    "prompt": ("prompt", "input", "query", "instruction"),
    "completion": ("completion", "response", "output", "answer", "label", "target_letter"),
    "text": ("text",),
    "messages": ("messages", "conversations"),
    "negatives": ("negatives", "negative_source", "negatives_source"),
}
