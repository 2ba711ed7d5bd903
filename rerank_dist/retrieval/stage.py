"""The retrieve stage: train (or reuse) LRURec, write candidates per split and test metrics.

Outputs in out_dir: model.safetensors + config.json, train_summary.json,
candidates_{train,val,test}.parquet, metrics_test.json, and with train_candidates=held_out a
second checkpoint in held_out/ that made the training candidates. With train_candidates=none no
training candidates are made (candidates_train.parquet is absent; the ranker's training examples
then take random negatives from the sequences) and metrics_test.json says so.

The model sits on ``device`` (a GPU when there is one, see ``default_device``); what is written is
computed there and brought back to the CPU.

Several processes share the work through ``workers`` (pipeline.retrieve supplies them; the default
is this process alone). The main process trains or reuses the retriever(s) and saves them, the
others wait, then load the saved checkpoints. Every process then computes its share of the fixed
batches of each split (``scoring.batch_starts``) and of the test ranks; the main process gathers
the shares in order and writes every file. Batches are never re-cut, so the files are the same,
bit for bit, at any number of processes. This module itself holds no distributed code.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from rerank_dist.config import RetrieverConfig
from rerank_dist.io import read_json, write_json, write_parquet
from rerank_dist.metrics import metrics_from_ranks
from rerank_dist.retrieval.candidates import (TEST_KS, concat_candidates, generate_candidates, ranks_on_test_split,
                                              target_in_top_k)
from rerank_dist.retrieval.checkpoint import checkpoint_matches, load_retriever, save_retriever
from rerank_dist.retrieval.lrurec import LRURec
from rerank_dist.retrieval.scoring import batch_starts
from rerank_dist.retrieval.sequences import SPLITS, split_examples
from rerank_dist.retrieval.train import train_retriever

SUMMARY_FILE = "train_summary.json"
METRICS_FILE = "metrics_test.json"
HELD_OUT_DIR = "held_out"
# Histories scored per forward pass; also the unit of work shared between processes.
BATCH_SIZE = 32


class Workers(Protocol):
    """The processes that share the stage (rerank_dist.distributed.ProcessShares, or OneProcess)."""

    is_main_process: bool
    num_processes: int

    def wait_for_everyone(self) -> None:
        """Block until every process got here (the others wait here while the main one trains)."""

    def gather_shares(self, work: Sequence[Any], compute: Callable[[list], Any]) -> list:
        """compute(this process's contiguous share of work) on every process; on the main process the
        results in process order (so their concatenation follows work's order), elsewhere []."""


class OneProcess:
    is_main_process = True
    num_processes = 1

    def wait_for_everyone(self) -> None:
        pass

    def gather_shares(self, work: Sequence[Any], compute: Callable[[list], Any]) -> list:
        return [compute(list(work))]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def candidate_path(out_dir: Path, split: str) -> Path:
    return Path(out_dir) / f"candidates_{split}.parquet"


def run_retriever_stage(cfg: RetrieverConfig, dataset: Any, out_dir: Path, log: Callable[[str], None] = print,
                        device: str | torch.device | None = None, workers: Workers | None = None) -> dict:
    """dataset: anything with ``sequences`` (user -> item ids in time order) and ``num_items``.

    Returns the metrics written to metrics_test.json on the main process, {} on the others.
    """
    out_dir = Path(out_dir)
    workers = workers or OneProcess()
    device = torch.device(device) if device is not None else default_device()
    model, train_split_model, training = _retrievers(cfg, dataset, out_dir, log, device, workers)
    started = time.monotonic()
    test_ranks = partial(ranks_on_test_split, model, dataset.sequences, cfg.max_len, BATCH_SIZE)
    ranks = _gather(workers, len(split_examples(dataset.sequences, "test")), test_ranks, np.concatenate)
    frames = {}
    for split in SPLITS:
        if split == "train" and cfg.train_candidates == "none":
            continue
        source = train_split_model if split == "train" else model
        n = len(split_examples(dataset.sequences, split, cfg.train_prefixes_per_user))
        candidates = partial(generate_candidates, source, dataset.sequences, split, cfg.top_k, cfg.max_len,
                             cfg.train_prefixes_per_user, BATCH_SIZE)
        frames[split] = _gather(workers, n, candidates, concat_candidates)
    if not workers.is_main_process:
        return {}
    log(f"retriever: candidates for {sum(map(len, frames.values()))} examples and test ranks for {len(ranks)} users "
        f"in {(time.monotonic() - started) / 60:.1f} min on {workers.num_processes} process(es), {device.type}")
    metrics: dict[str, Any] = {
        "num_users": len(dataset.sequences),
        "num_items": dataset.num_items,
        "top_k": cfg.top_k,
        "full_catalogue": metrics_from_ranks(ranks, ks=TEST_KS),
        "target_in_top_k": {},
        "examples": {},
        **training,
        "train_candidates": cfg.train_candidates,
        "processes": workers.num_processes,
        "device": device.type,
    }
    if cfg.train_candidates == "none":
        # A file from an earlier setting must not pass for this run's training candidates.
        candidate_path(out_dir, "train").unlink(missing_ok=True)
        metrics["examples"]["train"] = 0
    for split, frame in frames.items():
        write_parquet(candidate_path(out_dir, split), frame)
        metrics["target_in_top_k"][split] = target_in_top_k(frame)
        metrics["examples"][split] = len(frame)
    write_json(out_dir / METRICS_FILE, metrics)
    full = metrics["full_catalogue"]
    log(f"retriever test (all {metrics['num_users']} users, full catalogue): recall@10 {full['recall@10']:.4f} "
        f"ndcg@10 {full['ndcg@10']:.4f} mrr@10 {full['mrr@10']:.4f}; target in top-{cfg.top_k}: "
        + ", ".join(f"{s} {r:.3f}" for s, r in metrics["target_in_top_k"].items())
        + ("; no training candidates (train_candidates=none)" if cfg.train_candidates == "none" else ""))
    return metrics


def _gather(workers: Workers, num_examples: int, compute: Callable[[list[int]], Any],
            join: Callable[[list], Any]) -> Any:
    """compute(some batch starts) on every worker; on the main process join(the shares, in order), else None."""
    shares = workers.gather_shares(batch_starts(num_examples, BATCH_SIZE), compute)
    return join(shares) if workers.is_main_process else None


def _retrievers(cfg: RetrieverConfig, dataset: Any, out_dir: Path, log: Callable[[str], None],
                device: torch.device, workers: Workers) -> tuple[LRURec, LRURec, dict]:
    """(the retriever, the one that makes the training candidates, the training facts for the metrics).

    Trained or reused on the main process; the other processes load what it saved.
    """
    held_out = cfg.train_candidates == "held_out"
    training: dict[str, Any] = {}
    if workers.is_main_process:
        model, training["training"] = _trained_model(cfg, dataset, out_dir, log, device=device)
        train_split_model = model
        if held_out:
            # The main retriever learned every training-prefix target as a label; this one never saw them.
            cut = 2 + cfg.train_prefixes_per_user
            log(f"retriever: a second retriever, trained on seq[:-{cut}], makes the training candidates")
            train_split_model, training["training_held_out"] = _trained_model(cfg, dataset, out_dir / HELD_OUT_DIR,
                                                                              log, cut, device)
    workers.wait_for_everyone()
    if not workers.is_main_process:
        model = load_retriever(out_dir).to(device)
        train_split_model = load_retriever(out_dir / HELD_OUT_DIR).to(device) if held_out else model
    return model, train_split_model, training


def _trained_model(cfg: RetrieverConfig, dataset: Any, out_dir: Path, log: Callable[[str], None],
                   held_out: int = 2, device: torch.device = torch.device("cpu")) -> tuple[LRURec, dict]:
    """Reuse a checkpoint trained with the same settings; otherwise train and save one."""
    if checkpoint_matches(out_dir, cfg, dataset.num_items, held_out):
        log(f"retriever: reusing the checkpoint in {out_dir}")
        summary_path = out_dir / SUMMARY_FILE
        summary = read_json(summary_path) if summary_path.is_file() else {}
        return load_retriever(out_dir).to(device), _brief(summary)
    model, summary = train_retriever(cfg, dataset.sequences, dataset.num_items, log=log, held_out=held_out,
                                     device=device)
    save_retriever(model, cfg, out_dir, held_out)
    write_json(out_dir / SUMMARY_FILE, dataclasses.asdict(summary))
    return model, _brief(dataclasses.asdict(summary))


def _brief(summary: dict) -> dict:
    """The training facts worth repeating next to the test metrics (the full history stays in its file)."""
    return {k: summary[k] for k in ("best_epoch", "best_val", "epochs", "steps", "minutes", "stopped_by")
            if k in summary}
