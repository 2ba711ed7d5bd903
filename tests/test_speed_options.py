"""The training speed options against the default path on the session's tiny run: each option trains
the same examples to the same losses within a stated tolerance, and is recorded in train_summary.json."""

from __future__ import annotations

import json
import shutil

import pytest

from rerank_dist import pipeline
from rerank_dist.paths import RunPaths
from rerank_dist.settings import load_config

# Two optimizer steps, no dropout (every path draws the same, no masks), validation only at the end.
SHORT = ["model.lora_dropout=0", "train.max_steps=2", "train.eval_every=2", "train.save_every=0", "train.lr=1e-2"]


def _train(trained_run, tmp_path, name: str, *extra: str) -> tuple[dict, list[float]]:
    run_dir, overrides = trained_run
    copy = tmp_path / name
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("ranker"))
    cfg = load_config(overrides=[*overrides, f"run_dir={copy}", *SHORT, *extra], world_size=1)
    summary = pipeline.train(cfg)
    log = [json.loads(line) for line in RunPaths(copy).train_log.read_text().splitlines()]
    return summary, [r["loss"] for r in log if "loss" in r]


@pytest.fixture(scope="module")
def default_path(trained_run, tmp_path_factory) -> tuple[dict, list[float]]:
    return _train(trained_run, tmp_path_factory.mktemp("default"), "default")


def test_packed_micro_batches_train_to_the_padded_losses_without_padding(trained_run, tmp_path, default_path):
    base_summary, base = default_path
    summary, losses = _train(trained_run, tmp_path, "packed", "train.packing=true")
    assert base_summary["padding_share"] > 0  # the precondition: the padded path computed padding
    assert summary["packing"] is True and summary["padding_share"] == 0
    print(f"packing: losses {losses} vs padded {base}")
    assert len(losses) == len(base) == 2
    # fp32 on both; the second step's loss follows a step taken with the first step's gradients
    assert max(abs(a - b) for a, b in zip(losses, base)) <= 1e-5


def test_auto_memory_options_are_decided_recorded_and_followed_by_scoring(trained_run, tmp_path):
    """model.gradient_checkpointing=auto and model.quantization=auto on this CPU: the tiny model fits its RAM
    many times over, so both stay off; the choice and its reason are in train_summary.json, the checkpoint's
    config.yaml records the concrete values, and scoring with quantization=auto follows that record."""
    import yaml

    from rerank_dist import modeling
    from rerank_dist.config import ModelConfig

    summary, losses = _train(trained_run, tmp_path, "auto", "model.gradient_checkpointing=auto",
                             "model.quantization=auto")
    choice = summary["memory_options"]
    assert choice["asked"] == {"gradient_checkpointing": "auto", "quantization": "auto"}
    assert (choice["gradient_checkpointing"], choice["quantization"]) == ("false", "none")
    assert "fits" in choice["reason"] and choice["device_gib"] > 0
    best = tmp_path / "auto" / "ranker" / "best"
    recorded = yaml.safe_load((best / "config.yaml").read_text())["model"]
    assert (recorded["gradient_checkpointing"], recorded["quantization"]) == ("false", "none")
    assert modeling.trained_quantization(best) == "none"
    with pytest.raises(FileNotFoundError, match="model.quantization=auto"):
        modeling.trained_quantization(tmp_path)  # no record: refused, not guessed
    assert ModelConfig().gradient_checkpointing == "false" and len(losses) == 2


def test_a_resumed_run_keeps_its_auto_choice_on_a_device_that_would_choose_otherwise(trained_run, tmp_path, monkeypatch):
    """A run that decided auto on one device and restarts on a smaller one goes on as it started (the
    checkpoint's config.yaml), not in 4-bit halfway through."""
    from rerank_dist import train as train_module
    from rerank_dist.plan import plan_for, resolve_auto

    auto = ["model.gradient_checkpointing=auto", "model.quantization=auto", "train.save_every=1"]
    first, _ = _train(trained_run, tmp_path, "auto", *auto)
    assert (first["memory_options"]["quantization"], first["memory_options"]["gradient_checkpointing"]) == ("none", "false")
    run_dir, overrides = trained_run
    cfg = load_config(overrides=[*overrides, f"run_dir={tmp_path / 'auto'}", *SHORT, *auto, "train.max_steps=3"],
                      world_size=1)
    # The precondition: on a device of 1 MiB a fresh run would take 4-bit and checkpointing.
    _, fresh = resolve_auto(cfg, plan_for(cfg, 1), 2**20, "cpu")
    assert (fresh["quantization"], fresh["gradient_checkpointing"]) == ("nf4", "true"), fresh
    monkeypatch.setattr(train_module, "device_memory_bytes", lambda device=None: 2**20)
    resumed = pipeline.train(cfg)
    choice = resumed["memory_options"]
    assert resumed["resumed_from"].endswith("step-000002") and resumed["steps"] == 3
    assert (choice["quantization"], choice["gradient_checkpointing"]) == ("none", "false")
    assert "step-000002/config.yaml" in choice["reason"], choice
