"""Leave-one-out splits, as one convention shared by every stage.

An example is ``(user, prefix_len)``: the history is ``seq[:prefix_len]`` and the target is
``seq[prefix_len]``. With ``n = len(seq)``:

* test:  prefix_len = n - 1  (the input is train + validation items, as in LlamaRec);
* val:   prefix_len = n - 2;
* train: prefix_len = n - 3, and further training prefixes n - 3 - j for j = 1, 2, ...

so no training example ever sees the validation or test target. The retriever trains on
``seq[:-2]`` (every position of it), which holds exactly the same items
(``rerank_dist.retrieval.sequences.retriever_training_sequences``).
"""

from __future__ import annotations

SPLITS = ("train", "val", "test")
# Offset of each split's target from the end of the sequence.
_OFFSET = {"test": 1, "val": 2, "train": 3}
# One training, one validation and one test item.
MIN_SEQ_LEN = 3


def prefix_len_for(seq_len: int, split: str, j: int = 0) -> int:
    """History length of the example for ``split`` (``j`` picks earlier training prefixes).

    Raises ValueError when that example would have no history (prefix_len < 1).
    """
    if split not in _OFFSET:
        raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    if j < 0 or (j and split != "train"):
        raise ValueError(f"j: expected 0 for {split} and >= 0 for train, got {j}")
    prefix_len = seq_len - _OFFSET[split] - j
    if prefix_len < 1:
        raise ValueError(f"a sequence of {seq_len} items has no {split} example with j={j} "
                         f"(its history would be empty)")
    return prefix_len


def train_prefix_lens(seq_len: int, count: int) -> list[int]:
    """Up to ``count`` training prefix lengths, latest first, skipping those with an empty history.

    ``count=0`` means every prefix (LlamaRec's training set): prefix_len = n-3, n-4, ..., 1, one
    example per position of the training sequence seq[:-2] that has a non-empty history.
    """
    latest = seq_len - _OFFSET["train"]
    count = count if count > 0 else max(latest, 0)
    return [p for p in (latest - j for j in range(count)) if p >= 1]


def history_and_target(seq: list[int], prefix_len: int) -> tuple[list[int], int]:
    return seq[:prefix_len], seq[prefix_len]

