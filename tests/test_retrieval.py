"""Retriever: LRURec shapes, padding invariance, the parallel scan, training, candidates, checkpoints."""

from __future__ import annotations

import dataclasses
import json
import random
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from rerank_dist.config import RetrieverConfig
from rerank_dist.metrics import metrics_from_ranks
from rerank_dist.retrieval import (
    LRURec,
    checkpoint_matches,
    full_catalogue_ranks,
    generate_candidates,
    load_retriever,
    parallel_scan,
    retriever_test_metrics,
    run_retriever_stage,
    save_retriever,
    split_examples,
    train_retriever,
)
from rerank_dist.retrieval.candidates import concat_candidates, ranks_on_test_split
from rerank_dist.retrieval.scoring import batch_starts, masked_catalogue_scores, ranks_of_targets
from rerank_dist.retrieval.sequences import left_pad, retriever_training_sequences, training_windows, window_batch

NUM_ITEMS = 80


def quiet(_msg: str) -> None:
    pass


def tiny_cfg(**kw) -> RetrieverConfig:
    base = dict(embed_dim=16, num_blocks=2, dropout=0.0, attn_dropout=0.0, max_len=16, batch_size=8,
                max_epochs=2, patience=50, max_minutes=0.0, top_k=5, seed=0, ema_decay=0.0)
    return RetrieverConfig(**{**base, **kw})


def stride_sequences(num_users: int = 24, length: int = 20, stride: int = 7) -> dict[int, list[int]]:
    """Each user walks the catalogue with a fixed stride from a random start: the next item is
    fully determined by the last one, and no item repeats within a sequence."""
    rng = random.Random(0)
    return {u: [(s + stride * k) % NUM_ITEMS + 1 for k in range(length)]
            for u, s in ((u, rng.randrange(NUM_ITEMS)) for u in range(1, num_users + 1))}


@pytest.fixture(scope="module")
def trained():
    """A small model overfit on the stride pattern (shared by the tests that need a trained one)."""
    torch.manual_seed(0)
    sequences = stride_sequences()
    # One validation at the end, so the model returned is the fully trained one.
    cfg = tiny_cfg(embed_dim=32, lr=5e-3, max_epochs=40, eval_every_epochs=40, batch_size=8)
    model, summary = train_retriever(cfg, sequences, NUM_ITEMS, log=quiet, progress=False)
    return model, summary, sequences, cfg


# ---------------------------------------------------------------- model


def test_forward_shapes():
    model = LRURec(NUM_ITEMS, embed_dim=16, num_blocks=2)
    seqs = torch.randint(1, NUM_ITEMS + 1, (3, 7))
    assert model.hidden(seqs).shape == (3, 7, 16)
    assert model(seqs).shape == (3, 7, NUM_ITEMS + 1)
    assert model.last_scores(seqs).shape == (3, NUM_ITEMS + 1)
    assert model(seqs).dtype == torch.float32


def test_left_padding_does_not_change_outputs():
    torch.manual_seed(0)
    model = LRURec(NUM_ITEMS, embed_dim=16, num_blocks=2).eval()
    seq = [5, 3, 8, 2, 40, 11]
    alone = model.last_scores(torch.tensor([seq]))  # (1, V+1), length 6 -> scanned at 8
    for pad in (1, 2, 10, 27):
        padded = model.last_scores(torch.tensor([[0] * pad + seq]))
        torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)
    # In a batch next to a longer sequence, every real position matches the unpadded run.
    batch = left_pad([seq, list(range(1, 20))])  # (2, 19)
    torch.testing.assert_close(model.hidden(batch)[0, -len(seq):], model.hidden(torch.tensor([seq]))[0],
                               rtol=1e-5, atol=1e-5)


def naive_recurrence(bu: torch.Tensor, lamb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """h_t = bu_t + lamb * h_{t-1}, with no state carried out of a padding position."""
    out = torch.zeros_like(bu)
    h = torch.zeros_like(bu[:, 0])
    for t in range(bu.size(1)):
        carry = lamb * h * mask[:, t - 1].unsqueeze(-1) if t > 0 else 0
        h = bu[:, t] + carry
        out[:, t] = h
    return out


@pytest.mark.parametrize("length", [1, 2, 8, 64])
def test_parallel_scan_equals_sequential_recurrence(length):
    torch.manual_seed(length)
    B, H = 4, 6
    bu = torch.randn(B, length, H, dtype=torch.cfloat)
    lamb = torch.polar(torch.rand(H) * 0.2 + 0.79, torch.rand(H) * 6.28)  # |lamb| in [0.79, 0.99]
    pads = [0, length // 2, length - 1, length // 3]
    mask = torch.tensor([[t >= p for t in range(length)] for p in pads])  # (B, L), left padding
    torch.testing.assert_close(parallel_scan(bu, lamb, mask), naive_recurrence(bu, lamb, mask),
                               rtol=1e-4, atol=1e-5)
    # At real positions the state is exactly the recurrence over the real items alone.
    for row, p in enumerate(pads):
        alone = naive_recurrence(bu[row: row + 1, p:], lamb, mask[row: row + 1, p:])
        torch.testing.assert_close(parallel_scan(bu, lamb, mask)[row, p:], alone[0], rtol=1e-4, atol=1e-5)


def test_init_is_reproducible_and_truncated():
    torch.manual_seed(3)
    a = LRURec(NUM_ITEMS)
    torch.manual_seed(3)
    b = LRURec(NUM_ITEMS)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    w = a.blocks[0].lru_layer.in_proj.weight
    assert w.is_complex() and w.real.abs().max() <= 0.04 and w.imag.abs().max() <= 0.04


# ---------------------------------------------------------------- data for training


def test_training_windows_cut_long_sequences_from_the_end():
    short, long_ = list(range(1, 8)), list(range(1, 10))
    assert training_windows([short], max_len=4) == [short]  # 7 < 4 + 4: kept whole
    assert training_windows([long_], max_len=4) == [[6, 7, 8, 9], [2, 3, 4, 5]]
    tokens, labels = window_batch([[6, 7, 8, 9], [2, 3]], max_len=4)
    assert tokens.tolist() == [[0, 6, 7, 8], [0, 0, 0, 2]]
    assert labels.tolist() == [[6, 7, 8, 9], [0, 0, 2, 3]]
    assert window_batch([short], max_len=4)[1].tolist() == [[4, 5, 6, 7]]


def test_split_examples_follow_the_project_convention():
    seqs = {1: [1, 2, 3, 4, 5], 2: [7, 8], 3: [4, 5, 6]}
    assert split_examples(seqs, "test") == [(1, 4), (2, 1), (3, 2)]
    assert split_examples(seqs, "val") == [(1, 3), (3, 1)]
    assert split_examples(seqs, "train", train_prefixes_per_user=3) == [(1, 2), (1, 1)]
    with pytest.raises(ValueError):
        split_examples(seqs, "dev")


def test_ranks_count_ties_against_the_target_and_miss_excluded_targets():
    scores = torch.tensor([[float("-inf"), 1.0, 2.0, 2.0, 0.5], [float("-inf"), 1.0, float("-inf"), 3.0, 0.0]])
    assert ranks_of_targets(scores, torch.tensor([2, 2])).tolist() == [1, -1]
    assert ranks_of_targets(scores, torch.tensor([4, 3])).tolist() == [3, 0]


# ---------------------------------------------------------------- training


def test_tiny_overfit(trained):
    model, summary, sequences, cfg = trained
    losses = summary.epoch_losses
    assert len(losses) == 40 and losses[-1] < 0.1 * losses[0], losses
    users = sorted(sequences)
    ranks = full_catalogue_ranks(model, [sequences[u][:-2] for u in users], [sequences[u][-2] for u in users],
                                 cfg.max_len)
    assert metrics_from_ranks(ranks, ks=(1,))["recall@1"] >= 0.9
    assert summary.best_val["recall@10"] >= 0.9
    assert not model.training


def test_training_is_seeded_and_stops_on_budget():
    sequences = stride_sequences(num_users=10)
    runs = [train_retriever(tiny_cfg(max_epochs=1), sequences, NUM_ITEMS, log=quiet, progress=False)
            for _ in range(2)]
    for pa, pb in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        assert torch.equal(pa, pb)
    _, summary = train_retriever(tiny_cfg(max_epochs=50, max_minutes=1e-6, batch_size=2), sequences, NUM_ITEMS,
                                 log=quiet, progress=False)
    assert summary.stopped_by == "time_budget" and summary.steps == 1 and summary.best_epoch == 1


def test_weight_average_is_what_gets_validated_and_kept():
    """With ema_decay=d and one step per epoch, the kept weights after two epochs are d*W1 + (1-d)*W2,
    where W1 and W2 are the raw weights after steps 1 and 2 (the raw trajectory is unchanged)."""
    sequences = stride_sequences(num_users=10)  # 10 windows, batch 10: one step per epoch
    raw = [train_retriever(tiny_cfg(max_epochs=n, eval_every_epochs=n, batch_size=10, lr=0.05), sequences,
                           NUM_ITEMS, log=quiet, progress=False)[0] for n in (1, 2)]
    decay = 0.75
    averaged, summary = train_retriever(tiny_cfg(max_epochs=2, eval_every_epochs=2, batch_size=10, lr=0.05,
                                                 ema_decay=decay), sequences, NUM_ITEMS, log=quiet, progress=False)
    assert summary.best_epoch == 2 and len(summary.history) == 1
    w1, w2, got = (dict(m.named_parameters()) for m in (*raw, averaged))
    for name, p in got.items():
        assert torch.allclose(p, decay * w1[name] + (1 - decay) * w2[name], atol=1e-6), name
    assert not torch.equal(got["bias"], w2["bias"])
    # The validation result belongs to the averaged weights.
    users = sorted(sequences)
    ranks = full_catalogue_ranks(averaged, [sequences[u][:-2] for u in users], [sequences[u][-2] for u in users], 16)
    assert metrics_from_ranks(ranks, ks=(10,))["recall@10"] == pytest.approx(summary.best_val["recall@10"])


def test_early_stopping_keeps_the_best_weights():
    sequences = stride_sequences(num_users=10)
    model, summary = train_retriever(tiny_cfg(max_epochs=30, patience=1, lr=0.3), sequences, NUM_ITEMS,
                                     log=quiet, progress=False)
    recalls = [h["val_recall@10"] for h in summary.history]
    assert summary.best_val["recall@10"] == max(recalls)
    users = sorted(sequences)
    ranks = full_catalogue_ranks(model, [sequences[u][:-2] for u in users], [sequences[u][-2] for u in users], 16)
    assert metrics_from_ranks(ranks, ks=(10,))["recall@10"] == pytest.approx(max(recalls))


# ---------------------------------------------------------------- candidates


@pytest.mark.parametrize("top_k", [20, 50])
def test_candidates_exclude_history_and_locate_the_target(trained, top_k):
    model, _, sequences, cfg = trained
    for split in ("train", "val", "test"):
        frame = generate_candidates(model, sequences, split, top_k, cfg.max_len, train_prefixes_per_user=2)
        assert list(frame.columns) == ["user", "prefix_len", "target", "candidates", "retriever_scores",
                                       "target_rank"]
        assert len(frame) == len(split_examples(sequences, split, 2))
        for row in frame.itertuples():
            history = sequences[row.user][: row.prefix_len]
            assert row.target == sequences[row.user][row.prefix_len]
            assert len(row.candidates) == top_k == len(set(row.candidates)) == len(row.retriever_scores)
            assert not set(row.candidates) & set(history) and 0 not in row.candidates
            assert all(1 <= c <= NUM_ITEMS for c in row.candidates)
            assert list(row.retriever_scores) == sorted(row.retriever_scores, reverse=True)
            expected = row.candidates.index(row.target) if row.target in row.candidates else -1
            assert row.target_rank == expected
    test = generate_candidates(model, sequences, "test", top_k, cfg.max_len)
    assert (test["target_rank"] >= 0).mean() >= 0.95  # the overfit model retrieves the next item of the pattern


def test_candidates_refuse_top_k_beyond_the_unseen_items(trained):
    model, _, sequences, cfg = trained
    with pytest.raises(ValueError, match="top_k"):
        generate_candidates(model, sequences, "test", NUM_ITEMS, cfg.max_len)


def test_test_metrics_rank_over_the_whole_catalogue(trained):
    model, _, sequences, cfg = trained
    metrics = retriever_test_metrics(model, sequences, cfg.max_len)
    assert set(metrics) == {f"{m}@{k}" for k in (5, 10, 20) for m in ("recall", "ndcg", "mrr")}
    assert metrics["recall@5"] <= metrics["recall@10"] <= metrics["recall@20"] <= 1.0
    assert metrics["recall@10"] >= 0.9


# ---------------------------------------------------------------- checkpoints and the stage


def test_checkpoint_round_trip_gives_identical_scores(trained, tmp_path):
    model, _, sequences, cfg = trained
    save_retriever(model, cfg, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_retriever(tmp_path)
    seqs = left_pad([sequences[u][:-1] for u in sorted(sequences)], cfg.max_len)
    assert torch.equal(loaded(seqs), model(seqs))
    assert not loaded.training
    assert checkpoint_matches(tmp_path, dataclasses.replace(cfg, top_k=50), NUM_ITEMS)
    assert not checkpoint_matches(tmp_path, dataclasses.replace(cfg, dropout=0.3), NUM_ITEMS)
    assert not checkpoint_matches(tmp_path, cfg, NUM_ITEMS + 1)
    # A checkpoint written before a training field existed is not mistaken for one that used its default.
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["retriever"]["ema_decay"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert not checkpoint_matches(tmp_path, dataclasses.replace(cfg, ema_decay=RetrieverConfig().ema_decay), NUM_ITEMS)
    (tmp_path / "config.json").unlink()
    assert not checkpoint_matches(tmp_path, cfg, NUM_ITEMS)
    with pytest.raises(FileNotFoundError):
        load_retriever(tmp_path)


def test_stage_writes_candidates_and_metrics_then_reuses_the_checkpoint(tmp_path):
    dataset = SimpleNamespace(sequences=stride_sequences(num_users=12), num_items=NUM_ITEMS)
    cfg = tiny_cfg(max_epochs=2)
    metrics = run_retriever_stage(cfg, dataset, tmp_path, log=quiet)
    for split in ("train", "val", "test"):
        frame = pd.read_parquet(tmp_path / f"candidates_{split}.parquet")
        assert len(frame) == 12 and frame["candidates"].map(len).eq(cfg.top_k).all()
        assert pd.api.types.is_integer_dtype(frame["target_rank"])
        assert metrics["target_in_top_k"][split] == pytest.approx((frame["target_rank"] >= 0).mean())
    assert (tmp_path / "metrics_test.json").is_file() and (tmp_path / "train_summary.json").is_file()
    assert metrics["num_users"] == 12 and metrics["training"]["epochs"] == 2
    assert set(metrics["full_catalogue"]) >= {"recall@10", "ndcg@10", "mrr@10", "recall@20"}

    messages: list[str] = []
    again = run_retriever_stage(dataclasses.replace(cfg, top_k=7), dataset, tmp_path, log=messages.append)
    assert any("reusing" in m for m in messages)
    assert again["full_catalogue"] == metrics["full_catalogue"]
    assert pd.read_parquet(tmp_path / "candidates_test.parquet")["candidates"].map(len).eq(7).all()


def test_held_out_training_sequences_keep_back_the_latest_items():
    sequences = {1: [1, 2, 3, 4, 5, 6], 2: [7, 8, 9]}
    assert retriever_training_sequences(sequences) == [[1, 2, 3, 4], [7]]
    assert retriever_training_sequences(sequences, held_out=3) == [[1, 2, 3]]


def test_held_out_retriever_makes_the_training_candidates(tmp_path):
    """train_candidates=held_out: training-prefix candidates come from a second retriever that never
    had those targets as labels; validation and test candidates still come from the main one."""
    dataset = SimpleNamespace(sequences=stride_sequences(num_users=12), num_items=NUM_ITEMS)
    cfg = tiny_cfg(max_epochs=2, train_prefixes_per_user=2, train_candidates="held_out")
    messages: list[str] = []
    metrics = run_retriever_stage(cfg, dataset, tmp_path, log=messages.append)
    assert metrics["train_candidates"] == "held_out" and metrics["training_held_out"]["epochs"] == 2
    assert any("seq[:-4]" in m for m in messages)  # 2 (val + test) + 2 training prefixes held out
    held_out = load_retriever(tmp_path / "held_out")
    assert json.loads((tmp_path / "held_out" / "config.json").read_text())["held_out"] == 4
    assert checkpoint_matches(tmp_path / "held_out", cfg, NUM_ITEMS, held_out=4)
    assert not checkpoint_matches(tmp_path / "held_out", cfg, NUM_ITEMS)  # not a main retriever
    main = load_retriever(tmp_path)
    for split, model in (("train", held_out), ("val", main), ("test", main)):
        expected = generate_candidates(model, dataset.sequences, split, cfg.top_k, cfg.max_len, 2)
        written = pd.read_parquet(tmp_path / f"candidates_{split}.parquet")
        assert written["candidates"].map(list).tolist() == expected["candidates"].map(list).tolist(), split
    from_main = generate_candidates(main, dataset.sequences, "train", cfg.top_k, cfg.max_len, 2)
    assert from_main["candidates"].map(list).tolist() != pd.read_parquet(
        tmp_path / "candidates_train.parquet")["candidates"].map(list).tolist()
    # Switching back reuses the main checkpoint: train_candidates does not change how it is trained.
    messages.clear()
    run_retriever_stage(dataclasses.replace(cfg, train_candidates="same"), dataset, tmp_path, log=messages.append)
    assert any("reusing" in m for m in messages) and not any("second retriever" in m for m in messages)


def test_train_candidates_none_makes_no_training_file(tmp_path):
    """train_candidates=none: no training-prefix candidates (a stale file from another setting is removed),
    the metrics say so, and validation/test candidates are made as always."""
    dataset = SimpleNamespace(sequences=stride_sequences(num_users=12), num_items=NUM_ITEMS)
    (tmp_path / "candidates_train.parquet").write_bytes(b"from an earlier train_candidates=same run")
    messages: list[str] = []
    metrics = run_retriever_stage(tiny_cfg(max_epochs=1, train_candidates="none"), dataset, tmp_path,
                                  log=messages.append)
    assert not (tmp_path / "candidates_train.parquet").exists()
    assert sorted(p.name for p in tmp_path.glob("candidates_*.parquet")) == ["candidates_test.parquet",
                                                                             "candidates_val.parquet"]
    assert metrics["train_candidates"] == "none" and metrics["examples"] == {"train": 0, "val": 12, "test": 12}
    assert set(metrics["target_in_top_k"]) == {"val", "test"}
    assert json.loads((tmp_path / "metrics_test.json").read_text())["examples"]["train"] == 0
    assert not (tmp_path / "held_out").exists() and any("no training candidates" in m for m in messages)


# ---------------------------------------------------------------- devices and shared work


def test_scoring_runs_on_the_models_device_and_returns_cpu_results():
    """The meta device stands in for a GPU: a batch left on the CPU would not reach a model there."""
    model = LRURec(NUM_ITEMS, embed_dim=16, num_blocks=2).to("meta")
    with pytest.raises(RuntimeError, match="device"):
        model.last_scores(torch.tensor([[1, 2, 3]]))  # precondition: devices must match
    scores = list(masked_catalogue_scores(model, [[1, 2, 3], [4, 5]], 8))
    assert scores[0].device.type == "meta" and scores[0].shape == (2, NUM_ITEMS + 1)


def test_stage_puts_the_model_on_the_device_it_chose(tmp_path, monkeypatch):
    from rerank_dist.retrieval import stage as stage_mod

    seen: dict[str, set] = {"trained_on": set(), "candidates_from": set()}
    real_train, real_candidates = stage_mod.train_retriever, stage_mod.generate_candidates

    def spy_train(*args, device, **kwargs):
        model, summary = real_train(*args, device=device, **kwargs)
        seen["trained_on"].add(str(device))
        return model, summary

    def spy_candidates(model, *args, **kwargs):
        seen["candidates_from"].update(str(p.device) for p in model.parameters())
        return real_candidates(model, *args, **kwargs)

    monkeypatch.setattr(stage_mod, "train_retriever", spy_train)
    monkeypatch.setattr(stage_mod, "generate_candidates", spy_candidates)
    dataset = SimpleNamespace(sequences=stride_sequences(num_users=12), num_items=NUM_ITEMS)
    metrics = run_retriever_stage(tiny_cfg(max_epochs=1, train_candidates="same"), dataset, tmp_path, log=quiet,
                                  device="cpu")
    assert seen == {"trained_on": {"cpu"}, "candidates_from": {"cpu"}} and metrics["device"] == "cpu"
    assert metrics["processes"] == 1
    # A GPU, where there is one, is the stage's default.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert stage_mod.default_device() == torch.device("cuda")


def test_candidates_of_shared_batches_join_to_the_whole_split_exactly(trained):
    """What a process computes from its share of the batch starts, joined in order, is the one-process frame."""
    model, _, sequences, cfg = trained
    whole = generate_candidates(model, sequences, "train", 5, cfg.max_len, 3, batch_size=8)
    starts = batch_starts(len(whole), 8)
    assert len(starts) >= 3  # precondition: several batches to share
    shares = [generate_candidates(model, sequences, "train", 5, cfg.max_len, 3, 8, starts[a:b])
              for a, b in ((0, 1), (1, 1), (1, len(starts)))]  # the middle share is empty
    joined = concat_candidates(shares)
    pd.testing.assert_frame_equal(joined, whole)
    assert joined.dtypes.to_dict() == whole.dtypes.to_dict() and shares[1].empty
    ranks = [ranks_on_test_split(model, sequences, cfg.max_len, 8, s) for s in ([0], [8, 16])]
    assert np.array_equal(np.concatenate(ranks), ranks_on_test_split(model, sequences, cfg.max_len, 8))
