"""The retrieve stage: train (or reuse) LRURec, write candidates per split and test metrics.

Outputs in out_dir: model.safetensors + config.json, train_summary.json,
candidates_{train,val,test}.parquet, metrics_test.json, and with train_candidates=held_out a
second checkpoint in held_out/ that made the training candidates. Runs in one process.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from rerank_dist.config import RetrieverConfig
from rerank_dist.io import read_json, write_json, write_parquet
from rerank_dist.retrieval.candidates import generate_candidates, retriever_test_metrics, target_in_top_k
from rerank_dist.retrieval.checkpoint import checkpoint_matches, load_retriever, save_retriever
from rerank_dist.retrieval.lrurec import LRURec
from rerank_dist.retrieval.sequences import SPLITS
from rerank_dist.retrieval.train import train_retriever

SUMMARY_FILE = "train_summary.json"
METRICS_FILE = "metrics_test.json"
HELD_OUT_DIR = "held_out"


def run_retriever_stage(cfg: RetrieverConfig, dataset: Any, out_dir: Path,
                        log: Callable[[str], None] = print) -> dict:
    """dataset: anything with ``sequences`` (user -> item ids in time order) and ``num_items``."""
    out_dir = Path(out_dir)
    model, training = _trained_model(cfg, dataset, out_dir, log)
    train_split_model = model
    metrics: dict[str, Any] = {
        "num_users": len(dataset.sequences),
        "num_items": dataset.num_items,
        "top_k": cfg.top_k,
        "full_catalogue": retriever_test_metrics(model, dataset.sequences, cfg.max_len),
        "target_in_top_k": {},
        "examples": {},
        "training": training,
        "train_candidates": cfg.train_candidates,
    }
    if cfg.train_candidates == "held_out":
        # The main retriever learned every training-prefix target as a label; this one never saw them.
        held_out = 2 + cfg.train_prefixes_per_user
        log(f"retriever: a second retriever, trained on seq[:-{held_out}], makes the training candidates")
        train_split_model, metrics["training_held_out"] = _trained_model(cfg, dataset, out_dir / HELD_OUT_DIR,
                                                                         log, held_out)
    for split in SPLITS:
        if split == "train" and cfg.train_candidates == "none":
            continue  # random negatives (LlamaRec) use no retriever candidates for the training prefixes
        source = train_split_model if split == "train" else model
        frame = generate_candidates(source, dataset.sequences, split, cfg.top_k, cfg.max_len,
                                    cfg.train_prefixes_per_user)
        write_parquet(out_dir / f"candidates_{split}.parquet", frame)
        metrics["target_in_top_k"][split] = target_in_top_k(frame)
        metrics["examples"][split] = len(frame)
    write_json(out_dir / METRICS_FILE, metrics)
    full = metrics["full_catalogue"]
    log(f"retriever test (all {metrics['num_users']} users, full catalogue): recall@10 {full['recall@10']:.4f} "
        f"ndcg@10 {full['ndcg@10']:.4f} mrr@10 {full['mrr@10']:.4f}; target in top-{cfg.top_k}: "
        + ", ".join(f"{s} {r:.3f}" for s, r in metrics["target_in_top_k"].items()))
    return metrics


def _trained_model(cfg: RetrieverConfig, dataset: Any, out_dir: Path, log: Callable[[str], None],
                   held_out: int = 2) -> tuple[LRURec, dict]:
    """Reuse a checkpoint trained with the same settings; otherwise train and save one."""
    if checkpoint_matches(out_dir, cfg, dataset.num_items, held_out):
        log(f"retriever: reusing the checkpoint in {out_dir}")
        summary_path = out_dir / SUMMARY_FILE
        summary = read_json(summary_path) if summary_path.is_file() else {}
        return load_retriever(out_dir), _brief(summary)
    model, summary = train_retriever(cfg, dataset.sequences, dataset.num_items, log=log, held_out=held_out)
    save_retriever(model, cfg, out_dir, held_out)
    write_json(out_dir / SUMMARY_FILE, dataclasses.asdict(summary))
    return model, _brief(dataclasses.asdict(summary))


def _brief(summary: dict) -> dict:
    """The training facts worth repeating next to the test metrics (the full history stays in its file)."""
    return {k: summary[k] for k in ("best_epoch", "best_val", "epochs", "steps", "minutes", "stopped_by")
            if k in summary}
