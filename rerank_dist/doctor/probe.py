"""Rebuild a rerank_dist run's prompts and re-run its saved weights, single process.

Uses the project's own functions, so the doctor tests what the pipeline does rather than a copy of
it: ``examples.build_examples`` / ``tokenize_examples`` for the prompts, ``modeling.load_for_scoring``
for the weights, ``label_scoring.label_logits`` for the scores, and the scorer's own batching
(``score._batches``): a prompt re-scored with the same batch-mates and padding must give the
recorded score to the last bit on the same machine.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rerank_dist.config import RunConfig, labels_for
from rerank_dist.doctor.evidence import ModelProbe
from rerank_dist.paths import RunPaths

# Scores re-made on the same machine are bit-identical; these allow other kernels or thread counts.
TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 1e-2}


@dataclass
class Rebuilt:
    """A run's tokenizer, data and the prompts of one split, rebuilt from its config."""

    tokenizer: Any
    dataset: Any
    labels: list[str]
    examples: list[Any]          # every scored example of the split, in the scorer's order
    token_lists: list[list[int]]


def rebuild_split(cfg: RunConfig, paths: RunPaths, split: str, limit: int | None = None) -> Rebuilt:
    """The examples the scorer built for split (the first score.max_users users when that was set).

    limit: only the first `limit` examples (enough for the label tokens in context); re-scoring needs
    them all, as the scorer's batches are cut from every prompt sorted by length."""
    from rerank_dist.data.prepare import load_dataset
    from rerank_dist.examples import build_examples, tokenize_examples
    from rerank_dist.modeling import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    dataset = load_dataset(paths.data)
    labels = labels_for(cfg)
    candidates = pd.read_parquet(paths.candidates(split))
    if cfg.score.max_users:
        candidates = candidates.head(cfg.score.max_users)
    if limit is not None:
        candidates = candidates.head(limit)
    examples, _ = build_examples(candidates, dataset, cfg.prompt, labels, tokenizer, split, dataset.num_items)
    return Rebuilt(tokenizer, dataset, labels, examples, tokenize_examples(examples, tokenizer))


def training_candidates(cfg: RunConfig, paths: RunPaths, rebuilt: Rebuilt, max_rows: int = 50_000) -> list[Any]:
    """The training examples' displayed candidates and targets, as the train stage trained on them.

    Read from the run's examples store (at most ``max_rows`` evenly spaced rows: LlamaRec's set has
    88,444 on ml-latest-small, a million on ML-1M); a run made before the store existed is rebuilt
    from candidates_train.parquet instead.
    """
    from types import SimpleNamespace

    from rerank_dist import example_store
    from rerank_dist.examples import build_examples

    directory = example_store.default_dir(cfg)
    if (directory / example_store.META).is_file():
        targets, shown = example_store.StoredExamples(directory).candidates(max_rows)
        return [SimpleNamespace(target=int(t), candidate_ids=row.tolist()) for t, row in zip(targets, shown)]
    frame = pd.read_parquet(paths.candidates("train")).head(max_rows)
    examples, _ = build_examples(frame, rebuilt.dataset, cfg.prompt, rebuilt.labels, rebuilt.tokenizer, "train",
                                 rebuilt.dataset.num_items)
    return examples


def _autocast(mixed_precision: str, device: Any) -> contextlib.AbstractContextManager:
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    # The scorer runs under accelerator.autocast() with the run's train.mixed_precision.
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def sample_batches(token_lists: list[list[int]], batch_size: int, users: int, seed: int,
                   token_budget: int = 0) -> list[list[int]]:
    """Whole scorer batches, drawn seeded, until they hold at least `users` prompts."""
    from rerank_dist.score import _batches  # the scorer's batching: same batch-mates, same padding

    batches = _batches(token_lists, batch_size, token_budget)
    order = np.random.default_rng(seed).permutation(len(batches))
    picked: list[list[int]] = []
    for i in order:
        if sum(map(len, picked)) >= users:
            break
        picked.append(batches[int(i)])
    return picked


def probe_model(cfg: RunConfig, paths: RunPaths, rebuilt: Rebuilt, recorded: pd.DataFrame, scored_ids: list[int],
                users: int = 16, seed: int = 0, device: str | None = None) -> ModelProbe:
    """Reload ranker/best/, score a seeded sample of scorer batches, compare with the recorded scores and
    with the base model's (adapter switched off)."""
    import torch

    from rerank_dist.hardware import resolve_dtype
    from rerank_dist.label_scoring import label_logits, left_pad
    from rerank_dist.modeling import load_for_scoring

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    picked = sample_batches(rebuilt.token_lists, cfg.score.batch_size, users, seed, cfg.score.token_budget)
    by_key = {(int(u), int(p)): (list(c), np.asarray(s, dtype=np.float64))
              for u, p, c, s in recorded[["user", "prefix_len", "candidates", "scores"]].itertuples(index=False)}
    model = load_for_scoring(cfg.model, paths.best, device=dev)
    # score.merged_weights: the scorer ran the merged model, so that is what re-scores; the base
    # comparison needs the adapter switched off, which only the unmerged model can do.
    scorer = load_for_scoring(cfg.model, paths.best, device=dev, merged=True) if cfg.score.merged_weights else model
    label_ids = torch.tensor(scored_ids, dtype=torch.long, device=dev)  # (K,)
    pad = rebuilt.tokenizer.pad_token_id
    diffs, same_top, base_diffs, base_changed, match = [], [], [], [], True
    with torch.no_grad(), _autocast(cfg.train.mixed_precision, dev):
        for batch in picked:
            input_ids, mask = left_pad([rebuilt.token_lists[i] for i in batch], pad)  # (B, L), (B, L)
            input_ids, mask = input_ids.to(dev), mask.to(dev)
            adapted = label_logits(scorer, input_ids, mask, label_ids).cpu().numpy().astype(np.float64)  # (B, K)
            with model.disable_adapter():
                base = label_logits(model, input_ids, mask, label_ids).cpu().numpy().astype(np.float64)  # (B, K)
            for row, i in enumerate(batch):
                base_diffs.append(float(np.abs(adapted[row] - base[row]).max()))
                base_changed.append(int(np.argmax(adapted[row])) != int(np.argmax(base[row])))
                ex = rebuilt.examples[i]
                cands, scores = by_key.get((ex.user, ex.prefix_len), (None, None))
                if cands is None or [int(c) for c in cands] != list(ex.candidate_ids):
                    match = False  # the rankings lack this prompt, or showed it other candidates
                    continue
                diffs.append(float(np.abs(adapted[row] - scores).max()))
                same_top.append(int(np.argmax(adapted[row])) == int(np.argmax(scores)))
    # model.dtype as load_for_scoring resolved it on dev (auto: bfloat16 or float32, see rerank_dist.hardware).
    dtype = resolve_dtype(cfg.model.dtype, dev)[0] if cfg.train.mixed_precision == "no" else cfg.train.mixed_precision
    tol = TOLERANCE.get(dtype, TOLERANCE["bfloat16"])
    return ModelProbe(prompts=sum(map(len, picked)), batches=len(picked),
                      max_abs_diff=max(diffs, default=float("inf")),
                      top1_agreement=float(np.mean(same_top)) if same_top else 0.0, tolerance=tol,
                      candidates_match=match and bool(diffs), base_max_abs_diff=max(base_diffs, default=0.0),
                      base_top1_changed=float(np.mean(base_changed)) if base_changed else 0.0,
                      dtype=dtype, device=str(dev))


def in_context(tokenizer: Any, prompts: list[str], labels: list[str]) -> tuple[list[int] | None, str | None, list[str]]:
    """(label ids after the prompts, or None and why not, standalone-tokenisation mismatches)."""
    from rerank_dist.verbalizer import VerbalizerError, naive_mismatches, verify_label_ids

    try:
        ids = verify_label_ids(tokenizer, prompts, labels)
    except VerbalizerError as err:
        return None, str(err), []
    return ids, None, naive_mismatches(tokenizer, labels, ids)


def model_available(paths: RunPaths) -> bool:
    return (Path(paths.best) / "adapter_model.safetensors").is_file()
