"""Turning item sequences into the retriever's inputs: split examples, training windows, padding.

The split convention is the project's (rerank_dist.data.splits): an example is (user, prefix_len)
with history seq[:prefix_len] and target seq[prefix_len]. The retriever trains on seq[:-2], so
neither a validation nor a test target is ever one of its training labels.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from rerank_dist.data.splits import SPLITS, prefix_len_for, train_prefix_lens
from rerank_dist.retrieval.lrurec import PAD


def split_examples(sequences: Mapping[int, Sequence[int]], split: str,
                   train_prefixes_per_user: int = 1) -> list[tuple[int, int]]:
    """(user, prefix_len) pairs for a split, users ascending; users too short for it are skipped."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    examples = []
    for user in sorted(sequences):
        n = len(sequences[user])
        if split == "train":
            examples.extend((user, p) for p in train_prefix_lens(n, train_prefixes_per_user))
        elif n - (1 if split == "test" else 2) >= 1:
            examples.append((user, prefix_len_for(n, split)))
    return examples


def retriever_training_sequences(sequences: Mapping[int, Sequence[int]], held_out: int = 2) -> list[list[int]]:
    """seq[:-held_out] of every user with anything left, users ascending.

    held_out=2 keeps back the validation and test targets; more also keeps back the latest
    training-prefix targets (for a retriever that must not have seen them).
    """
    return [list(sequences[u][:-held_out]) for u in sorted(sequences) if len(sequences[u]) > held_out]


def training_windows(sequences: Sequence[Sequence[int]], max_len: int,
                     sliding_step: int | None = None) -> list[list[int]]:
    """Windows of at most max_len items to train on; long sequences are cut from the end.

    A sequence shorter than max_len + step is kept whole (its last max_len labels are used);
    a longer one gives windows seq[i:i+max_len] for i = len-max_len, len-max_len-step, ... >= 0.
    The step defaults to max_len (non-overlapping windows), as in LlamaRec's LRURec training.
    """
    step = sliding_step or max_len
    windows: list[list[int]] = []
    for seq in sequences:
        seq = list(seq)
        if len(seq) < max_len + step:
            windows.append(seq)
        else:
            windows.extend(seq[i: i + max_len] for i in range(len(seq) - max_len, -1, -step))
    return windows


def left_pad(seqs: Sequence[Sequence[int]], length: int | None = None) -> torch.Tensor:
    """Left-pad (or keep the last `length` items of) each sequence -> (B, length) long tensor."""
    length = length if length is not None else max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), length), PAD, dtype=torch.long)
    for row, seq in enumerate(seqs):
        tail = list(seq)[-length:] if length else []
        if tail:
            out[row, length - len(tail):] = torch.as_tensor(tail, dtype=torch.long)
    return out


def window_batch(windows: Sequence[Sequence[int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-item labels for a batch of windows: (B, max_len) each, 0 = no label.

    labels are the window's last max_len items and inputs the items before each label, so the
    first label of a window is predicted from padding alone, as in the original training data.
    """
    tokens = left_pad([list(w)[:-1] for w in windows], max_len)  # (B, max_len)
    labels = left_pad(windows, max_len)  # (B, max_len)
    return tokens, labels
