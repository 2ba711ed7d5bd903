"""Length-grouped training order: optimizer steps of prompts of about one length, so little padding.

A micro-batch is left-padded to its longest prompt. In a uniformly shuffled order the prompts of one
micro-batch are any lengths (ml-latest-small with 20 history titles: 500 to 900 tokens), and the
padding is computed like real tokens. Here the order is drawn as follows, per epoch:

1. a seeded permutation of all rows (seed and epoch only);
2. cut into windows of ``window_steps x batch_size`` rows; each window sorted by prompt length;
3. each sorted window cut into steps of ``batch_size`` consecutive rows, the steps of a window
   shuffled (seeded), so the run does not walk from short prompts to long ones.

An optimizer step is always ``batch_size`` consecutive rows of this order (the batch plan cuts it
over the processes and micro-batches the same way as the default order), and nothing here depends
on the world size or the micro-batch, so a step trains the same examples on 1 process or N, and a
resumed run, which skips the steps already done, sees the same order. What changes against the
uniform order is only which examples share a step: the loss is still the mean over a step's
examples, so no normalisation changes.

A rows count that ``batch_size`` does not divide leaves one short step: it stays at the end of the
epoch, as in the uniform order.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """Row indices in length-grouped order (see the module docstring); ``set_epoch`` reseeds."""

    def __init__(self, lengths: np.ndarray, batch_size: int, window_steps: int, seed: int):
        if batch_size < 1 or window_steps < 1:
            raise ValueError(f"LengthGroupedSampler: batch_size and window_steps must be >= 1, "
                             f"got {batch_size} and {window_steps}")
        self.lengths = np.asarray(lengths, dtype=np.int64)  # (N,) prompt tokens per row
        self.batch_size = batch_size
        self.window = window_steps * batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def order(self) -> np.ndarray:
        """This epoch's order of all rows, (N,)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        rows = rng.permutation(len(self.lengths))
        steps: list[np.ndarray] = []
        short: list[np.ndarray] = []
        for lo in range(0, len(rows), self.window):
            window = rows[lo:lo + self.window]
            # stable, longest first: ties keep the permutation's order, so the result is the seed's alone
            window = window[np.argsort(-self.lengths[window], kind="stable")]
            cut = [window[i:i + self.batch_size] for i in range(0, len(window), self.batch_size)]
            full = [c for c in cut if len(c) == self.batch_size]
            short += [c for c in cut if len(c) < self.batch_size]  # at most one, in the last window
            steps += [full[i] for i in rng.permutation(len(full))]
        return np.concatenate(steps + short) if steps or short else rows

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())


def padding_share(lengths: np.ndarray, order: np.ndarray, micro_batch: int) -> tuple[int, int]:
    """(padded slots, real tokens) when ``order`` is cut into micro-batches of ``micro_batch`` rows,
    each left-padded to its longest row (what the training collate does)."""
    lengths = np.asarray(lengths, dtype=np.int64)[np.asarray(order)]
    pad = real = 0
    for lo in range(0, len(lengths), micro_batch):
        chunk = lengths[lo:lo + micro_batch]
        pad += int(chunk.max()) * len(chunk) - int(chunk.sum())
        real += int(chunk.sum())
    return pad, real
