"""The training-examples store: LlamaRec's every-prefix set, built once in parts, read lazily, refused
or rebuilt when made for other settings; and the same examples as the in-memory builder."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from rerank_dist import example_store as store
from rerank_dist.config import RunConfig
from rerank_dist.examples import ExamplesError, build_examples
from tests.test_examples import K, LABELS, NUM_ITEMS, FakeDataset, make_data

PART_ROWS = 40


@pytest.fixture(autouse=True)
def small_parts(monkeypatch):
    monkeypatch.setattr(store, "PART_ROWS", PART_ROWS)  # several parts from a few hundred rows


def llamarec_cfg(run_dir: Path, **prompt) -> RunConfig:
    cfg = RunConfig(run_dir=str(run_dir))
    cfg.retriever.train_prefixes_per_user, cfg.retriever.train_candidates = 0, "none"
    cfg.prompt = replace(cfg.prompt, **{"negatives": "random", "train_order": "shuffled", "max_train_examples": 0,
                                        "history_items": 5, **prompt})
    return cfg


def varied_lengths(users=40, seed=1) -> FakeDataset:
    """Sequences of 3..17 distinct items: some users have no training prefix at all."""
    rng = np.random.default_rng(seed)
    dataset, _ = make_data(users=2, seed=seed)
    sequences = {u: rng.choice(np.arange(1, NUM_ITEMS + 1), size=int(rng.integers(3, 18)), replace=False).tolist()
                 for u in range(1, users + 1)}
    return FakeDataset(dataset.titles, sequences, NUM_ITEMS)


def build_all(cfg: RunConfig, source: store.StoreSource, tokenizer, key: str = "k",
              labels: list[str] = LABELS) -> store.StoredExamples:
    """What the training loop does on one process (train._training_examples)."""
    spec = store.store_spec(cfg, key, tokenizer, labels)
    if not store.is_complete(spec):
        store.reset_if_stale(spec, print)
        plan = store.row_plan(source, cfg.prompt, len(labels))
        for part in store.missing_parts(spec, len(plan)):
            store.build_part(spec, plan, part, source, cfg.prompt, labels, tokenizer)
        store.finish(spec, plan, source, cfg.prompt, labels, tokenizer)
    return store.StoredExamples(spec.directory)


def test_every_prefix_with_random_negatives_matches_an_independent_construction(tmp_path, bpe):
    dataset = varied_lengths()
    cfg = llamarec_cfg(tmp_path)
    examples = build_all(cfg, store.StoreSource(dataset, None, 0), bpe)
    # LlamaRec's dataloader/llm.py, written out again: the training sequence is seq[:-2]; each of its
    # prefixes with a non-empty history is an example whose target is the next item.
    expected = [(u, i, seq[i]) for u in sorted(dataset.sequences) for seq in [dataset.sequences[u]]
                for i in range(1, len(seq) - 2)]
    expected.sort(key=lambda r: (r[0], -r[1]))  # users ascending, latest prefix first (the retriever's row order)
    assert any(len(s) < 4 for s in dataset.sequences.values())  # users without a training prefix exist
    assert len(examples) == len(expected) == sum(max(len(s) - 3, 0) for s in dataset.sequences.values())
    assert examples.meta["parts"] == -(-len(expected) // PART_ROWS) > 1
    rows = examples.rows(range(len(examples)))
    assert list(zip(rows["user"], rows["prefix_len"], rows["target"])) == expected
    for user, prefix_len, target, shown, label in zip(rows["user"], rows["prefix_len"], rows["target"],
                                                      rows["candidate_ids"], rows["label"]):
        history = set(dataset.sequences[user][:prefix_len])
        assert len(shown) == K == len(set(shown)) and shown[label] == target
        negatives = set(shown) - {target}
        assert not negatives & history and all(1 <= i <= NUM_ITEMS for i in negatives)
    # Every letter is the answer equally often (shuffled training), over all parts together.
    counts = Counter(rows["label"])
    assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) == K
    assert examples.stats["examples"] == len(expected) and examples.stats["label_balance_ratio"] <= 1.2
    ids, label = examples[3]
    assert isinstance(ids, list) and ids == list(rows["input_ids"][3]) and label == rows["label"][3]


def test_store_rows_are_the_in_memory_builders_examples(tmp_path, bpe):
    dataset, frame = make_data(users=100, seed=4)
    cfg = llamarec_cfg(tmp_path)
    cfg.retriever.train_candidates, cfg.retriever.train_prefixes_per_user = "same", 1
    cfg.prompt = replace(cfg.prompt, negatives="retriever", train_order="retriever", max_train_examples=70)
    path = tmp_path / "candidates_train.parquet"
    frame.to_parquet(path)
    stored = build_all(cfg, store.StoreSource(dataset, path, 1), bpe)
    memory, stats = build_examples(frame, dataset, cfg.prompt, LABELS, bpe, "train", NUM_ITEMS)
    assert stored.meta["parts"] == 2 and len(stored) == len(memory) == 70
    rows = stored.rows(range(len(stored)))
    assert [list(r) for r in rows["input_ids"]] == [e.input_ids for e in memory]
    assert list(rows["label"]) == [e.label_index for e in memory]
    assert [list(c) for c in rows["candidate_ids"]] == [e.candidate_ids for e in memory]
    assert stored.lengths().tolist() == [len(e.input_ids) for e in memory]  # over both parts, in order
    same = {k: v for k, v in stats.items() if k not in ("title_fixes", "titles_truncated")}
    assert {k: stored.stats[k] for k in same} == same


def test_a_killed_build_keeps_its_parts_and_a_finished_store_is_reopened_as_it_is(tmp_path, bpe, monkeypatch):
    dataset = varied_lengths()
    cfg = llamarec_cfg(tmp_path)
    source = store.StoreSource(dataset, None, 0)
    first = build_all(cfg, source, bpe)
    spec = store.store_spec(cfg, "k", bpe, LABELS)
    before = first.rows(range(len(first)))
    # A build killed after part 0: meta.json and the later parts are gone.
    (spec.directory / store.META).unlink()
    for part in range(1, first.meta["parts"]):
        spec.part_path(part).unlink()
    kept = spec.part_path(0).stat().st_mtime_ns
    built: list[int] = []
    real_build = store.build_part
    monkeypatch.setattr(store, "build_part", lambda s, p, part, *a, **k: (built.append(part), real_build(s, p, part, *a, **k)))
    again = build_all(cfg, source, bpe)
    assert built == list(range(1, first.meta["parts"])) and spec.part_path(0).stat().st_mtime_ns == kept
    assert again.rows(range(len(again))) == before
    built.clear()
    build_all(cfg, source, bpe)  # complete: opened, nothing built
    assert built == []


def test_a_store_made_for_other_settings_is_rebuilt_in_the_run_and_refused_where_the_user_named_it(tmp_path, bpe):
    dataset = varied_lengths()
    source = store.StoreSource(dataset, None, 0)
    cfg = llamarec_cfg(tmp_path)
    first = build_all(cfg, source, bpe)
    changed = llamarec_cfg(tmp_path, history_items=3)
    rebuilt = build_all(changed, source, bpe)
    assert rebuilt.meta["inputs"]["prompt.history_items"] == 3 != first.meta["inputs"]["prompt.history_items"]
    shared = tmp_path / "shared_store"
    cfg.train.examples_dir = changed.train.examples_dir = str(shared)
    build_all(cfg, source, bpe)
    with pytest.raises(ExamplesError, match=r"prompt.history_items: the store has 5, this run needs 3") as err:
        build_all(changed, source, bpe)
    assert "\n" not in str(err.value) and str(shared) in str(err.value)
    assert store.StoredExamples(shared).meta["inputs"]["prompt.history_items"] == 5  # left as it was


def test_a_dataset_too_short_for_any_training_prefix_is_one_clear_line(tmp_path, bpe):
    dataset = varied_lengths()
    short = FakeDataset(dataset.titles, {u: s[:3] for u, s in dataset.sequences.items()}, NUM_ITEMS)
    cfg = llamarec_cfg(tmp_path)
    with pytest.raises(ExamplesError, match="no user has a training prefix") as err:
        build_all(cfg, store.StoreSource(short, None, 0), bpe)
    assert "\n" not in str(err.value)
    assert not (Path(cfg.run_dir) / "examples" / "train" / store.META).exists()  # nothing looks finished



def test_every_part_is_memory_mapped_not_read_into_the_process(tmp_path, bpe):
    from datasets.table import MemoryMappedTable

    examples = build_all(llamarec_cfg(tmp_path), store.StoreSource(varied_lengths(), None, 0), bpe)
    table = examples.data.data
    blocks = [block for row in getattr(table, "blocks", [[table]]) for block in row]
    assert len(blocks) == examples.meta["parts"] > 1
    assert all(isinstance(block, MemoryMappedTable) for block in blocks)
    assert {Path(f["filename"]).name for f in examples.data.cache_files} == \
        {f"part-{i:05d}.arrow" for i in range(examples.meta["parts"])}


@pytest.mark.parametrize("per_user", [1, 3, 0])
def test_training_rows_from_sequences_follow_the_split_convention(per_user):
    from rerank_dist.examples import sequence_arrays
    from rerank_dist.retrieval.sequences import split_examples

    dataset = varied_lengths()
    users, prefix_lens, targets, retrieved, _ = sequence_arrays(dataset.sequences, per_user)
    expected = split_examples(dataset.sequences, "train", per_user)  # what the retriever stage makes rows for
    assert list(zip(users.tolist(), prefix_lens.tolist())) == expected and retrieved.shape == (len(expected), 0)
    assert targets.tolist() == [dataset.sequences[u][p] for u, p in expected]
