"""Where each stage reads and writes inside a run directory (one place, so stages agree)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def retriever(self) -> Path:
        return self.root / "retriever"

    def candidates(self, split: str) -> Path:
        return self.retriever / f"candidates_{split}.parquet"

    @property
    def ranker(self) -> Path:
        return self.root / "ranker"

    @property
    def train_log(self) -> Path:
        return self.ranker / "train_log.jsonl"

    @property
    def best(self) -> Path:
        return self.ranker / "best"

    def step_dir(self, step: int) -> Path:
        return self.ranker / f"step-{step:06d}"

    def scores(self, split: str) -> Path:
        return self.root / "scores" / split

    def rankings(self, split: str) -> Path:
        return self.root / f"rankings_{split}.parquet"

    def metrics(self, split: str) -> Path:
        return self.root / f"metrics_{split}.json"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def report(self) -> Path:
        return self.root / "report.md"


def cache_dir(configured: str = "") -> Path:
    """Cache for converted weights and downloads: config value, then $RERANK_DIST_CACHE, then ~/.cache."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("RERANK_DIST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rerank_dist"
