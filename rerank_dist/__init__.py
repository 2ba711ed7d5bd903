"""rerank_dist: LRURec retriever -> LLM reranker with a letter verbalizer, trained and scored with Accelerate."""

__version__ = "0.1.0"
