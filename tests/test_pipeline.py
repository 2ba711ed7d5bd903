"""End to end on the bundled data with a tiny random model: every stage, skipping, resume, stage order.

Several processes and nodes: tests/test_distributed.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from rerank_dist import pipeline
from rerank_dist.checkpoint import BEST_FILES, step_files
from rerank_dist.cli import main
from rerank_dist.settings import load_config
from rerank_dist.io import read_json
from rerank_dist.paths import RunPaths


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
        assert {p.name for p in paths.step_dir(step).iterdir()} == step_files(world_size=1)
    # Weights only as safetensors; the optimizer state (accelerate's optimizer.bin) must load without
    # unpickling code, and no temporary file or directory is left behind.
    assert {p.name for p in paths.root.rglob("*.bin")} == {"optimizer.bin"}
    for state in paths.root.rglob("*.bin"):
        torch.load(state, weights_only=True)
    assert not list(paths.root.rglob("*.tmp"))


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
    # The retriever-order baseline is the retriever's own order: its Recall@10 is the share of users whose
    # target sits in the first 10 of the candidates file (written by the retrieve stage, read directly).
    cands = pd.read_parquet(paths.candidates("test"))
    in_top10 = [t in list(c)[:10] for t, c in zip(cands["target"], cands["candidates"])]
    assert 0 < sum(in_top10) < 610  # the check below can tell a right baseline from a wrong one
    assert metrics["retriever_order"]["all_users"]["recall@10"] == pytest.approx(sum(in_top10) / 610)
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


def test_final_order_fusion_and_protocol_are_recorded(trained_run):
    run_dir, _ = trained_run
    paths = RunPaths(run_dir)
    metrics = read_json(paths.metrics("test"))
    assert metrics["final_order"] == "fused" and {"reranker", "fused"} <= set(metrics)
    assert metrics["protocol"] == {"train_order": "shuffled", "eval_order": "retriever", "negatives": "retriever",
                                   "train_targets": "all", "permutations": 1}
    fusion = metrics["fusion"]
    assert fusion["chosen_on"] == "val" and str(fusion["weight"]) in fusion["grid"]
    val = pd.read_parquet(paths.candidates("val"))
    assert fusion["val_users_scored"] == int((val["target_rank"] >= 0).sum()) and fusion["val_users"] == 610
    for pair in ("fused_vs_retriever_order", "reranker_vs_random_order"):
        ci = metrics["paired"][pair]["ndcg@10"]
        assert ci["low"] <= ci["diff"] <= ci["high"]
    # The rankings follow the final order, ties as the metrics break them; scores stay the LLM's own.
    rankings = pd.read_parquet(paths.rankings("test"))
    final = np.stack(rankings["final_scores"])
    for row in rankings.itertuples():
        if row.target_rank >= 0:
            assert list(row.reranked).index(row.target) == row.target_rank
    assert metrics["fused"]["all_users"]["recall@5"] == pytest.approx(float((rankings["target_rank"].between(0, 4)).mean()))
    assert final.shape == np.stack(rankings["scores"]).shape == (610, 20)
    assert not list((run_dir / "scores").glob("*/part-*"))  # resumable parts removed once the rankings hold them


def test_permutation_averaging_scores_each_prompt_under_every_order(trained_run, tmp_path):
    run_dir, overrides = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    cfg = load_config(overrides=[*overrides, f"run_dir={copy}", "score.max_users=24", "score.permutations=3",
                                 "score.fusion=false"])
    pipeline.score(cfg)
    metrics = read_json(RunPaths(copy).metrics("test"))
    assert metrics["final_order"] == "permuted" and metrics["protocol"]["permutations"] == 3
    cost = metrics["permutation_cost"]
    assert cost["permutations"] == 3 and len(cost["seconds_per_order"]) == 3 and cost["cost_vs_one_order"] > 1
    rankings = pd.read_parquet(RunPaths(copy).rankings("test"))
    averaged, single = np.stack(rankings["permuted_scores"]), np.stack(rankings["scores"])
    assert averaged.shape == single.shape == (24, 20)
    # A mean of log-probabilities: every value < 0 and (Jensen) the exponentials sum to at most 1.
    assert (averaged < 0).all() and (np.exp(averaged).sum(axis=1) <= 1 + 1e-6).all()
    assert not np.allclose(averaged - averaged.max(axis=1, keepdims=True),
                           single - single.max(axis=1, keepdims=True))  # other orders changed the scores


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
    assert pipeline.stage_done(cfg, "retrieve")
    pipeline.prepare(cfg)
    assert capsys.readouterr().out.count("up to date") == 1
    write_local(raw, dense_block(range(1, 8), range(1, 9)), movies)  # one more user, same config
    assert not pipeline.stage_done(cfg, "prepare")
    assert pipeline.prepare(cfg)["num_users"] == 7
    assert not pipeline.stage_done(cfg, "retrieve")


def test_stages_are_skipped_when_up_to_date(trained_run, capsys):
    run_dir, overrides = trained_run
    cfg = load_config(overrides=overrides)
    pipeline.prepare(cfg)
    pipeline.retrieve(cfg)
    pipeline.train(cfg)
    out = capsys.readouterr().out
    assert out.count("up to date") == 3


# ---------------------------------------------------------------- a stage on an existing run


def test_a_stage_on_an_existing_run_uses_the_runs_own_settings(trained_run, tmp_path, capsys):
    """`rerank-dist score run_dir=R` alone: R's recorded config.yaml (a tiny float32 model), not the
    defaults (SmolLM2 in dtype auto), so the scores are exactly the run's own."""
    run_dir, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    RunPaths(copy).rankings("test").unlink()
    recorded = yaml.safe_load((copy / "config.yaml").read_text())["model"]
    assert (recorded["dtype"], load_config().model.dtype) == ("float32", "auto")  # the defaults would differ
    assert recorded["name_or_path"] != load_config().model.name_or_path
    assert main(["score", f"run_dir={copy}"]) == 0
    assert f"settings: {copy / 'config.yaml'}" in capsys.readouterr().out
    want = np.stack(pd.read_parquet(RunPaths(run_dir).rankings("test"))["scores"])
    got = np.stack(pd.read_parquet(RunPaths(copy).rankings("test"))["scores"])
    assert np.array_equal(got, want)


@pytest.mark.parametrize("stage,override,field,was", [
    ("score", "model.dtype=bfloat16", "model.dtype", "'float32'"),
    ("export", "prompt.history_items=7", "prompt.history_items", "5"),
    ("train", "retriever.top_k=10", "retriever.top_k", "20"),
])
def test_an_override_that_contradicts_saved_outputs_is_refused(trained_run, tmp_path, capsys, stage, override,
                                                                 field, was):
    run_dir, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()}
    assert main([stage, f"run_dir={copy}", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {field}: ") and f"made with {was}" in err[0]
    assert override.split("=")[1] in err[0] and "rerank-dist run" in err[0]
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()} == before  # nothing touched


def test_token_budget_and_merged_weights_score_as_the_default_and_are_recorded(trained_run, tmp_path):
    run_dir, overrides = trained_run
    default = read_json(RunPaths(run_dir).metrics("test"))["batching"]
    assert default == {"batch_size": 16, "token_budget": 0, "batches": default["batches"],
                       "padding_waste": default["padding_waste"], "oom_retries": 0} and default["batches"] == 39
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    cfg = load_config(overrides=[*overrides, f"run_dir={copy}", "score.max_users=48", "score.token_budget=2000",
                                 "score.merged_weights=true", "score.fusion=false"])
    pipeline.score(cfg)
    metrics = read_json(RunPaths(copy).metrics("test"))
    batching = metrics["batching"]
    assert metrics["merged_weights"] is True and batching["token_budget"] == 2000 and batching["oom_retries"] == 0
    assert 0 <= batching["padding_waste"] < 1 and batching["batches"] not in (3, 48)  # neither 16 nor 1 per batch
    # float32: other batch-mates and the merged adapter change the scores by rounding alone.
    before = np.stack(pd.read_parquet(RunPaths(run_dir).rankings("test")).head(48)["scores"])
    after = np.stack(pd.read_parquet(RunPaths(copy).rankings("test"))["scores"])
    assert np.abs(before - after).max() <= 1e-4
    # The doctor re-scores as the scorer did (merged model, the budget's batch-mates): to the last bit.
    from rerank_dist.doctor.runner import DoctorOptions, diagnose

    _, evidence = diagnose(copy, DoctorOptions(plots=False, write=False), cfg=cfg)
    assert evidence.probe.prompts > 0 and evidence.probe.candidates_match and evidence.probe.max_abs_diff == 0.0
