"""What the checks read: one shape for every kind of run.

A reader (``readers/``) fills in what its run holds and leaves the rest ``None``, recording in
``Evidence.missing`` what input would have provided it; a check that lacks its evidence reports
"skipped (needs ...)" with that text. The checks never open files themselves.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Curve:
    """A logged curve: the training loss, or a validation metric / loss."""

    steps: np.ndarray             # (n,) optimizer steps
    values: np.ndarray            # (n,)
    name: str                     # "train loss", "val NDCG@10", "eval_loss"
    source: str                   # file it was read from
    higher_is_better: bool = False


@dataclass
class WeightsLineage:
    """Which weights were chosen as best, which were saved, and which were scored."""

    best_step: int | None = None          # the step validation chose
    saved_step: int | None = None         # the step recorded with the saved best weights
    scored_step: int | None = None        # the step recorded with the scores
    last_step: int | None = None          # the last optimizer step
    scored_path: str | None = None        # the weights directory the scores name
    expected_scored_path: str | None = None
    hashes: dict[str, str] = field(default_factory=dict)           # label -> sha256 of weights file(s)
    must_match: list[tuple[str, str]] = field(default_factory=list)  # pairs of hash labels that must agree
    final_saved: bool | None = None       # HF: weights at the output directory's root (save_model ran)
    load_best_at_end: bool | None = None  # HF: TrainingArguments.load_best_model_at_end
    evaluated: bool | None = None         # HF: did any evaluation run (so a best could be chosen)?
    notes: list[str] = field(default_factory=list)


@dataclass
class AdapterWeights:
    """The LoRA B matrices of the adapter that was (or would be) scored."""

    path: str
    num_b: int                    # lora_B tensors
    num_zero_b: int               # of which are all zeros
    max_abs_b: float


@dataclass
class ModelProbe:
    """The saved weights reloaded and run on a sample of the scored prompts (rerank_dist runs)."""

    prompts: int                          # prompts re-scored
    batches: int                          # scorer batches they form (the scorer's own batching)
    max_abs_diff: float                   # reloaded vs recorded scores
    top1_agreement: float                 # share of prompts whose first choice is the recorded one
    tolerance: float                      # numerics tolerance for the run's dtype
    candidates_match: bool                # rebuilt displayed candidates == recorded candidates
    base_max_abs_diff: float              # adapter vs base model (adapter switched off) on the same prompts
    base_top1_changed: float              # share of prompts whose first choice the adapter changes
    dtype: str = ""
    device: str = ""


@dataclass
class Rankings:
    """Evaluation rankings, one row per user; positions are in the order the candidates were shown."""

    source: str
    num_candidates: np.ndarray            # (U,) N per user
    target_index: np.ndarray              # (U,) displayed position of the target, -1 if not a candidate
    reranker_rank: np.ndarray             # (U,) 0-based rank of the target under the reranker, -1 if absent
    retriever_rank: np.ndarray | None     # (U,) same under the retriever's order (None: unknown)
    top_position: np.ndarray | None       # (U,) displayed position of the reranker's first choice
    labels: list[str] | None = None       # the letter of each displayed position, if known
    candidate_items: list[list] | None = None  # displayed candidate ids (for popularity)
    targets: list | None = None
    # The order the run reports as its result when that is not the LLM's own (rerank_dist: metrics'
    # final_order, e.g. "fused" with the retriever's scores); reranker_rank stays the LLM's own order.
    final_order: str = "reranker"
    final_rank: np.ndarray | None = None  # (U,) target ranks under final_order (None: not recorded)


@dataclass
class Protocol:
    """The order candidates were shown in. "retriever" puts the retriever's best first, so a letter's
    position carries the retriever's rank: answers (training) and first choices (evaluation) then lean
    toward the first letters by design; "shuffled" leaves the titles as the only signal."""

    train_order: str | None = None        # shuffled | retriever (None: unknown)
    eval_order: str | None = None
    source: str = ""                      # where each was read, e.g. "train_summary.json, metrics_test.json"


@dataclass
class TrainingSide:
    """What the ranker was trained on."""

    source: str
    k_counts: Counter | None = None               # candidates per training example -> examples
    label_counts: dict[str, int] | None = None    # answer letter (or position) -> examples
    negatives_declared: str | None = None         # retriever | random | mixed | ... as configured
    negative_items: list | None = None            # every displayed non-target training candidate
    target_in_list_rate: float | None = None      # share of lists holding the target before any insertion
    candidate_source_note: str = ""               # e.g. "held-out retriever"


@dataclass
class ReportedMetric:
    name: str                     # as written in the file, e.g. "recall@20"
    family: str                   # recall | hit | precision | ndcg | mrr | map
    k: int
    source: str
    flagged: bool = False         # the run itself marks it as unable to reflect ranking


@dataclass
class VerbalizerFacts:
    labels: list[str]
    scored_ids: list[int] | None = None       # the ids the scorer read
    trained_ids: list[int] | None = None      # the ids the loss trained
    in_context_ids: list[int] | None = None   # resolved from real prompts with the tokenizer
    in_context_error: str | None = None       # why resolution failed (a label is 2 tokens, ...)
    naive_mismatches: list[str] = field(default_factory=list)  # standalone tokenisation != in context
    source: str = ""


@dataclass
class CapacityFacts:
    model: str
    parameters: int | None        # backbone parameters (from config.json, or the name)
    lora_r: int | None
    lora_targets: list[str] | None
    examples_seen: int | None     # training examples x epochs, when known
    lora_layers: list[int] | None = None  # the decoder layers with adapters; None = every layer


@dataclass
class Evidence:
    kind: str                                 # rerank_dist | hf_trainer | predictions
    root: Path
    loss: Curve | None = None
    validation: Curve | None = None
    validation_baseline: float | None = None  # e.g. the retriever order's val NDCG@10
    lineage: WeightsLineage | None = None
    adapter: AdapterWeights | None = None
    probe: ModelProbe | None = None
    split_k: dict[str, Counter] = field(default_factory=dict)  # split -> Counter(N per example)
    metrics: list[ReportedMetric] | None = None
    training: TrainingSide | None = None
    rankings: Rankings | None = None
    protocol: Protocol | None = None
    popularity: dict | None = None            # item -> interactions (or exposures), the reference
    popularity_source: str = ""
    verbalizer: VerbalizerFacts | None = None
    capacity: CapacityFacts | None = None
    missing: dict[str, str] = field(default_factory=dict)  # evidence name -> what would provide it
    sources: dict[str, str] = field(default_factory=dict)  # evidence name -> file read
    fingerprint: str = ""

    def needs(self, name: str, default: str) -> str:
        return self.missing.get(name, default)
