"""The retriever's grid (rerank_dist.retrieval.grid): selection on validation only, resume after a kill,
the summary's shape."""

from __future__ import annotations

import json
from types import SimpleNamespace

from rerank_dist.retrieval import grid as G
from tests.test_retrieval import NUM_ITEMS, quiet, stride_sequences, tiny_cfg

SPACE = {"weight_decay": [0.0, 0.01], "dropout": [0.0]}


def _dataset() -> SimpleNamespace:
    return SimpleNamespace(sequences=stride_sequences(num_users=16), num_items=NUM_ITEMS)


def test_selection_reads_validation_only():
    # Planted: the second run is best on test by far, the first on validation.
    runs = [{"name": "a", "val": {"recall@10": 0.30, "ndcg@10": 0.10}, "test": {"recall@10": 0.01, "ndcg@10": 0.0}},
            {"name": "b", "val": {"recall@10": 0.20, "ndcg@10": 0.20}, "test": {"recall@10": 0.90, "ndcg@10": 0.9}},
            {"name": "c", "val": {"recall@10": 0.30, "ndcg@10": 0.05}, "test": {"recall@10": 0.50, "ndcg@10": 0.5}}]
    assert max(runs, key=lambda r: r["test"]["recall@10"])["name"] == "b"  # precondition: test would pick b
    assert G.select(runs)["name"] == "a"  # validation recall@10, then validation ndcg@10 breaks the tie


def test_grid_lists_llamarecs_search_with_attn_dropout_tied():
    configs = G.grid_configs()
    assert len(configs) == 12 and all(c["attn_dropout"] == c["dropout"] for c in configs)
    assert {c["weight_decay"] for c in configs} == {0.0, 0.01}


def test_killed_grid_trains_only_the_runs_without_a_result(tmp_path, monkeypatch):
    trained = []
    real = G.train_retriever

    def counting(cfg, *args, **kwargs):
        trained.append((cfg.weight_decay, cfg.dropout, cfg.seed))
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(G, "train_retriever", counting)
    base, data = tiny_cfg(max_epochs=1), _dataset()
    first = G.run_grid(base, data, tmp_path, SPACE, grid_seed=0, seeds=(0, 1), log=quiet, name="tiny")
    # 2 configurations at seed 0, then the selected one (= the reference: base has wd 0, dropout 0, or not) at seed 1
    assert len(trained) >= 3 and len(set(trained)) == len(trained)
    summary = json.loads((tmp_path / G.SUMMARY_FILE).read_text())
    assert set(summary["best"]["config"]) == set(G.TUNED_FIELDS)
    assert {"ndcg@10", "recall@10"} <= set(summary["best"]["test"]) and {"ndcg@10", "recall@10"} <= set(summary["best"]["val"])
    assert len(summary["runs"]) == 2 and (tmp_path / "grid.md").is_file() and (tmp_path / "grid.png").is_file()

    # A kill after the first run: its result stays, the other run's result is gone.
    killed = tmp_path / "runs" / G.run_name(G.grid_configs(SPACE)[1], 0) / G.RESULT_FILE
    assert killed.is_file()
    killed.unlink()
    trained.clear()
    second = G.run_grid(base, data, tmp_path, SPACE, grid_seed=0, seeds=(0, 1), log=quiet, name="tiny")
    assert trained == [(0.01, 0.0, 0)]  # only the missing run trained again
    assert second["best"] == first["best"] and [r["val"] for r in second["runs"]] == [r["val"] for r in first["runs"]]


def test_a_result_from_other_settings_is_trained_again(tmp_path):
    base, data = tiny_cfg(max_epochs=1), _dataset()
    run_dir = tmp_path / "run"
    G.run_one(base, data, run_dir, quiet)
    stamp = (run_dir / G.RESULT_FILE).stat().st_mtime_ns
    assert G.run_one(base, data, run_dir, quiet)["settings"] == G._settings(base)
    assert (run_dir / G.RESULT_FILE).stat().st_mtime_ns == stamp  # reused, not retrained
    messages = []
    G.run_one(tiny_cfg(max_epochs=1, lr=5e-3), data, run_dir, messages.append)
    assert any("other settings" in m for m in messages)


def test_a_reference_outside_the_searched_space_is_trained_for_the_comparison(tmp_path):
    base = tiny_cfg(max_epochs=1, weight_decay=0.0, dropout=0.1, attn_dropout=0.1)  # today's values
    space = {"weight_decay": [0.0], "dropout": [0.0]}
    assert {"weight_decay": 0.0, "dropout": 0.1, "attn_dropout": 0.1} not in G.grid_configs(space)  # precondition
    summary = G.run_grid(base, _dataset(), tmp_path, space, grid_seed=0, seeds=(0,), log=quiet)
    assert summary["reference"]["config"]["dropout"] == 0.1 and summary["reference"]["runs"] == ["ado0.1-do0.1-wd0-seed0"]
    assert summary["best"]["config"]["dropout"] == 0.0
