"""Stages and their order: prepare -> retrieve -> train -> score -> report.

Each stage reads the previous stage's files in the run directory and writes its own. A stage whose
outputs exist for the same inputs is skipped, so a rerun after a crash continues where it stopped.
A stage's inputs are the config sections it depends on, the key of the stage before it (so a stage
that is redone makes every later one redo too) and, for data.source=local, the raw files' contents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Callable

from rerank_dist.config import RunConfig, save_config
from rerank_dist.io import read_json, write_json
from rerank_dist.paths import RunPaths, cache_dir

# The config sections each stage's output depends on.
STAGE_INPUTS = {
    "prepare": ("data",),
    "retrieve": ("data", "retriever"),
    "train": ("data", "retriever", "prompt", "model", "train"),
}


UPSTREAM = {"prepare": None, "retrieve": "prepare", "train": "retrieve"}
MARKER = "stage.json"
# Train fields that only say how long to run, how often to checkpoint and how to validate: changing
# them continues the same training run (resume), any other change starts a new one.
RUN_LENGTH_FIELDS = {"epochs", "max_steps", "max_minutes", "save_every", "eval_every", "eval_users", "resume"}
RANKER_INPUTS = "inputs.json"


def _stage_dir(cfg: RunConfig, stage: str) -> Path:
    paths = RunPaths(Path(cfg.run_dir))
    return {"prepare": paths.data, "retrieve": paths.retriever, "train": paths.ranker}[stage]


def _recorded_key(cfg: RunConfig, stage: str) -> str:
    """The key a finished stage recorded, or "not run"."""
    marker = _stage_dir(cfg, stage) / MARKER
    return read_json(marker).get("key", "") if marker.is_file() else "not run"


def _stage_key(cfg: RunConfig, stage: str) -> str:
    """What a stage's outputs were made from (see the module docstring), as one hash."""
    parts = [cfg.section_hash(*STAGE_INPUTS[stage])]
    upstream = UPSTREAM[stage]
    if upstream is not None:
        parts.append(_recorded_key(cfg, upstream))
    if stage == "prepare" and cfg.data.source == "local":
        from rerank_dist.data.sources import local_fingerprint

        parts.append(local_fingerprint(cfg.data.raw_dir))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _done(cfg: RunConfig, stage: str) -> bool:
    return _recorded_key(cfg, stage) == _stage_key(cfg, stage)


def _mark(cfg: RunConfig, stage: str, seconds: float) -> None:
    write_json(_stage_dir(cfg, stage) / MARKER, {"stage": stage, "key": _stage_key(cfg, stage),
                                                 "seconds": round(seconds, 1)})


def prepare(cfg: RunConfig, log: Callable[[str], None] = print) -> dict:
    from rerank_dist.data.prepare import prepare_data

    paths = RunPaths(Path(cfg.run_dir))
    if _done(cfg, "prepare"):
        log(f"[prepare] up to date: {paths.data}")
        return read_json(paths.data / "meta.json")
    started = time.time()
    log(f"[prepare] {cfg.data.dataset} from {cfg.data.source} -> {paths.data}")
    meta = prepare_data(cfg.data, paths.data, cache_dir(cfg.model.cache_dir), log=log)
    _mark(cfg, "prepare", time.time() - started)
    return meta


def retrieve(cfg: RunConfig, log: Callable[[str], None] = print) -> dict:
    from rerank_dist.data.prepare import load_dataset
    from rerank_dist.retrieval.stage import run_retriever_stage

    paths = RunPaths(Path(cfg.run_dir))
    if _done(cfg, "retrieve"):
        log(f"[retrieve] up to date: {paths.retriever}")
        return read_json(paths.retriever / "metrics_test.json")
    started = time.time()
    log(f"[retrieve] training LRURec (budget {cfg.retriever.max_minutes} min) -> {paths.retriever}")
    metrics = run_retriever_stage(cfg.retriever, load_dataset(paths.data), paths.retriever, log=log)
    _mark(cfg, "retrieve", time.time() - started)
    return metrics


def _training_run_key(cfg: RunConfig) -> str:
    """What makes two trainings the same run that one may resume: the retriever's candidates and
    every setting except RUN_LENGTH_FIELDS."""
    payload = {"retrieve": _recorded_key(cfg, "retrieve"),
               **{s: dataclasses.asdict(getattr(cfg, s)) for s in ("data", "retriever", "prompt", "model")},
               "train": {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in RUN_LENGTH_FIELDS}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _set_aside_other_run(cfg: RunConfig, log: Callable[[str], None]) -> None:
    """Outputs in ranker/ from a training with other inputs must not be resumed (that would quietly
    continue the old run): move them to ranker.replaced-<time>/ and record this run's inputs."""
    paths = RunPaths(Path(cfg.run_dir))
    key = _training_run_key(cfg)
    inputs = paths.ranker / RANKER_INPUTS
    if paths.ranker.is_dir() and any(paths.ranker.iterdir()):
        if inputs.is_file() and read_json(inputs).get("key") == key:
            return
        moved = paths.root / f"ranker.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        paths.ranker.rename(moved)
        log(f"[train] {paths.ranker} held a training with other inputs; moved it to {moved}, starting afresh")
    write_json(inputs, {"key": key})


def train(cfg: RunConfig, log: Callable[[str], None] = print) -> dict:
    from accelerate import PartialState

    from rerank_dist.train import train as train_loop

    paths = RunPaths(Path(cfg.run_dir))
    if _done(cfg, "train") and (paths.best / "adapter_model.safetensors").is_file():
        log(f"[train] up to date: {paths.best}")
        return read_json(paths.ranker / "train_summary.json")
    state = PartialState()
    if state.is_main_process:
        _set_aside_other_run(cfg, log)
    state.wait_for_everyone()
    started = time.time()
    summary = train_loop(cfg)
    if state.is_main_process:
        _mark(cfg, "train", time.time() - started)
    return summary


def score(cfg: RunConfig, log: Callable[[str], None] = print) -> dict[str, dict]:
    from rerank_dist.score import score_split

    results = {}
    for split in cfg.score.splits:
        log(f"[score] {split}: reloading {RunPaths(Path(cfg.run_dir)).best} from disk")
        results[split] = score_split(cfg, split)
    return results


def report(cfg: RunConfig, log: Callable[[str], None] = print) -> str:
    from rerank_dist.report import write_report

    text = write_report(cfg)
    log(text)
    return text


def run_all(cfg: RunConfig, log: Callable[[str], None] = print) -> None:
    """Every stage in order. Under `accelerate launch`, data and retriever run on the main process
    first (the others then find them done); training and scoring use every process."""
    from accelerate import PartialState

    state = PartialState()
    started = time.time()
    if state.is_main_process:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.run_dir) / "config.yaml")
    with state.main_process_first():
        prepare(cfg, log)
        retrieve(cfg, log)
    train(cfg, log)
    score(cfg, log)
    if state.is_main_process:
        report(cfg, log)
        log(f"[run] finished in {(time.time() - started) / 60:.1f} min; outputs in {cfg.run_dir}")
