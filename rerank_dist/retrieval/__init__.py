"""The LRURec retriever: model, training, top-K candidate generation, and the retrieve stage."""

from rerank_dist.retrieval.candidates import (
    generate_candidates,
    retriever_test_metrics,
    target_in_top_k,
    ranks_on_test_split,
)
from rerank_dist.retrieval.checkpoint import (
    checkpoint_matches,
    load_retriever,
    read_retriever_config,
    save_retriever,
)
from rerank_dist.retrieval.lrurec import LRURec, parallel_scan
from rerank_dist.retrieval.scoring import full_catalogue_ranks, masked_catalogue_scores
from rerank_dist.retrieval.sequences import split_examples
from rerank_dist.retrieval.stage import run_retriever_stage
from rerank_dist.retrieval.train import TrainSummary, train_retriever

__all__ = [
    "LRURec",
    "TrainSummary",
    "checkpoint_matches",
    "full_catalogue_ranks",
    "generate_candidates",
    "load_retriever",
    "masked_catalogue_scores",
    "parallel_scan",
    "read_retriever_config",
    "retriever_test_metrics",
    "run_retriever_stage",
    "save_retriever",
    "split_examples",
    "target_in_top_k",
    "ranks_on_test_split",
    "train_retriever",
]
