"""`rerank-dist tables`: the cells (grid, retriever, ranker per dataset and seed), their states and
commands, resuming, and LlamaRec's Tables 1 and 3 recomputed from the per-run files.

The seed-42 cells are copies of the session's `trained_run` (42 is every seed's default, so its stage
keys are the cell's): done cells without training anything.
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rerank_dist import llamarec_tables as tables
from rerank_dist.cli import build_parser, main
from rerank_dist.config import ConfigError
from rerank_dist.io import read_json, write_json, write_parquet
from rerank_dist.metrics import metrics_from_ranks, paired_bootstrap, per_user
from rerank_dist.paths import RunPaths
from tests.conftest import run_overrides

DATASET = "ml-latest-small"


def _base(trained_run) -> list[str]:
    """The trained run's overrides, less what the tables set per cell."""
    return [o for o in trained_run[1] if not o.startswith("run_dir=")]


def _seed_copy(trained_run, root: Path, seed: int) -> Path:
    target = root / DATASET / f"seed{seed}"
    shutil.copytree(trained_run[0], target)
    return target


def _plan(root: Path, trained_run, seeds=(42,), grid=False) -> tables.Plan:
    return tables.make_plan(root, [DATASET], list(seeds), grid, None, _base(trained_run))


def test_cells_of_a_copied_run_are_done_and_the_tables_command_trains_nothing(trained_run, tmp_path, capsys):
    _seed_copy(trained_run, tmp_path, 42)
    plan = _plan(tmp_path, trained_run)
    assert [(c.name, tables.cell_state(plan, c)) for c in tables.cells(plan)] == [
        (f"{DATASET}/seed42/retriever", "done"), (f"{DATASET}/seed42/ranker", "done")]
    assert main(["tables", *_base(trained_run), "--root", str(tmp_path), "--no-grid", "--seeds", "42"]) == 0
    out = capsys.readouterr().out
    assert out.count("done, skipped") == 2 and "[train]" not in out and "[score]" not in out
    written = read_json(tmp_path / tables.TABLES_FILE)
    assert written["datasets"][0]["rows"]["ranker"]["seeds"] == [42]
    assert (tmp_path / "tables.md").read_text().startswith("# LlamaRec's Tables 1 and 3")


def test_a_ranker_whose_scores_were_lost_is_scored_again_not_retrained(trained_run, tmp_path, capsys):
    run = _seed_copy(trained_run, tmp_path, 42)
    (run / "scores" / "stage.json").unlink()  # the score stage's record: as if scoring never finished
    RunPaths(run).metrics("test").unlink()
    plan = _plan(tmp_path, trained_run)
    ranker = tables.find_cell(plan, f"{DATASET}/seed42/ranker")
    assert tables.cell_state(plan, ranker) == "to do"
    assert main(["tables", *_base(trained_run), "--root", str(tmp_path), "--no-grid", "--seeds", "42"]) == 0
    out = capsys.readouterr().out
    assert f"{DATASET}/seed42/retriever: done, skipped" in out and f"{DATASET}/seed42/ranker: to do -> running" in out
    assert "[train] up to date" in out and "[score] test: reloading" in out
    assert tables.cell_state(plan, ranker) == "done" and RunPaths(run).metrics("test").is_file()


def _perturb(run: Path, rng: np.random.Generator) -> None:
    """Other numbers in every file the tables read, so that two seeds differ."""
    paths = RunPaths(run)
    retr = read_json(paths.retriever / "metrics_test.json")
    retr["full_catalogue"] = {k: v * rng.uniform(0.5, 1.5) for k, v in retr["full_catalogue"].items()}
    write_json(paths.retriever / "metrics_test.json", retr)
    cands = pd.read_parquet(paths.candidates("test"))
    cands["target_rank"] = rng.integers(-1, 20, len(cands))
    write_parquet(paths.candidates("test"), cands)
    metrics = read_json(paths.metrics("test"))
    for order in ("reranker", metrics["final_order"]):
        for subset in ("all_users", "retrieved_subset"):
            metrics[order][subset] = {k: v * rng.uniform(0.5, 1.5) for k, v in metrics[order][subset].items()}
    write_json(paths.metrics("test"), metrics)
    rankings = pd.read_parquet(paths.rankings("test"))
    rankings["target_rank"] = rng.integers(-1, 20, len(rankings))
    write_parquet(paths.rankings("test"), rankings.sample(frac=1.0, random_state=0))  # another row order too


def test_tables_equal_the_mean_and_std_of_the_per_run_files(trained_run, tmp_path):
    for seed in (0, 1, 2):
        _perturb(_seed_copy(trained_run, tmp_path, seed), np.random.default_rng(seed))
    plan = _plan(tmp_path, trained_run, seeds=(0, 1, 2))
    got = tables.write_tables(plan)["datasets"][0]
    runs = [RunPaths(tmp_path / DATASET / f"seed{s}") for s in (0, 1, 2)]
    retr1 = [read_json(r.retriever / "metrics_test.json")["full_catalogue"] for r in runs]
    ranks = [pd.read_parquet(r.candidates("test"))["target_rank"].to_numpy() for r in runs]
    retr3 = [metrics_from_ranks(x[x >= 0], (5, 10)) for x in ranks]
    metrics = [read_json(r.metrics("test")) for r in runs]
    expected = {
        "retriever": (retr1, retr3),
        "ranker": ([m[m["final_order"]]["all_users"] for m in metrics], [m[m["final_order"]]["retrieved_subset"] for m in metrics]),
        "llm_alone": ([m["reranker"]["all_users"] for m in metrics], [m["reranker"]["retrieved_subset"] for m in metrics]),
    }
    assert metrics[0]["final_order"] != "reranker"  # the ranker's row is its final (fused) order, not the LLM's
    for row, (table1, table3) in expected.items():
        for table, per_seed in (("table1", table1), ("table3", table3)):
            for column in tables.COLUMNS:
                values = [p[column] for p in per_seed]
                cell = got["rows"][row][table][column]
                assert cell["mean"] == pytest.approx(statistics.fmean(values), rel=1e-12, abs=0)
                assert cell["std"] == pytest.approx(statistics.stdev(values), rel=1e-9, abs=1e-15)
                assert f"{cell['mean']:.4f} ± {cell['std']:.4f}" in (tmp_path / "tables.md").read_text()
    # Paired: per-user differences averaged over seeds (users matched by id, whatever the row order).
    frames = [pd.read_parquet(r.rankings("test")).sort_values("user") for r in runs]
    diff = np.mean([per_user(f["target_rank"].to_numpy(), "ndcg@10") - per_user(f["retriever_rank"].to_numpy(), "ndcg@10")
                    for f in frames], axis=0)
    mean, low, high = paired_bootstrap(diff)
    assert (got["paired"]["ndcg@10"]["diff"], got["paired"]["ndcg@10"]["low"], got["paired"]["ndcg@10"]["high"]) == \
        pytest.approx((mean, low, high), rel=1e-12)
    assert got["paper"]["table1"]["retriever"]["ndcg@10"] == 0.0705  # LlamaRec's ML-100k row beside ours


def test_the_grid_cell_selects_and_the_retriever_cell_keeps_the_grids_model(tmp_path, model_dir, capsys):
    base = [o for o in run_overrides(tmp_path / "unused", model_dir) if not o.startswith("run_dir=")]
    args = ["tables", *base, "--root", str(tmp_path), "--seeds", "0", "1", "--weight-decay", "0", "--dropout", "0.1", "0.3"]
    assert main([*args, "--cell", f"{DATASET}/grid"]) == 0
    summary = read_json(tmp_path / DATASET / "grid" / "retriever_grid" / "grid.json")
    assert [r["config"]["dropout"] for r in summary["runs"]] == [0.1, 0.3] and summary["best"]["seeds"] == [0, 1]
    assert main([*args, "--cell", f"{DATASET}/seed1/retriever"]) == 0
    assert "reusing the checkpoint" in capsys.readouterr().out
    chosen = summary["best"]["config"]
    cell_run = tmp_path / DATASET / "seed1"
    trained = read_json(cell_run / "retriever" / "config.json")["retriever"]
    assert (trained["seed"], trained["dropout"], trained["weight_decay"]) == (1, chosen["dropout"], chosen["weight_decay"])
    from rerank_dist.retrieval.grid import run_name
    grid_run = read_json(tmp_path / DATASET / "grid" / "retriever_grid" / "runs" / run_name(chosen, 1) / "result.json")
    assert read_json(cell_run / "retriever" / "metrics_test.json")["full_catalogue"] == grid_run["test"]
    plan = tables.make_plan(tmp_path, [DATASET], [0, 1], True, None, base, {"weight_decay": [0], "dropout": [0.1, 0.3]})
    states = {c.name: tables.cell_state(plan, c) for c in tables.cells(plan)}
    assert states == {f"{DATASET}/grid": "done", f"{DATASET}/seed0/retriever": "to do",
                      f"{DATASET}/seed0/ranker": f"waiting for {DATASET}/seed0/retriever",
                      f"{DATASET}/seed1/retriever": "done", f"{DATASET}/seed1/ranker": "to do"}


def test_dry_run_prints_each_cell_its_state_and_commands_and_writes_nothing(tmp_path, capsys):
    assert main(["tables", "train.lr=1e-4", "--root", str(tmp_path), "--seeds", "0", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    printed = next(line.split() for line in out.splitlines() if line.endswith(f"--cell {DATASET}/seed1/ranker"))
    again = build_parser().parse_args(printed[1:])  # the printed command means the same cell and plan
    assert (again.cell, again.seeds, again.overrides, again.root) == (f"{DATASET}/seed1/ranker", [0, 1],
                                                                    ["train.lr=1e-4"], str(tmp_path))
    assert f"{DATASET}/grid  [to do]" in out
    assert f"{DATASET}/seed1/retriever  [waiting for {DATASET}/grid]  (after {DATASET}/grid)" in out
    assert "= rerank-dist train train.lr=1e-4 data.source=bundled" in out
    assert "--weight-decay 0 0.01 --dropout 0 0.1 0.2 0.3 0.4 0.5 --seeds 0 1 --grid-seed 0" in out  # LlamaRec's grid
    assert list(tmp_path.iterdir()) == []
    assert main(["tables", "--root", str(tmp_path), "--seeds", "0", "--no-grid", "--list-cells"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert lines == [[f"{DATASET}/seed0/retriever", "retriever", "to do", "-"],
                     [f"{DATASET}/seed0/ranker", "ranker", f"waiting for {DATASET}/seed0/retriever",
                      f"{DATASET}/seed0/retriever"]]


def test_plan_problems_are_reported_together_before_anything_runs(tmp_path, capsys):
    code = main(["tables", "data.min_count=3", "retriever.dropout=0.1", "train.seed=3", "--root", str(tmp_path),
                 "--datasets", "nosuch", "ml-1m", "ml-1m", "train.lr=1e-4", "--seeds", "1", "1"])
    err = capsys.readouterr().err
    assert code == 2 and list(tmp_path.iterdir()) == []
    for expected in ("unknown dataset 'nosuch'", "ml-1m given twice", "--seeds: expected distinct",
                     "data.min_count=3: the tables set data.min_count", "the grid selects retriever.dropout",
                     "train.seed=3: the tables set train.seed", "'train.lr=1e-4' looks like an override"):
        assert expected in err, err


def test_dataset_specs_by_name_by_directory_and_by_yaml(tmp_path):
    assert tables.parse_dataset("beauty").overrides == ("data.source=download", "data.dataset=beauty")
    (tmp_path / "raw").mkdir()
    assert tables.parse_dataset(f"games={tmp_path / 'raw'}").overrides == (
        "data.source=local", "data.dataset=games", f"data.raw_dir={tmp_path / 'raw'}")
    spec = tmp_path / "mine.yaml"
    spec.write_text("data:\n  source: local\n  dataset: custom\n  format: table\n  raw_dir: /d\n"
                    "  columns: {user: uid, item: iid}\n")
    mine = tables.parse_dataset(f"shop={spec}")
    assert mine.label == "shop" and mine.paper is None and mine.spec == f"shop={spec}"  # how the dry run spells it
    assert mine.overrides == ("data.source=local", "data.dataset=custom", "data.format=table", "data.raw_dir=/d",
                              "data.columns.user=uid", "data.columns.item=iid")
    with pytest.raises(ConfigError, match="not a directory"):
        tables.parse_dataset(f"games={tmp_path / 'missing'}")
    assert json.dumps(tables.PAPER)  # the paper's figures are plain data (they go into tables.json)


def test_a_local_named_dataset_runs_its_retriever_cell_and_sits_next_to_the_papers_row(tmp_path, capsys):
    """games=DIR (LlamaRec's Games layout: ratings CSV + metadata JSON lines, here 40 users x 12 of 60 items)."""
    rng = np.random.default_rng(0)
    raw = tmp_path / "games_raw"
    raw.mkdir()
    (raw / "ratings_Video_Games.csv").write_text("".join(
        f"u{u},i{i},5.0,{1000 * u + k}\n" for u in range(40) for k, i in enumerate(rng.choice(60, 12, replace=False))))
    (raw / "meta_Video_Games.json").write_text("".join(json.dumps({"asin": f"i{i}", "title": f"Game {i}"}) + "\n"
                                                       for i in range(60)))
    tiny = ["retriever.embed_dim=8", "retriever.max_epochs=1", "retriever.max_len=8", "retriever.max_minutes=0",
            "retriever.top_k=4"]
    args = ["tables", *tiny, "--root", str(tmp_path / "root"), "--no-grid", "--seeds", "0", "--datasets", f"games={raw}"]
    assert main([*args, "--cell", "games/seed0/ranker"]) == 2  # refused: its retriever is not done
    assert "games/seed0/ranker: waiting for games/seed0/retriever" in capsys.readouterr().err
    assert main([*args, "--cell", "games/seed0/retriever"]) == 0
    assert main([*args, "--tables-only"]) == 0
    written = read_json(tmp_path / "root" / tables.TABLES_FILE)["datasets"][0]
    assert written["dataset"] == "games" and written["rows"]["retriever"]["users"] == 40
    assert list(written["rows"]) == ["retriever"]
    md = (tmp_path / "root" / "tables.md").read_text()
    assert "| games | LRURec (LlamaRec's paper) | | - | - | - | 0.0800 | 0.1463 | - |" in md
    assert "Cells not done: games/seed0/ranker (to do)" in md


@pytest.mark.distributed
def test_tables_on_two_processes_split_the_grid_and_run_every_cell_once(tmp_path, model_dir):
    from tests.test_distributed import _run

    base = [o for o in run_overrides(tmp_path / "unused", model_dir) if not o.startswith("run_dir=")]
    root = tmp_path / "tables"
    result = _run("launch", "--nproc-per-node", "2", "tables", *base, "--root", str(root), "--seeds", "0",
                  "--weight-decay", "0", "--dropout", "0.1", "0.3")
    assert [line for line in result.stdout.splitlines() if line.startswith("[tables] ") and "running" in line] == [
        f"[tables] {DATASET}/grid: to do -> running", f"[tables] {DATASET}/seed0/retriever: to do -> running",
        f"[tables] {DATASET}/seed0/ranker: to do -> running"]
    grid = read_json(root / DATASET / "grid" / "retriever_grid" / "grid.json")
    assert grid["processes"] == 2 and len(grid["runs"]) == 2
    run = RunPaths(root / DATASET / "seed0")
    assert read_json(run.ranker / "train_summary.json")["world_size"] == 2
    assert read_json(run.metrics("test"))["world_size"] == 2
    assert set(read_json(root / tables.TABLES_FILE)["cells"].values()) == {"done"}
