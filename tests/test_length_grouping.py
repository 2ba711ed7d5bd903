"""Length-grouped training order (rerank_dist/length_grouping.py): a seeded permutation whose steps hold
prompts of about one length. That it trains the same on 1 and 2 processes is in test_distributed.py."""

from __future__ import annotations

import numpy as np
import pytest

from rerank_dist.length_grouping import LengthGroupedSampler, padding_share


def _lengths(n: int = 203, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(500, 900, size=n)  # ml-latest-small-like prompt lengths


def test_the_order_is_a_permutation_fixed_by_seed_and_epoch_alone():
    lengths = _lengths()
    a, b = LengthGroupedSampler(lengths, 8, 4, seed=1), LengthGroupedSampler(lengths, 8, 4, seed=1)
    assert sorted(a.order().tolist()) == list(range(len(lengths)))
    assert list(a) == list(b)  # a fresh sampler (a resumed run) draws the same order
    a.set_epoch(1)
    assert list(a) != list(b)  # another epoch, another order
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(LengthGroupedSampler(lengths, 8, 4, seed=2)) != list(b)


def test_every_step_is_a_run_of_its_windows_length_order_and_the_short_step_comes_last():
    lengths = _lengths()
    batch, window_steps = 8, 4
    order = LengthGroupedSampler(lengths, batch, window_steps, seed=3).order()
    full_steps = len(lengths) // batch
    assert len(lengths) % batch  # the precondition: there is a short step
    for s in range(full_steps):
        step = lengths[order[s * batch:(s + 1) * batch]]
        assert (np.diff(step) <= 0).all()  # longest first within a step
    assert len(order[full_steps * batch:]) == len(lengths) % batch
    # each window's steps are that window's rows: the windows of the seeded permutation, regrouped
    rows = np.random.default_rng([3, 0]).permutation(len(lengths))
    w = window_steps * batch
    assert sorted(order[:w].tolist()) == sorted(rows[:w].tolist())


def test_grouping_cuts_padding_at_micro_batch_four():
    lengths = _lengths(4096)
    uniform = np.random.default_rng(0).permutation(len(lengths))
    pad_uniform, real = padding_share(lengths, uniform, 4)
    pad_grouped, real_grouped = padding_share(lengths, LengthGroupedSampler(lengths, 16, 64, 0).order(), 4)
    assert real == real_grouped == int(lengths.sum())
    print(f"padded slots: uniform {pad_uniform}, grouped {pad_grouped}")
    assert pad_grouped < 0.05 * pad_uniform


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="window_steps"):
        LengthGroupedSampler(_lengths(), 8, 0, seed=0)
