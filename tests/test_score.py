"""score_prompts: every prompt comes back from the shards, and non-finite scores are a failure of their own."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rerank_dist import score as S
from rerank_dist.label_scoring import label_logits, left_pad

PAD = 0
POISON = 9  # a prompt holding this token gets non-finite logits from StubLM
LABELS = torch.tensor([1, 2, 3])  # (K,)


class StubLM(torch.nn.Module):
    """A causal LM's interface with known logits: row b's logits over the vocabulary are
    last_token * [0, 1, ..., V-1], or all `poison` when the prompt contains POISON."""

    dtype = torch.float16  # what score_prompts may report in its hint

    def __init__(self, poison: float = float("nan"), vocab: int = 10):
        super().__init__()
        self.poison, self.vocab = poison, vocab

    def forward(self, input_ids, attention_mask, position_ids=None, logits_to_keep=0, use_cache=None):
        last = input_ids[:, -1:].float()  # (B, 1)
        logits = last.unsqueeze(-1) * torch.arange(self.vocab, device=input_ids.device).float()  # (B, 1, V)
        logits[(input_ids == POISON).any(dim=1)] = self.poison
        return SimpleNamespace(logits=logits)


def expected_scores(token_lists: list[list[int]]) -> np.ndarray:
    return np.array([[t[-1] * int(k) for k in LABELS] for t in token_lists], dtype=np.float32)  # (N, K)


class FakeAccelerator:
    """The part of an Accelerator that score_prompts uses, for process `index` of `processes`; a list is
    split as accelerate splits it (contiguous shards, the first ones one longer)."""

    def __init__(self, processes: int = 1, index: int = 0):
        self.num_processes, self.process_index = processes, index
        self.device = torch.device("cpu")
        self.is_local_main_process = False  # no progress bar

    @contextlib.contextmanager
    def split_between_processes(self, inputs):
        per, extra = divmod(len(inputs), self.num_processes)
        start = self.process_index * per + min(self.process_index, extra)
        yield inputs[start:start + per + (self.process_index < extra)]


PROMPTS = [[1, 2], [POISON, 3], [4], [5, POISON, 6], [7]]


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_scores_are_reported_as_such_not_as_lost_prompts(poison):
    model = StubLM(poison)
    # Precondition: the fault is planted where production reads it, through label_logits.
    ids, mask = left_pad([PROMPTS[1]], PAD)
    assert not torch.isfinite(label_logits(model, ids, mask, LABELS)).any()
    clean = [p for p in PROMPTS if POISON not in p]
    np.testing.assert_array_equal(S.score_prompts(FakeAccelerator(), model, clean, LABELS, PAD, 2),
                                  expected_scores(clean))

    with pytest.raises(RuntimeError) as err:
        S.score_prompts(FakeAccelerator(), model, PROMPTS, LABELS, PAD, batch_size=2)
    msg = str(err.value)
    assert "non-finite label scores (NaN or inf) for 2 of 5 prompts" in msg
    assert "torch.float16" in msg and "bfloat16" in msg  # the likely cause and the way out
    assert "lost" not in msg and "gather" not in msg


@pytest.mark.parametrize("dropped", [0, 1])
def test_prompts_lost_while_gathering_are_reported_as_lost(monkeypatch, dropped):
    """Process 0 of 2 scores its shard; the (fake) gather adds the other process's rows, `dropped` of them lost."""
    prompts = [p for p in PROMPTS if POISON not in p] + [[8], [6, 5]]  # 5 finite prompts
    gathered: list[list] = []

    def gather(local):
        gathered.append(list(local))
        mine = {i for i, _ in local}
        other = [(i, expected_scores([prompts[i]])[0].tolist()) for i in range(len(prompts)) if i not in mine]
        return list(local) + other[dropped:]

    monkeypatch.setattr(S, "gather_object", gather)
    accelerator = FakeAccelerator(processes=2, index=0)
    if not dropped:
        scores = S.score_prompts(accelerator, StubLM(), prompts, LABELS, PAD, batch_size=2)
        np.testing.assert_array_equal(scores, expected_scores(prompts))
    else:
        with pytest.raises(RuntimeError) as err:
            S.score_prompts(accelerator, StubLM(), prompts, LABELS, PAD, batch_size=2)
        assert str(err.value) == "scoring lost 1 of 5 prompts while gathering shards"
    # Precondition: the multi-process path ran, and this process scored only part of the prompts.
    assert len(gathered) == 1 and 0 < len(gathered[0]) < len(prompts) - dropped
