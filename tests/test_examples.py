"""Examples: negatives, insertion, deterministic shuffling and label balance, stats, errors."""

from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import pytest

from rerank_dist.config import LABEL_SETS, PromptConfig
from rerank_dist.examples import ExamplesError, build_examples, found_slot_prior, quota_slots, tokenize_examples
from rerank_dist.prompts import encode_prompt
from rerank_dist.verbalizer import resolve_label_ids
from tests.tiny_tokenizers import TITLES, build_sentencepiece_like

K = 20
LABELS = LABEL_SETS["letters"][:K]
NUM_ITEMS = 400


@dataclass
class FakeDataset:
    titles: dict
    sequences: dict
    num_items: int


def make_data(users=600, seq_len=12, absent_rate=0.2, seed=0):
    """Sequences of distinct items and retriever-like candidates (target often near the top, sometimes absent)."""
    rng = np.random.default_rng(seed)
    titles = {i: f"{TITLES[i % len(TITLES)][:-7]} {i} ({1950 + i % 70})" for i in range(1, NUM_ITEMS + 1)}
    titles[7] = "Two\nLines (1999)"
    titles[8] = "(B) Evil (2001)"
    sequences, rows = {}, []
    for u in range(1, users + 1):
        seq = rng.choice(np.arange(1, NUM_ITEMS + 1), size=seq_len, replace=False).tolist()
        sequences[u] = seq
        prefix_len = seq_len - 1
        target, history = seq[prefix_len], set(seq[:prefix_len])
        pool = [i for i in rng.permutation(np.arange(1, NUM_ITEMS + 1)).tolist() if i not in history and i != target]
        cands = pool[:K]
        if rng.random() >= absent_rate:
            rank = int(rng.integers(0, K)) if rng.random() < 0.6 else 0
            cands[rank] = target
        rows.append({"user": u, "prefix_len": prefix_len, "target": target, "candidates": cands,
                     "retriever_scores": [float(K - i) for i in range(K)],
                     "target_rank": cands.index(target) if target in cands else -1})
    return FakeDataset(titles, sequences, NUM_ITEMS), pd.DataFrame(rows)


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture(scope="module")
def small(data):
    dataset, frame = data
    return dataset, frame.head(60)


CFG = PromptConfig(history_items=5, max_train_examples=0, train_order="shuffled")


def build(frame, dataset, tok, split="train", permutation=0, **changes):
    return build_examples(frame, dataset, replace(CFG, **changes), LABELS, tok, split, NUM_ITEMS, permutation)


def test_labels_balanced_when_shuffled(data, bpe):
    dataset, frame = data
    examples, stats = build(frame, dataset, bpe)
    assert len(examples) == 600
    counts = Counter(LABELS[e.label_index] for e in examples)
    assert stats["label_counts"] == {label: counts[label] for label in LABELS}
    # 600 answers over 20 labels: exactly 30 each, by construction.
    assert set(counts.values()) == {30}, counts
    assert stats["label_balance_ratio"] == 1.0


def test_labels_balanced_on_a_small_odd_subset(data, bpe):
    dataset, frame = data
    examples, stats = build(frame.head(191), dataset, bpe)
    counts = Counter(LABELS[e.label_index] for e in examples)
    assert max(counts.values()) - min(counts.values()) <= 1 and sum(counts.values()) == 191


def test_shuffle_is_deterministic_and_keeps_the_candidate_set(data, bpe):
    dataset, frame = data
    a, _ = build(frame.head(50), dataset, bpe)
    b, _ = build(frame.head(50), dataset, bpe)
    assert [e.candidate_ids for e in a] == [e.candidate_ids for e in b]
    for e in a:
        assert e.candidate_ids[e.label_index] == e.target and len(set(e.candidate_ids)) == len(LABELS)
        assert sorted(p for p in e.retriever_positions if p >= 0) == sorted(set(e.retriever_positions) - {-1})


def test_retriever_order_answers_sit_where_the_retriever_put_them(small, bpe):
    dataset, frame = small
    examples, stats = build(frame, dataset, bpe, train_order="retriever")
    found = {int(r) for r in frame.target_rank if r >= 0}
    inserted = 0
    for e, row in zip(examples, frame.itertuples()):
        if row.target_rank >= 0:
            assert e.candidate_ids == row.candidates and e.label_index == row.target_rank
            assert e.retriever_positions == list(range(K))
            assert e.retriever_scores == list(row.retriever_scores)
        else:  # replaces the lowest-ranked candidate, shown at a slot allotted from the found targets' slots
            inserted += 1
            assert [c for c in e.candidate_ids if c != row.target] == list(row.candidates[:-1])
            assert e.retriever_positions[e.label_index] == -1
            assert np.isnan(e.retriever_scores[e.label_index])
    assert found and inserted > 0
    assert len({e.label_index for e, r in zip(examples, frame.itertuples()) if r.target_rank < 0}) > 1
    assert stats["shuffled"] is False and stats["order"] == "retriever"


def test_quota_slots_follow_the_prior_to_within_one():
    prior = np.array([0.5, 0.25, 0.125, 0.125])
    for n in (0, 1, 7, 150):
        slots = quota_slots(prior, n, np.random.default_rng(0))
        counts = np.bincount(slots, minlength=4)
        assert counts.sum() == n and np.all(np.abs(counts - prior * n) < 1), (n, counts)
    assert quota_slots(prior, 150, np.random.default_rng(0)) == quota_slots(prior, 150, np.random.default_rng(0))


def test_missed_targets_follow_the_smoothed_prior_of_all_training_rows(bpe):
    # The retriever finds 240 of 300 targets, always at slot 0; a 40-row subset alone would count
    # only ~32 of them, but the slots of its missed targets come from all 300 rows, smoothed.
    dataset, frame = make_data(users=300, absent_rate=0.2, seed=3)
    frame = frame.copy()
    for i, row in frame.iterrows():
        if row.target_rank > 0:
            cands = list(row.candidates)
            cands[0], cands[row.target_rank] = cands[row.target_rank], cands[0]
            frame.at[i, "candidates"], frame.at[i, "target_rank"] = cands, 0
    prior = found_slot_prior(frame.target.to_numpy(), np.array(frame.candidates.tolist()))
    n_found = int((frame.target_rank >= 0).sum())
    assert prior[0] == pytest.approx((n_found + 1) / (n_found + K)) and prior[1] == pytest.approx(1 / (n_found + K))
    examples, stats = build(frame, dataset, bpe, train_order="retriever", max_train_examples=120)
    assert len(examples) == 120
    missed = [e.label_index for e in examples if e.retriever_positions[e.label_index] == -1]
    assert len(missed) >= 10  # the fault being guarded against needs missed targets in the subset
    counts = np.bincount(missed, minlength=K)
    assert np.all(np.abs(counts - prior * len(missed)) < 1), counts
    # As among the found targets, slot 0 holds nearly every answer.
    assert counts[0] >= len(missed) * 0.8


def test_train_targets_retrieved_keeps_only_rows_whose_target_was_found_and_counts_the_rest(small, bpe):
    dataset, frame = small
    found = frame[frame.target_rank >= 0]
    assert 0 < len(found) < len(frame)  # the planted fault: some targets missed, some found
    examples, stats = build(frame, dataset, bpe, train_order="retriever", train_targets="retrieved")
    assert [e.user for e in examples] == found.user.tolist()
    assert all(e.retriever_positions[e.label_index] == row.target_rank for e, row in zip(examples, found.itertuples()))
    assert stats["rows_left_out_target_not_retrieved"] == len(frame) - len(found)
    assert stats["target_missing"] == 0 and stats["train_targets"] == "retrieved"
    everything, stats_all = build(frame, dataset, bpe, train_order="retriever")
    assert len(everything) == len(frame) and stats_all["rows_left_out_target_not_retrieved"] == 0
    # Evaluation keeps every user: a missed target is a miss, not a dropped user.
    test, _ = build(frame, dataset, bpe, split="test", train_targets="retrieved")
    assert len(test) == len(frame)


def test_train_targets_retrieved_with_no_target_found_is_a_clear_error(small, bpe):
    dataset, frame = small
    none_found = frame[frame.target_rank < 0]
    assert len(none_found) > 0
    with pytest.raises(ExamplesError, match="train_targets=retrieved"):
        build(none_found, dataset, bpe, train_targets="retrieved")


def test_eval_order_is_its_own_choice(small, bpe):
    dataset, frame = small
    kept, stats = build(frame, dataset, bpe, split="test", eval_order="retriever", train_order="shuffled")
    assert stats["order"] == "retriever"
    assert all(e.candidate_ids == list(row.candidates) for e, row in zip(kept, frame.itertuples()))
    mixed, stats = build(frame, dataset, bpe, split="test", eval_order="shuffled", train_order="retriever")
    assert stats["order"] == "shuffled"
    assert sum(e.candidate_ids != list(row.candidates) for e, row in zip(mixed, frame.itertuples())) == len(frame)


def test_permutations_reorder_the_same_candidates(small, bpe):
    dataset, frame = small
    base, _ = build(frame, dataset, bpe, split="test")
    other, _ = build(frame, dataset, bpe, split="test", permutation=1)
    again, _ = build(frame, dataset, bpe, split="test", permutation=1)
    assert [e.candidate_ids for e in other] == [e.candidate_ids for e in again]  # seeded
    for a, b in zip(base, other):
        assert sorted(a.candidate_ids) == sorted(b.candidate_ids) and a.candidate_ids != b.candidate_ids
        assert dict(zip(a.candidate_ids, a.retriever_scores)) == dict(zip(b.candidate_ids, b.retriever_scores))
        assert (a.label_index < 0) == (b.label_index < 0)
    with pytest.raises(ExamplesError, match="permutation"):
        build(frame, dataset, bpe, permutation=1)


def test_insertion_rate_reported(small, bpe):
    dataset, frame = small
    examples, stats = build(frame, dataset, bpe)
    absent = int((frame.target_rank < 0).sum())
    assert absent > 0
    assert stats["target_missing"] == absent
    assert stats["target_insertion_rate"] == pytest.approx(absent / len(frame), abs=1e-4)
    assert all(e.label_index >= 0 and e.candidate_ids[e.label_index] == e.target for e in examples)


def test_eval_candidates_exactly_as_retrieved(small, bpe):
    dataset, frame = small
    examples, stats = build(frame, dataset, bpe, split="test")
    for e, row in zip(examples, frame.itertuples()):
        assert sorted(e.candidate_ids) == sorted(row.candidates)
        assert [row.candidates[p] for p in e.retriever_positions] == e.candidate_ids
        assert e.label_index == (e.candidate_ids.index(row.target) if row.target_rank >= 0 else -1)
    assert stats["target_missing"] == int((frame.target_rank < 0).sum()) and "target_insertion_rate" not in stats


@pytest.mark.parametrize("negatives", ["random", "mixed"])
def test_random_and_mixed_negatives(small, bpe, negatives):
    dataset, frame = small
    examples, _ = build(frame, dataset, bpe, negatives=negatives, mixed_random_fraction=0.5)
    for e, row in zip(examples, frame.itertuples()):
        history = set(dataset.sequences[e.user][: e.prefix_len])
        assert e.target in e.candidate_ids and e.candidate_ids[e.label_index] == e.target
        assert len(set(e.candidate_ids)) == K and not history & set(e.candidate_ids)
        assert all(1 <= i <= NUM_ITEMS for i in e.candidate_ids)
        from_retriever = [i for i in e.candidate_ids if i in row.candidates and i != e.target]
        if negatives == "mixed":  # round(0.5 * 19) = 10 random, 9 hard negatives
            assert len(from_retriever) >= 9
            assert set(row.candidates[:9]) - {e.target} <= set(e.candidate_ids)


def test_deterministic_and_capped(data, bpe):
    dataset, frame = data
    a, stats = build(frame, dataset, bpe, negatives="mixed", max_train_examples=25)
    b, _ = build(frame, dataset, bpe, negatives="mixed", max_train_examples=25)
    assert len(a) == 25 == stats["examples"]
    same = [(e.user, e.prompt, e.candidate_ids, e.label_index, e.retriever_positions) for e in a]
    assert same == [(e.user, e.prompt, e.candidate_ids, e.label_index, e.retriever_positions) for e in b]
    assert [e.user for e in a] == sorted(e.user for e in a)


def test_length_mismatch_names_the_user(small, bpe):
    dataset, frame = small
    bad = frame.copy()
    bad.at[3, "candidates"] = bad.at[3, "candidates"][:7]
    with pytest.raises(ExamplesError, match=f"user {bad.at[3, 'user']} .*: 7 candidates, expected 20"):
        build(bad, dataset, bpe)


def test_target_must_match_sequences(small, bpe):
    dataset, frame = small
    bad = frame.copy()
    bad.at[0, "target"] = bad.at[0, "target"] + 1
    with pytest.raises(ExamplesError, match="candidates and dataset disagree"):
        build(bad, dataset, bpe, split="val")


def test_title_fixups_counted(small, bpe):
    dataset, frame = small
    frame = frame.copy()
    frame.at[0, "candidates"] = [7, 8] + [c for c in frame.at[0, "candidates"] if c not in (7, 8)][: K - 2]
    frame.at[0, "target_rank"] = -1 if frame.at[0, "target"] not in frame.at[0, "candidates"] else 0
    examples, stats = build(frame, dataset, bpe, split="val")
    assert stats["title_fixes"] == {"label_marker": 1, "newline": 1}
    assert "[B] Evil (2001)" in examples[0].prompt and "Two Lines (1999)" in examples[0].prompt


def test_tokenize_examples_matches_the_verbalizer(tmp_path, small):
    spm = build_sentencepiece_like(tmp_path)
    dataset, frame = small
    examples, _ = build(frame.head(3), dataset, spm)
    ids = resolve_label_ids(spm, examples[0].prompt, LABELS)
    for e, prompt_ids in zip(examples, tokenize_examples(examples, spm)):
        assert prompt_ids.count(spm.bos_token_id) == 1
        label = LABELS[e.label_index]
        # Training input = prompt ids + label id: the same ids the scorer reads.
        assert prompt_ids + [ids[e.label_index]] == encode_prompt(spm, e.prompt + label)


def test_stats_expose_position_imbalance(small, bpe):
    dataset, frame = small
    # LlamaRec-style random negatives without shuffling: the target is always "A".
    _, stats = build(frame, dataset, bpe, negatives="random", train_order="retriever")
    assert stats["label_counts"]["A"] == len(frame) and stats["label_balance_ratio"] is None
    assert stats["target_insertion_rate"] is None
