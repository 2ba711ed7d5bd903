"""Datasets: raw sources (bundled, download + checksum, local files), preprocessing, splits.

``prepare_data`` turns a ``DataConfig`` into ``items.parquet``, ``sequences.parquet`` and
``meta.json``; ``load_dataset`` reads them back; ``splits`` fixes the leave-one-out convention
that every later stage shares.
"""

from __future__ import annotations

from rerank_dist.data.errors import DataError
from rerank_dist.data.prepare import Dataset, load_dataset, prepare_data
from rerank_dist.data.splits import (
    MIN_SEQ_LEN,
    history_and_target,
    prefix_len_for,
    train_prefix_lens,
)

__all__ = [
    "DataError",
    "Dataset",
    "MIN_SEQ_LEN",
    "history_and_target",
    "load_dataset",
    "prefix_len_for",
    "prepare_data",
    "train_prefix_lens",
]
