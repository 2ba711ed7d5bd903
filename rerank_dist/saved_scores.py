"""Scores saved by stopped runs of the scorer, so that a rerun scores only what is missing.

``scores/<split>/part-*.npz`` holds each process's prompts since its previous save, valid for the
inputs that ``progress.json`` names (``progress_key``): scores made from another adapter, other
prompts, other batching or other numerics are discarded, never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from rerank_dist.config import RunConfig
from rerank_dist.hardware import resolve_dtype
from rerank_dist.io import atomic_path, read_json, write_json


class SavedScores:
    """The saved scores of one split's prompts: (N, K) rows and which of them are filled."""

    def __init__(self, directory: Path, num_prompts: int, num_labels: int) -> None:
        self.directory = directory
        self.scores = np.zeros((num_prompts, num_labels), dtype=np.float32)  # (N, K)
        self.mask = np.zeros(num_prompts, dtype=bool)  # which prompts have saved scores

    @property
    def count(self) -> int:
        return int(self.mask.sum())

    def start(self, key: str, say) -> None:
        """Main process: keep saved scores made from these inputs (key), discard any others."""
        progress = self.directory / "progress.json"
        recorded = read_json(progress).get("key") if progress.is_file() else None
        if recorded != key and self.directory.exists():
            if recorded is not None:
                say(f"{self.directory}: saved scores from another adapter or other prompts; discarded")
            shutil.rmtree(self.directory)
        if recorded != key:
            write_json(progress, {"key": key, "prompts": len(self.mask)})

    def load(self) -> None:
        """Every process: read all saved parts. A prompt saved twice means two runs overlapped: refused."""
        for part in sorted(self.directory.glob("part-*.npz")):
            with np.load(part) as data:
                index, rows = data["index"], data["scores"]
            if self.mask[index].any():
                raise RuntimeError(f"{part}: holds prompts already saved in another part; delete "
                                   f"{self.directory} and score again")
            self.scores[index], self.mask[index] = rows, True

    def write(self, rank: int, rows: list[tuple[int, list[float]]]) -> None:
        """One process's new scores, as one part (atomically: a killed writer leaves no part)."""
        if not rows:
            return
        with atomic_path(self.directory / f"part-{time.time_ns()}-rank{rank:03d}.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, index=np.array([i for i, _ in rows], dtype=np.int64),
                     scores=np.array([row for _, row in rows], dtype=np.float32))


def progress_key(cfg: RunConfig, adapter_dir: Path, split: str, token_lists: list[list[int]],
                 label_ids: torch.Tensor, device: torch.device | str) -> str:
    """What saved scores were made from: the adapter's bytes, every prompt's tokens, the label ids, the
    batching and the numerics. Scores saved under another key are never mixed in."""
    digest = hashlib.sha256((adapter_dir / "adapter_model.safetensors").read_bytes())
    model = {k: v for k, v in cfg.model.__dict__.items() if k not in ("cache_dir", "gguf_fallback")}
    # The resolved dtype, not "auto": a rerun on a machine that resolves auto otherwise (a CPU
    # without native bf16) must not mix its scores with the saved ones.
    model["dtype"] = resolve_dtype(cfg.model.dtype, device)[0]
    digest.update(json.dumps({"split": split, "labels": label_ids.tolist(), "batch_size": cfg.score.batch_size,
                              "token_budget": cfg.score.token_budget, "merged_weights": cfg.score.merged_weights,
                              "model": model, "mixed_precision": cfg.train.mixed_precision},
                             sort_keys=True, default=str).encode())
    for tokens in token_lists:
        digest.update(np.asarray(tokens, dtype=np.int64).tobytes() + b"|")
    return digest.hexdigest()[:16]
