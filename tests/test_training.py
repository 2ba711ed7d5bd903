"""The training loop's contract with its surroundings: trackers, and precision taken from the config."""

from __future__ import annotations

import json
import shutil

import pytest

from rerank_dist import pipeline
from rerank_dist.settings import load_config
from rerank_dist.paths import RunPaths


def _untrained_copy(trained_run, tmp_path):
    """The session's run copied without its ranker/ (the data, retriever and examples store kept)."""
    run_dir, overrides = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "ranker")
    return copy, overrides


def test_tensorboard_receives_loss_lr_grad_norm_throughput_and_validation(trained_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    copy, overrides = _untrained_copy(trained_run, tmp_path)
    cfg = load_config(overrides=[*overrides, f"run_dir={copy}", "train.report_to=tensorboard", "train.max_steps=2",
                                 "train.eval_every=2"], world_size=1)
    pipeline.train(cfg)
    logdir = copy / "ranker" / "trackers" / "rerank_dist"  # the scalars; hyperparameters go to a subdirectory
    assert list(logdir.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/ndcg@10"} <= set(acc.Tags()["scalars"])
    log = [json.loads(line) for line in RunPaths(copy).train_log.read_text().splitlines()]
    logged = {r["step"]: r["loss"] for r in log if "loss" in r}
    assert {e.step: e.value for e in acc.Scalars("train/loss")} == pytest.approx(logged, abs=1e-5)
    assert [e.step for e in acc.Scalars("val/ndcg@10")] == [2]


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one state per process; these tests must create it themselves and leave none."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("configured", ["no", "bf16"])
def test_mixed_precision_comes_from_the_config_not_the_launcher(monkeypatch, fresh_accelerate_state, configured):
    from rerank_dist.distributed import build_accelerator
    from rerank_dist.plan import plan_for

    launcher = "bf16" if configured == "no" else "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)  # what `accelerate launch --mixed_precision` sets
    cfg = load_config(overrides=[f"train.mixed_precision={configured}"], world_size=1)
    notes: list[str] = []
    accelerator = build_accelerator(cfg, plan_for(cfg, 1), say=notes.append)
    assert accelerator.mixed_precision == configured
    assert notes and launcher in notes[0]  # the disagreement is said, not silently resolved
    assert accelerator.gradient_accumulation_steps == plan_for(cfg, 1).accumulation == 8


def test_early_stopping_ends_after_patience_validations_without_improvement_and_keeps_the_best(trained_run, tmp_path):
    copy, overrides = _untrained_copy(trained_run, tmp_path)
    # A learning rate too small to move any score: after step 1's validation none is better.
    cfg = load_config(overrides=[*overrides, f"run_dir={copy}", "train.lr=1e-12", "train.max_steps=12",
                                 "train.eval_every=1", "train.patience=2", "train.save_every=0"], world_size=1)
    summary = pipeline.train(cfg)
    log = [json.loads(line) for line in RunPaths(copy).train_log.read_text().splitlines()]
    evals = [r for r in log if r.get("event") == "eval"]
    assert [e["step"] for e in evals] == [1, 2, 3] and [e["best"] for e in evals] == [True, False, False]
    assert [r for r in log if r.get("event") == "early_stop"] == [
        {"step": 3, "event": "early_stop", "best_step": 1, "best_val_ndcg@10": evals[0]["val_ndcg@10"], "patience": 2}]
    assert summary["steps"] == 3 < summary["total_steps"] and summary["stopped_by"] == "early_stopping"
    assert summary["best_step"] == 1
    assert json.loads((RunPaths(copy).best / "verbalizer.json").read_text())["step"] == 1  # what gets scored


def test_without_patience_the_run_goes_to_its_last_step(trained_run, tmp_path):
    copy, overrides = _untrained_copy(trained_run, tmp_path)
    cfg = load_config(overrides=[*overrides, f"run_dir={copy}", "train.lr=1e-12", "train.max_steps=4",
                                 "train.eval_every=1", "train.save_every=0"], world_size=1)
    assert cfg.train.patience == 0
    summary = pipeline.train(cfg)
    assert summary["steps"] == 4 and summary["stopped_by"] == "steps"
