"""Scoring users' next item over the whole catalogue, with each user's history excluded.

An item the user has already interacted with is never a candidate (LlamaRec's protocol), so its
score is set to -inf; so is the padding column 0. All functions run batched and without grad,
on the device the model sits on; what they return is on the CPU.

Batches are always the fixed slices ``histories[start: start + batch_size]`` for ``start`` in
``batch_starts``: a caller that shares the work between processes passes each process some of those
starts, never a re-cut batch, because a matmul's row results can depend on the batch's shape and
the shares must concatenate to exactly the one-process result.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from rerank_dist.metrics import MISS
from rerank_dist.retrieval.lrurec import LRURec
from rerank_dist.retrieval.sequences import left_pad


def batch_starts(num_examples: int, batch_size: int = 32) -> list[int]:
    """The first index of every batch: the unit of work that may be shared between processes."""
    return list(range(0, num_examples, batch_size))


@torch.no_grad()
def masked_catalogue_scores(model: LRURec, histories: Sequence[Sequence[int]], max_len: int,
                            batch_size: int = 32, starts: Sequence[int] | None = None) -> Iterator[torch.Tensor]:
    """Yield (b, V+1) scores per batch of histories, on the model's device; history items and padding
    are -inf. starts: which batches (default all, see batch_starts), yielded in the order given.

    The model sees the last max_len items of each history; the whole history is excluded.
    """
    was_training = model.training
    model.eval()
    device = model.device
    try:
        for start in batch_starts(len(histories), batch_size) if starts is None else starts:
            chunk = histories[start: start + batch_size]
            scores = model.last_scores(left_pad(chunk, max_len).to(device))  # (b, V+1)
            seen = left_pad(chunk).to(device)  # (b, longest history); padding 0 masks column 0
            scores.scatter_(1, seen, float("-inf"))
            scores[:, 0] = float("-inf")
            yield scores
    finally:
        model.train(was_training)


def ranks_of_targets(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among the unmasked items; ties count against the target.

    scores (b, V+1) with -inf for excluded items, targets (b,) -> (b,) ranks; MISS (-1) when the
    target itself is excluded.
    """
    target_scores = scores.gather(1, targets.unsqueeze(1))  # (b, 1)
    ahead = (scores > target_scores).sum(1) + (scores == target_scores).sum(1) - 1  # (b,)
    return torch.where(torch.isfinite(target_scores.squeeze(1)), ahead, torch.full_like(ahead, MISS))


def full_catalogue_ranks(model: LRURec, histories: Sequence[Sequence[int]], targets: Sequence[int],
                         max_len: int, batch_size: int = 32, starts: Sequence[int] | None = None) -> np.ndarray:
    """Rank of each target over the whole catalogue (history excluded) -> (N,) int array on the CPU,
    N = the examples of the batches in starts (default all, in order)."""
    starts = batch_starts(len(histories), batch_size) if starts is None else list(starts)
    targets_t = torch.as_tensor(list(targets), dtype=torch.long, device=model.device)  # (N_all,)
    out = []
    for start, scores in zip(starts, masked_catalogue_scores(model, histories, max_len, batch_size, starts)):
        out.append(ranks_of_targets(scores, targets_t[start: start + len(scores)]).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)
