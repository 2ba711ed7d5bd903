"""score_prompts: every prompt comes back from the shards, and non-finite scores are a failure of their own."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rerank_dist import fusion as F
from rerank_dist import score as S
from rerank_dist.label_scoring import label_logits, left_pad
from rerank_dist.metrics import target_ranks

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


# ---------------------------------------------------------------- fusion and permutation averaging


def _examples(llm_best: np.ndarray, k: int = 6, seed: int = 0):
    """Examples whose retriever ranks every candidate in display order (scores k..1) and whose target
    sits at a seeded slot; llm_best[u] says whether user u's LLM scores put the target first."""
    rng = np.random.default_rng(seed)
    examples, llm = [], []
    for u, good in enumerate(llm_best):
        target = int(rng.integers(1, k))  # never the retriever's first: the retriever alone is imperfect
        examples.append(SimpleNamespace(label_index=target, candidate_ids=list(range(10 * u, 10 * u + k)),
                                        retriever_scores=[float(k - j) for j in range(k)],
                                        retriever_positions=list(range(k))))
        row = rng.normal(size=k)
        row[target] = row.max() + 1.0 if good else row.min() - 1.0
        llm.append(row)
    return examples, np.array(llm)  # (U, K)


def test_fusion_endpoints_are_the_two_orders():
    examples, llm = _examples(np.ones(30, dtype=bool))
    retriever = F.retriever_score_matrix(examples)
    t = np.array([e.label_index for e in examples])
    assert np.array_equal(target_ranks(F.fuse(llm, retriever, 0.0), t), target_ranks(llm, t))
    assert np.array_equal(target_ranks(F.fuse(llm, retriever, 1.0), t), target_ranks(retriever, t))
    assert not np.array_equal(target_ranks(llm, t), target_ranks(retriever, t))  # the endpoints differ


def test_fusion_weight_follows_the_validation_evidence():
    weights = [0.0, 0.5, 1.0]
    good, _ = _examples(np.ones(30, dtype=bool))
    w, grid = F.choose_fusion_weight(good, _examples(np.ones(30, dtype=bool))[1], weights, num_users=30)
    assert w == 0.0 and grid[0.0] == pytest.approx(1.0)  # a perfect LLM: NDCG@10 = 1 with no retriever weight
    bad, llm_bad = _examples(np.zeros(30, dtype=bool))
    w, grid = F.choose_fusion_weight(bad, llm_bad, weights, num_users=30)
    assert w == 1.0 and grid[1.0] > grid[0.0]  # an LLM that buries the target: the retriever's order wins
    # Users not scored count as misses: NDCG over 60 users is half of that over the 30 scored ones.
    _, half = F.choose_fusion_weight(bad, llm_bad, weights, num_users=60)
    assert half[1.0] == pytest.approx(grid[1.0] / 2)


def test_zscore_and_log_probs():
    x = np.array([[1.0, 1.0, 1.0], [0.0, 2.0, np.nan]])
    z = F.zscore(x)
    assert np.array_equal(z[0], [0.0, 0.0, 0.0])  # a constant row carries no order
    assert z[1, 2] == z[1, 0] < z[1, 1]  # not retrieved = the row's lowest
    lp = F.log_probs(np.array([[3.0, 1.0, -2.0]]))
    assert np.exp(lp).sum() == pytest.approx(1.0) and np.argmax(lp) == 0


def test_scores_return_to_the_first_display_order():
    base = [SimpleNamespace(candidate_ids=[5, 6, 7, 8])]
    other = [SimpleNamespace(candidate_ids=[7, 5, 8, 6])]
    scores = np.array([[70.0, 50.0, 80.0, 60.0]])  # item 7 -> 70, ...
    assert F.to_display_order(base, other, scores).tolist() == [[50.0, 60.0, 70.0, 80.0]]


# ---------------------------------------------------------------- validation users


def _val_candidates(target_ranks: list[int]):
    import pandas as pd

    return pd.DataFrame({"user": list(range(1, len(target_ranks) + 1)), "target_rank": target_ranks})


def test_validation_users_are_those_whose_target_was_retrieved():
    from rerank_dist.evaluation import validation_users

    users, note = validation_users(_val_candidates([-1, 3, -1, 0, 7]), limit=2)
    assert users["user"].tolist() == [2, 4] and note.startswith("2 of 5 validation users")
    users, note = validation_users(_val_candidates([-1, -1, -1]), limit=2)
    assert users["user"].tolist() == [1] and "none of the 3 validation users" in note  # the defined fallback


def test_fusion_weight_with_no_validation_target_retrieved_is_the_retrievers(tmp_path, monkeypatch):
    """No validation user's target was retrieved: the fusion weight is chosen on the users training
    validates on in that case (the first one alone), is the retriever's order (the tie rule on a grid
    of zeros) and says why, instead of fusing over no users at all."""
    from rerank_dist.io import write_parquet
    from rerank_dist.paths import RunPaths
    from rerank_dist.settings import load_config

    cfg = load_config(overrides=[f"run_dir={tmp_path}", "score.fusion=true", "score.fusion_val_users=2"])
    write_parquet(RunPaths(tmp_path).candidates("val"), _val_candidates([-1, -1, -1]))
    scored, said = [], []

    def llm_scores(accelerator, model, cfg, split, candidates, *rest):
        scored.append(candidates["user"].tolist())
        examples = [SimpleNamespace(label_index=-1, retriever_scores=[3.0, 2.0, 1.0], candidate_ids=[7, 8, 9])
                    for _ in range(len(candidates))]
        return {"examples": examples, "averaged": np.zeros((len(candidates), 3)), "seconds": [0.0], "saved_dirs": [],
                "oom_retries": 0}

    monkeypatch.setattr(S, "_llm_scores", llm_scores)
    got = S._fusion_weight(SimpleNamespace(is_main_process=True, print=said.append), None, cfg, *[None] * 5)
    assert scored == [[1]]
    assert got["weight"] == max(cfg.score.fusion_weights) and set(got["grid"].values()) == {0.0}
    assert any("none of the 3 validation users" in line for line in said)


# ---------------------------------------------------------------- batching by tokens, out-of-memory retries


def test_token_budget_batches_hold_every_prompt_once_within_the_budget():
    rng = np.random.default_rng(1)
    prompts = [[1] * int(n) for n in rng.integers(1, 60, size=50)]
    budget = 120
    batches = S._batches(prompts, batch_size=4, token_budget=budget)
    assert sorted(i for b in batches for i in b) == list(range(50))
    for b in batches:
        width = max(len(prompts[i]) for i in b)
        assert len(b) * width <= budget or len(b) == 1
    assert len({len(b) for b in batches}) > 2  # short prompts share a forward, long ones do not
    assert batches == S._batches(prompts, batch_size=4, token_budget=budget)  # the same cut every time
    # Cut from the length-sorted prompts, the budget's batches pad less than 4 prompts taken in input order.
    in_order = [list(range(s, min(s + 4, 50))) for s in range(0, 50, 4)]
    assert S.padding_waste(prompts, batches) < S.padding_waste(prompts, in_order)
    assert S.padding_waste([[1, 2], [3]], [[0, 1]]) == pytest.approx(0.25)  # 3 real tokens of 4 run


def test_token_budget_scores_come_back_in_input_order():
    prompts = [[t] * n for t, n in zip(range(1, 9), (3, 1, 7, 2, 9, 4, 1, 5))]
    fixed = S.score_prompts(FakeAccelerator(), StubLM(), prompts, LABELS, PAD, batch_size=2)
    budgeted = S.score_prompts(FakeAccelerator(), StubLM(), prompts, LABELS, PAD, batch_size=2, token_budget=10)
    np.testing.assert_array_equal(budgeted, expected_scores(prompts))
    np.testing.assert_array_equal(budgeted, fixed)
    assert len(S._batches(prompts, 2, token_budget=10)) != len(S._batches(prompts, 2))  # other batches indeed


class OutOfMemoryAbove(StubLM):
    """StubLM that raises CUDA's out-of-memory error for a forward of more than `rows` prompts."""

    def __init__(self, rows: int):
        super().__init__()
        self.rows, self.forwards = rows, []

    def forward(self, input_ids, **kwargs):
        self.forwards.append(len(input_ids))
        if len(input_ids) > self.rows:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().forward(input_ids, **kwargs)


def test_out_of_memory_halves_the_batch_and_loses_no_prompt():
    prompts = [[t, t] for t in range(1, 9)]  # 8 prompts, one batch of 8
    model, stats = OutOfMemoryAbove(rows=2), {}
    scores = S.score_prompts(FakeAccelerator(), model, prompts, LABELS, PAD, batch_size=8, stats=stats)
    np.testing.assert_array_equal(scores, expected_scores(prompts))
    # 8 fails, its halves of 4 fail, their halves of 2 succeed: 3 retries.
    assert model.forwards == [8, 4, 2, 2, 4, 2, 2] and stats == {"oom_retries": 3}

    with pytest.raises(torch.cuda.OutOfMemoryError, match="one prompt of 2 tokens"):  # nothing left to halve
        S.score_prompts(FakeAccelerator(), OutOfMemoryAbove(rows=0), prompts, LABELS, PAD, batch_size=8)
    sharded = OutOfMemoryAbove(rows=2)  # lockstep: every process must run the same forwards, so no retry
    with pytest.raises(torch.cuda.OutOfMemoryError, match="Tried to allocate"):
        S.score_prompts(FakeAccelerator(), sharded, prompts, LABELS, PAD, batch_size=8, lockstep=True)
    assert sharded.forwards == [8]
