"""End to end on the bundled data with a tiny random model: every stage, resume, and 2-process runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rerank_dist import pipeline
from rerank_dist.checkpoint import BEST_FILES, STEP_FILES
from rerank_dist.cli import main
from rerank_dist.config import load_config
from rerank_dist.io import read_json
from rerank_dist.paths import RunPaths
from tests.conftest import run_overrides as _overrides

REPO = Path(__file__).resolve().parents[1]


def test_every_stage_writes_its_outputs(trained_run):
    run_dir, _ = trained_run
    paths = RunPaths(run_dir)
    meta = read_json(paths.data / "meta.json")
    assert (meta["num_users"], meta["num_items"], meta["num_interactions"]) == (610, 3650, 90274)
    for split in ("train", "val", "test"):
        cands = pd.read_parquet(paths.candidates(split))
        assert len(cands) == 610 and all(len(c) == 20 for c in cands["candidates"])
    log = [json.loads(line) for line in paths.train_log.read_text().splitlines()]
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    assert [r["step"] for r in log if r.get("event") == "eval"] == [2, 4]
    assert {p.name for p in paths.best.iterdir()} == BEST_FILES
    for step in (2, 4):
        assert {p.name for p in paths.step_dir(step).iterdir()} == STEP_FILES
    assert not list(paths.root.rglob("*.bin")) and not list(paths.root.rglob("*.tmp"))


def test_scores_cover_every_user_with_baselines(trained_run):
    run_dir, _ = trained_run
    paths = RunPaths(run_dir)
    metrics = read_json(paths.metrics("test"))
    summary = read_json(paths.ranker / "train_summary.json")
    assert metrics["adapter_step"] == summary["best_step"]  # what was scored is the saved best
    for order in ("reranker", "retriever_order", "random_order"):
        rep = metrics[order]
        assert rep["num_users"] == 610 and rep["num_candidates"] == 20
        assert rep["num_retrieved"] == (pd.read_parquet(paths.candidates("test"))["target_rank"] >= 0).sum()
        assert set(rep["all_users"]) >= {"recall@1", "ndcg@5", "recall@10", "ndcg@10", "mrr@10"}
    rankings = pd.read_parquet(paths.rankings("test"))
    assert len(rankings) == 610
    hit = rankings[rankings["target_rank"] >= 0]
    # the retriever-order baseline really is the retriever's order on the displayed candidates
    retr = np.mean([1.0 if r < 10 else 0.0 for r in hit["retriever_rank"]]) * len(hit) / 610
    assert metrics["retriever_order"]["all_users"]["recall@10"] == pytest.approx(retr)
    report = (paths.report).read_text()
    assert "random order" in report and "retriever order" in report and "Training loss" in report


def test_scoring_uses_the_adapter_on_disk(trained_run, tmp_path):
    """Corrupting the saved adapter changes the scores: the scorer reads from disk, not memory."""
    run_dir, overrides = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    from safetensors.torch import load_file, save_file

    adapter = copy / "ranker" / "best" / "adapter_model.safetensors"
    weights = {k: v * 0 for k, v in load_file(adapter).items()}
    save_file(weights, adapter)
    cfg = load_config(overrides=[*overrides, f"run_dir={copy}", "score.max_users=32"])
    pipeline.score(cfg)
    before = pd.read_parquet(RunPaths(run_dir).rankings("test")).head(32)
    after = pd.read_parquet(RunPaths(copy).rankings("test"))
    diff = np.abs(np.stack(before["scores"]) - np.stack(after["scores"])).max()
    assert diff > 1e-4


def test_resume_continues_the_step_count(trained_run, tmp_path):
    run_dir, overrides = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "ranker" / "step-000004")  # as if killed after step 2's checkpoint
    (copy / "ranker" / "stage.json").unlink()
    cfg = load_config(overrides=[*overrides, f"run_dir={copy}", "train.max_steps=6"])
    summary = pipeline.train(cfg)
    assert summary["resumed_from"].endswith("step-000002") and summary["steps"] == 6
    log = [json.loads(line) for line in (copy / "ranker" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]  # no duplicates from the lost run
    assert (copy / "ranker" / "step-000006").is_dir()


def test_a_training_with_other_inputs_is_set_aside_not_resumed(trained_run, tmp_path):
    """Changing a setting that shapes training (here the learning rate) must not continue the old
    run's checkpoints: the old ranker/ is moved aside intact and training starts at step 1."""
    run_dir, overrides = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    cfg = load_config(overrides=[*overrides, f"run_dir={copy}", "train.lr=5e-3", "train.max_steps=2"])
    summary = pipeline.train(cfg)
    assert summary["resumed_from"] == "" and summary["steps"] == 2
    (moved,) = copy.glob("ranker.replaced-*")
    assert (moved / "best" / "adapter_model.safetensors").is_file() and (moved / "step-000004").is_dir()
    log = [json.loads(line) for line in (copy / "ranker" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]


def test_changed_local_raw_files_redo_prepare_and_what_follows(tmp_path, capsys):
    from tests.test_data import dense_block, write_local

    movies = [(m, f"Movie {m} (2000)") for m in range(1, 9)]
    raw = write_local(tmp_path / "raw", dense_block(range(1, 7), range(1, 9)), movies)
    cfg = load_config(overrides=[f"run_dir={tmp_path / 'run'}", "data.source=local", f"data.raw_dir={raw}",
                                 "data.min_count=1"])
    pipeline.prepare(cfg)
    pipeline._mark(cfg, "retrieve", 0.0)  # stands in for a finished retrieve stage
    assert pipeline._done(cfg, "retrieve")
    pipeline.prepare(cfg)
    assert capsys.readouterr().out.count("up to date") == 1
    write_local(raw, dense_block(range(1, 8), range(1, 9)), movies)  # one more user, same config
    assert not pipeline._done(cfg, "prepare")
    assert pipeline.prepare(cfg)["num_users"] == 7
    assert not pipeline._done(cfg, "retrieve")


def test_stages_are_skipped_when_up_to_date(trained_run, capsys):
    run_dir, overrides = trained_run
    cfg = load_config(overrides=overrides)
    pipeline.prepare(cfg)
    pipeline.retrieve(cfg)
    pipeline.train(cfg)
    out = capsys.readouterr().out
    assert out.count("up to date") == 3


def _accelerate(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.distributed
def test_two_process_scoring_equals_one_process(trained_run, tmp_path):
    run_dir, overrides = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    for f in (RunPaths(copy).rankings("test"), RunPaths(copy).metrics("test")):
        f.unlink()
    _accelerate(["launch/score.py", *overrides, f"run_dir={copy}"])
    one = pd.read_parquet(RunPaths(run_dir).rankings("test"))
    two = pd.read_parquet(RunPaths(copy).rankings("test"))
    assert one["user"].tolist() == two["user"].tolist()
    assert np.abs(np.stack(one["scores"]) - np.stack(two["scores"])).max() <= 1e-5
    assert one["target_rank"].tolist() == two["target_rank"].tolist()
    m1, m2 = read_json(RunPaths(run_dir).metrics("test")), read_json(RunPaths(copy).metrics("test"))
    assert m1["reranker"]["all_users"] == pytest.approx(m2["reranker"]["all_users"], abs=1e-9)


@pytest.mark.distributed
def test_two_process_training_runs_unchanged(trained_run, tmp_path):
    run_dir, overrides = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "ranker")
    _accelerate(["launch/train.py", *overrides, f"run_dir={copy}", "train.max_steps=2"])
    log = [json.loads(line) for line in (copy / "ranker" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]
    assert (copy / "ranker" / "best" / "adapter_model.safetensors").is_file()
