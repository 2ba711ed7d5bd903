"""The doctor's checks on evidence built by hand (no run, no model): the display-order protocol that explains
a lean toward the first letters, and the final (e.g. fused) order judged apart from the LLM's own."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from rerank_dist.doctor.checks import answer_balance, predicted_letters, reranker_vs_baselines
from rerank_dist.doctor.evidence import Evidence, Protocol, Rankings, TrainingSide, VerbalizerFacts
from rerank_dist.doctor.readers.own_run import _protocol, _rankings
from rerank_dist.doctor.result import Status
from rerank_dist.paths import RunPaths

LETTERS = list(string.ascii_uppercase[:20])
# The answer letters of a retriever's order: its rank of the target, so the first letters most often.
FRONT = {lab: int(200 * 0.8 ** i) + 2 for i, lab in enumerate(LETTERS)}
# A skew no display order explains: a middle letter.
MIDDLE = {lab: 60 if lab == "M" else 10 for lab in LETTERS}


def _ev(protocol: Protocol | None = None, **fields) -> Evidence:
    ev = Evidence(kind="rerank_dist", root=Path("."), protocol=protocol,
                  verbalizer=VerbalizerFacts(labels=LETTERS))
    for key, value in fields.items():
        setattr(ev, key, value)
    return ev


def _training(counts: dict[str, int]) -> TrainingSide:
    return TrainingSide(source="test", label_counts=counts)


# ---------------------------------------------------------------- answer letters in training


def test_answers_leaning_to_the_first_letters_are_expected_when_training_showed_the_retriever_order():
    result = answer_balance(_ev(Protocol(train_order="retriever", eval_order="retriever"), training=_training(FRONT)))
    assert result.status is Status.PASS
    assert "expected with train_order=retriever" in result.value and result.numbers["expected_under_protocol"]


@pytest.mark.parametrize("protocol", [None, Protocol(train_order="shuffled", eval_order="retriever")])
def test_the_same_answers_fail_when_nothing_explains_them(protocol):
    result = answer_balance(_ev(protocol, training=_training(FRONT)))
    assert result.status is Status.FAIL and "prompt.train_order=shuffled" in result.fix


def test_a_skew_the_retriever_order_does_not_explain_still_fails():
    result = answer_balance(_ev(Protocol(train_order="retriever"), training=_training(MIDDLE)))
    assert result.status is Status.FAIL and "not explained by train_order=retriever" in result.value


def test_balanced_answers_pass_under_either_order():
    balanced = {lab: 12 for lab in LETTERS}
    for order in ("shuffled", "retriever"):
        assert answer_balance(_ev(Protocol(train_order=order), training=_training(balanced))).status is Status.PASS


# ---------------------------------------------------------------- first choices at test


def _first_choices(counts: list[int]) -> Rankings:
    top = np.repeat(np.arange(len(counts)), counts)
    users = len(top)
    return Rankings(source="test", num_candidates=np.full(users, 20), target_index=np.full(users, -1),
                    reranker_rank=np.full(users, -1), retriever_rank=None, top_position=top, labels=LETTERS)


LEAN = [60, 40, 30, 20] + [10] * 16        # the first letters more often: 310 users
COLLAPSE = [300] + [5] * 19                # 'A' for 76% of users
LATE = [10] * 19 + [200]                   # the last letter


def test_a_lean_toward_the_first_letters_is_expected_with_the_retriever_eval_order():
    found = predicted_letters(_ev(Protocol(train_order="shuffled", eval_order="retriever"),
                                  rankings=_first_choices(LEAN)))
    assert found.status is Status.PASS and "expected with eval_order=retriever" in found.value
    assert predicted_letters(_ev(None, rankings=_first_choices(LEAN))).status is Status.WARN


def test_a_collapse_onto_a_is_expected_only_when_training_showed_the_retriever_order_too():
    both = predicted_letters(_ev(Protocol(train_order="retriever", eval_order="retriever"),
                                 rankings=_first_choices(COLLAPSE)))
    assert both.status is Status.PASS and "reranker_vs_baselines" in both.value
    shuffled_training = predicted_letters(_ev(Protocol(train_order="shuffled", eval_order="retriever"),
                                              rankings=_first_choices(COLLAPSE)))
    assert shuffled_training.status is Status.WARN and "explains a lean, not a collapse" in shuffled_training.value
    for protocol in (None, Protocol(train_order="shuffled", eval_order="shuffled")):
        assert predicted_letters(_ev(protocol, rankings=_first_choices(COLLAPSE))).status is Status.FAIL


def test_a_collapse_onto_the_last_letter_fails_whatever_the_protocol():
    found = predicted_letters(_ev(Protocol(train_order="retriever", eval_order="retriever"),
                                  rankings=_first_choices(LATE)))
    assert found.status is Status.FAIL and "not explained by eval_order=retriever" in found.value


# ---------------------------------------------------------------- final order vs the LLM's own


def _ranked(users: int = 2000, seed: int = 0) -> dict[str, np.ndarray]:
    """Target ranks of several orders of the same 20 candidates; ~25% of targets retrieved."""
    rng = np.random.default_rng(seed)
    present = rng.random(users) < 0.25
    tidx = np.where(present, rng.integers(0, 20, users), -1)
    retriever = np.where(present, (20 * rng.random(users) ** 3).astype(int), -1)  # better than random
    return {"tidx": tidx, "retriever": retriever,
            "random": np.where(present, rng.integers(0, 20, users), -1),
            "better": np.where(present, np.maximum(retriever - 3, 0), -1),   # clearly ahead of the retriever
            "worse": np.where(present, np.minimum(retriever + 2, 19), -1)}   # behind it, ahead of random


def _judged(ranks, llm: str, final_order: str = "reranker", final: str | None = None) -> Rankings:
    users = len(ranks["tidx"])
    return Rankings(source="test", num_candidates=np.full(users, 20), target_index=ranks["tidx"],
                    reranker_rank=ranks[llm], retriever_rank=ranks["retriever"], top_position=None,
                    final_order=final_order, final_rank=ranks[final] if final else None)


def test_a_fused_order_that_beats_the_retriever_does_not_hide_an_llm_no_better_than_random():
    ranks = _ranked()
    result = reranker_vs_baselines(_ev(rankings=_judged(ranks, "random", "fused", "better")), 500)
    assert result.status is Status.FAIL and "the LLM's own order is not distinguishable from random" in result.value
    assert result.numbers["final_order"] == "fused" and result.numbers["vs_retriever"][1] > 0


def test_the_final_order_is_judged_against_the_retriever_and_the_llm_against_random():
    ranks = _ranked()
    good = reranker_vs_baselines(_ev(rankings=_judged(ranks, "worse", "fused", "better")), 500)
    assert good.status is Status.PASS
    assert "final (fused) vs retriever +" in good.value and "LLM (pure) vs random +" in good.value
    assert good.numbers["reranker_vs_retriever"][2] < 0  # the LLM alone is behind the retriever: the fusion is not
    behind = reranker_vs_baselines(_ev(rankings=_judged(ranks, "better", "fused", "worse")), 500)
    assert behind.status is Status.WARN and "the final (fused) order does not beat the retriever's" in behind.value


def test_without_a_final_order_the_llm_order_is_judged_against_both_as_before():
    ranks = _ranked()
    assert reranker_vs_baselines(_ev(rankings=_judged(ranks, "better")), 500).status is Status.PASS
    old = reranker_vs_baselines(_ev(rankings=_judged(ranks, "worse")), 500)
    assert old.status is Status.WARN and old.value.endswith("does not beat the retriever's order")
    assert "vs random +" in old.value and "final" not in old.value
    # a final order whose ranks were not recorded: the LLM's own order, said so
    unrecorded = reranker_vs_baselines(_ev(rankings=_judged(ranks, "worse", "fused")), 500)
    assert unrecorded.status is Status.WARN and any("do not record its ranks" in d for d in unrecorded.details)


# ---------------------------------------------------------------- reading the protocol and the final order


def _run(tmp_path: Path, prompt: dict) -> Path:
    root = tmp_path / "run"
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump({"prompt": prompt}))
    return root


def test_protocol_from_an_older_config_with_shuffle_candidates(tmp_path):
    for flag, order in ((True, "shuffled"), (False, "retriever")):
        ev = _ev()
        _protocol(ev, _run(tmp_path / str(flag), {"shuffle_candidates": flag}), None, None, None, "metrics_test.json")
        assert (ev.protocol.train_order, ev.protocol.eval_order) == (order, order)
        assert "shuffle_candidates" in ev.protocol.source


def test_protocol_prefers_what_the_examples_recorded(tmp_path):
    root = _run(tmp_path, {"train_order": "shuffled", "eval_order": "shuffled"})
    ev = _ev()
    summary = {"train_prompt_stats": {"order": "retriever"}}
    metrics = {"protocol": {"train_order": "shuffled", "eval_order": "retriever"}, "prompt_stats": {}}
    _protocol(ev, root, summary, metrics, None, "metrics_test.json")
    assert (ev.protocol.train_order, ev.protocol.eval_order) == ("retriever", "retriever")
    assert ev.protocol.source == "train_order from ranker/train_summary.json; eval_order from metrics_test.json"
    nothing = _ev()
    _protocol(nothing, tmp_path, None, None, None, "metrics_test.json")  # no config.yaml there
    assert nothing.protocol is None and "protocol" in nothing.missing


def test_rankings_keep_the_llm_scores_and_read_the_final_order_beside_them(tmp_path):
    paths = RunPaths(tmp_path)
    cands = [[1, 2, 3], [4, 5, 6]]
    frame = pd.DataFrame({"user": [0, 1], "prefix_len": [3, 3], "target": [3, 9], "candidates": cands,
                          "scores": [[0.9, 0.1, 0.5], [0.1, 0.2, 0.3]],
                          "final_scores": [[0.1, 0.2, 0.9], [0.3, 0.2, 0.1]],
                          "target_rank": [0, -1], "retriever_rank": [2, -1]})
    frame.to_parquet(paths.rankings("test"))
    ev = _ev()
    _rankings(ev, paths, "test", LETTERS[:3], {"final_order": "fused"})
    assert ev.rankings.reranker_rank.tolist() == [1, -1] and ev.rankings.final_rank.tolist() == [0, -1]
    assert ev.rankings.final_order == "fused" and ev.rankings.top_position.tolist() == [0, 2]
    older = _ev()
    _rankings(older, paths, "test", LETTERS[:3], {})
    assert older.rankings.final_order == "reranker" and older.rankings.final_rank is None
