"""Turning item sequences into the retriever's inputs: split prefixes, training windows, padding.

Split convention (shared by the whole project): an example is (user, prefix_len) with
history = seq[:prefix_len] and target = seq[prefix_len]. Test uses prefix_len = len(seq) - 1,
validation len(seq) - 2, training prefixes len(seq) - 3 - j. The retriever itself trains on
seq[:-2], so neither the validation nor the test target is ever a training label.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from rerank_dist.retrieval.lrurec import PAD

SPLITS = ("train", "val", "test")


def prefix_lens(seq_len: int, split: str, train_prefixes_per_user: int = 1) -> list[int]:
    """The prefix lengths that make one user's examples for a split (none when too short)."""
    if split == "test":
        lens = [seq_len - 1]
    elif split == "val":
        lens = [seq_len - 2]
    elif split == "train":
        lens = [seq_len - 3 - j for j in range(train_prefixes_per_user)]
    else:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return [n for n in lens if n >= 1]


def split_examples(sequences: Mapping[int, Sequence[int]], split: str,
                   train_prefixes_per_user: int = 1) -> list[tuple[int, int]]:
    """(user, prefix_len) pairs for a split, users in ascending order."""
    return [(user, n) for user in sorted(sequences)
            for n in prefix_lens(len(sequences[user]), split, train_prefixes_per_user)]


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
