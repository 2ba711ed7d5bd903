"""Stages and their order: prepare -> retrieve -> train -> score -> report.

Each stage reads the previous stage's files in the run directory and writes its own. A stage whose
outputs exist for the same resolved config (hash of the sections it depends on) is skipped, so a
rerun after a crash continues where it stopped.
"""

from __future__ import annotations

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


def _done(stage_dir: Path, cfg: RunConfig, stage: str) -> bool:
    marker = stage_dir / "stage.json"
    return marker.is_file() and read_json(marker).get("config_hash") == cfg.section_hash(*STAGE_INPUTS[stage])


def _mark(stage_dir: Path, cfg: RunConfig, stage: str, seconds: float) -> None:
    write_json(stage_dir / "stage.json", {"stage": stage, "config_hash": cfg.section_hash(*STAGE_INPUTS[stage]),
                                          "seconds": round(seconds, 1)})


def prepare(cfg: RunConfig, log: Callable[[str], None] = print) -> dict:
    from rerank_dist.data.prepare import prepare_data

    paths = RunPaths(Path(cfg.run_dir))
    if _done(paths.data, cfg, "prepare"):
        log(f"[prepare] up to date: {paths.data}")
        return read_json(paths.data / "meta.json")
    started = time.time()
    log(f"[prepare] {cfg.data.dataset} from {cfg.data.source} -> {paths.data}")
    meta = prepare_data(cfg.data, paths.data, cache_dir(cfg.model.cache_dir), log=log)
    _mark(paths.data, cfg, "prepare", time.time() - started)
    return meta


def retrieve(cfg: RunConfig, log: Callable[[str], None] = print) -> dict:
    from rerank_dist.data.prepare import load_dataset
    from rerank_dist.retrieval.stage import run_retriever_stage

    paths = RunPaths(Path(cfg.run_dir))
    if _done(paths.retriever, cfg, "retrieve"):
        log(f"[retrieve] up to date: {paths.retriever}")
        return read_json(paths.retriever / "metrics_test.json")
    started = time.time()
    log(f"[retrieve] training LRURec (budget {cfg.retriever.max_minutes} min) -> {paths.retriever}")
    metrics = run_retriever_stage(cfg.retriever, load_dataset(paths.data), paths.retriever, log=log)
    _mark(paths.retriever, cfg, "retrieve", time.time() - started)
    return metrics


def train(cfg: RunConfig, log: Callable[[str], None] = print) -> dict:
    from rerank_dist.train import train as train_loop

    paths = RunPaths(Path(cfg.run_dir))
    if _done(paths.ranker, cfg, "train") and (paths.best / "adapter_model.safetensors").is_file():
        log(f"[train] up to date: {paths.best}")
        return read_json(paths.ranker / "train_summary.json")
    started = time.time()
    summary = train_loop(cfg)
    from accelerate import PartialState

    if PartialState().is_main_process:
        _mark(paths.ranker, cfg, "train", time.time() - started)
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
