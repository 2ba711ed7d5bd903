"""Readers turn a run of some kind into Evidence: a rerank_dist run directory, a Hugging Face
Trainer / TRL output directory, or a predictions file (with training examples and metrics beside
it or named by flags)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from rerank_dist.doctor.evidence import Evidence
from rerank_dist.doctor.readers.common import DoctorInputError
from rerank_dist.doctor.readers.hf_trainer import (PREDICTION_NAMES, ForeignOptions, find_beside, is_hf_trainer_dir,
                                                   read_foreign_tables, read_hf_trainer)
from rerank_dist.doctor.readers.own_run import OwnRunOptions, is_own_run, read_own_run

if TYPE_CHECKING:
    from rerank_dist.config import RunConfig

KINDS = {"rerank_dist": "rerank_dist run", "hf_trainer": "Hugging Face Trainer / TRL output directory",
         "predictions": "predictions file"}

__all__ = ["DoctorInputError", "ForeignOptions", "OwnRunOptions", "read_evidence", "KINDS"]


def read_predictions_run(root: Path, options: ForeignOptions) -> Evidence:
    """A predictions file alone (training examples and metrics beside it or from flags)."""
    ev = Evidence(kind="predictions", root=root)
    ev.missing.update(lineage="a training directory (rerank_dist run or Trainer output) for the weights",
                      adapter="the trained adapter (a rerank_dist run or Trainer output directory)",
                      probe="a rerank_dist run (its config, data and weights)",
                      loss="a training log (a rerank_dist run or trainer_state.json)",
                      validation="a training log with evaluations")
    training = read_foreign_tables(ev, root, options)
    if training is None or not training.labels:
        ev.missing["verbalizer"] = "a tokenizer and the training prompts (an HF Trainer output directory)"
    return ev


def read_evidence(target: Path, own: OwnRunOptions, foreign: ForeignOptions,
                  say: Callable[[str], None] = lambda m: None, cfg: RunConfig | None = None) -> Evidence:
    """Evidence from whatever `target` is; DoctorInputError when it is none of the known kinds."""
    if not target.exists():
        raise DoctorInputError(f"{target}: no such file or directory")
    if target.is_file():
        opts = ForeignOptions(**{**foreign.__dict__, "predictions": target})
        return read_predictions_run(target.parent, opts)
    if is_own_run(target):
        return read_own_run(target, own, say, cfg)
    if is_hf_trainer_dir(target):
        return read_hf_trainer(target, foreign)
    if foreign.predictions is not None or find_beside(target, PREDICTION_NAMES) is not None:
        return read_predictions_run(target, foreign)
    raise DoctorInputError(f"{target}: no run found: expected a rerank_dist run (config.yaml, ranker/), a Trainer "
                           f"output directory (trainer_state.json, checkpoint-*/) or a predictions file")
