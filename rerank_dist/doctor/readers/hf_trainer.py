"""Evidence from a Hugging Face ``Trainer`` / TRL ``SFTTrainer`` output directory.

Read: ``trainer_state.json`` (the root one from ``save_state()``, else the newest checkpoint's):
``log_history`` (loss, eval_loss), ``best_model_checkpoint``, ``global_step``; ``training_args.bin``
(read without executing it, ``safe_pickle``): ``load_best_model_at_end``; ``checkpoint-*/`` and the
root's weights (did ``save_model()`` run? which checkpoint do they equal?); ``adapter_config.json``
and ``config.json`` (capacity); a tokenizer (labels in context). Training examples, predictions and
metrics are not part of a Trainer directory: they are found by name beside it or given by flags.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rerank_dist.doctor.evidence import CapacityFacts, Curve, Evidence, VerbalizerFacts, WeightsLineage
from rerank_dist.doctor.readers import tables
from rerank_dist.doctor.readers.common import (adapter_weights, metrics_in, parameter_count, parameters_from_name,
                                               sha256_file, weights_file, weights_hash)
from rerank_dist.doctor.readers.safe_pickle import read_training_args

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Files looked for beside the output directory's own when no flag names them.
PREDICTION_NAMES = ("predictions", "rankings", "test_predictions", "rankings_test", "preds")
TRAIN_NAMES = ("train", "train_data", "train_dataset", "training_data")
METRIC_NAMES = ("metrics", "test_results", "eval_results", "all_results", "predict_results", "metrics_test")
TABLE_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")


@dataclass
class ForeignOptions:
    predictions: Path | None = None
    train_file: Path | None = None
    metrics: Path | None = None
    columns: dict[str, str] = field(default_factory=dict)
    retriever_order: str = "auto"
    label_ids: list[int] | None = None
    train_negatives: str | None = None


def is_hf_trainer_dir(root: Path) -> bool:
    return root.is_dir() and ((root / "trainer_state.json").is_file() or (root / "training_args.bin").is_file()
                              or any(CHECKPOINT.match(p.name) for p in root.iterdir() if p.is_dir()))


def checkpoints(root: Path) -> dict[int, Path]:
    return {int(m.group(1)): p for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))}


def find_beside(root: Path, names: tuple[str, ...], suffixes: tuple[str, ...] = TABLE_SUFFIXES) -> Path | None:
    for name in names:
        for suffix in suffixes:
            if (root / f"{name}{suffix}").is_file():
                return root / f"{name}{suffix}"
    return None


def read_hf_trainer(root: Path, options: ForeignOptions) -> Evidence:
    ev = Evidence(kind="hf_trainer", root=root)
    ckpts = checkpoints(root)
    state_path = root / "trainer_state.json"
    if not state_path.is_file() and ckpts:
        state_path = ckpts[max(ckpts)] / "trainer_state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    if state is None:
        ev.missing["loss"] = "trainer_state.json (trainer.save_state(), or any checkpoint-*/)"
        ev.missing["validation"] = ev.missing["loss"]
    else:
        ev.sources["trainer_state"] = str(state_path)
        _curves(ev, state, str(state_path))
    args, args_note = _training_args(root, ckpts)
    _lineage(ev, root, ckpts, state, args, args_note)
    _adapter(ev, root, ckpts)
    _capacity(ev, root, ckpts, state, args)
    training = read_foreign_tables(ev, root, options)
    _verbalizer(ev, root, ckpts, options, training)
    return ev


def _curves(ev: Evidence, state: dict, source: str) -> None:
    history = state.get("log_history", [])
    train = [h for h in history if "loss" in h and "step" in h]
    if train:
        ev.loss = Curve(np.array([h["step"] for h in train]),
                        np.array([h["loss"] if h["loss"] is not None else math.nan for h in train], dtype=np.float64),
                        "train loss", source)
    else:
        ev.missing["loss"] = f"{source}: log_history has no training loss (set logging_steps)"
    evals = [h for h in history if "eval_loss" in h and "step" in h]
    if evals:
        ev.validation = Curve(np.array([h["step"] for h in evals]), np.array([h["eval_loss"] for h in evals]),
                              "eval_loss", source, higher_is_better=False)
    else:
        ev.missing["validation"] = f"{source}: no evaluation in log_history (eval_strategy was 'no')"


def _training_args(root: Path, ckpts: dict[int, Path]) -> tuple[dict | None, str]:
    places = [root] + [ckpts[s] for s in sorted(ckpts, reverse=True)]
    for place in places:
        if (place / "training_args.json").is_file():
            return json.loads((place / "training_args.json").read_text()), str(place / "training_args.json")
        if (place / "training_args.bin").is_file():
            try:
                return read_training_args(place / "training_args.bin"), str(place / "training_args.bin")
            except Exception as err:  # an unreadable pickle must not stop the other checks
                return None, f"{place / 'training_args.bin'}: unreadable ({err})"
    return None, "no training_args.bin"


def _step_of(checkpoint: str | None) -> int | None:
    m = CHECKPOINT.match(Path(checkpoint).name) if checkpoint else None
    return int(m.group(1)) if m else None


def _lineage(ev: Evidence, root: Path, ckpts: dict[int, Path], state: dict | None, args: dict | None,
             args_note: str) -> None:
    if state is None and args is None and not ckpts and weights_file(root) is None:
        ev.missing["lineage"] = "trainer_state.json, training_args.bin or checkpoint-*/"
        return
    lin = WeightsLineage()
    lin.final_saved = weights_file(root) is not None
    lin.load_best_at_end = args.get("load_best_model_at_end") if args else None
    lin.notes.append(f"training arguments: {args_note}")
    if state is not None:
        lin.last_step = state.get("global_step")
        lin.best_step = state.get("best_global_step") or _step_of(state.get("best_model_checkpoint"))
        lin.evaluated = any("eval_loss" in h or any(k.startswith("eval_") for k in h)
                            for h in state.get("log_history", []))
    if lin.final_saved:
        lin.hashes["output dir"] = weights_hash(root) or ""
    best = ckpts.get(lin.best_step) if lin.best_step is not None else None
    last = ckpts.get(lin.last_step) if lin.last_step is not None else None
    if lin.final_saved and lin.load_best_at_end and best is not None:
        lin.hashes[best.name] = weights_hash(best) or ""
        lin.must_match.append(("output dir", best.name))
    elif lin.final_saved and lin.load_best_at_end is False and last is not None:
        lin.hashes[last.name] = weights_hash(last) or ""
        lin.must_match.append(("output dir", last.name))
    ev.lineage = lin


def _adapter(ev: Evidence, root: Path, ckpts: dict[int, Path]) -> None:
    """The adapter a scorer would load: the output directory's own, else the newest checkpoint's."""
    places = [root] + [ckpts[s] for s in sorted(ckpts, reverse=True)]
    for place in places:
        found = adapter_weights(place / "adapter_model.safetensors")
        if found is not None:
            ev.adapter = found
            return
    ev.missing["adapter"] = "a LoRA adapter (adapter_model.safetensors) in the output directory or a checkpoint"


def _capacity(ev: Evidence, root: Path, ckpts: dict[int, Path], state: dict | None, args: dict | None) -> None:
    places = [root] + [ckpts[s] for s in sorted(ckpts, reverse=True)]
    lora: dict = {}
    arch: dict = {}
    for place in places:
        if not lora and (place / "adapter_config.json").is_file():
            lora = json.loads((place / "adapter_config.json").read_text())
        if not arch and (place / "config.json").is_file():
            arch = json.loads((place / "config.json").read_text())
    name = lora.get("base_model_name_or_path") or arch.get("_name_or_path") or "?"
    params = parameter_count(arch) if arch else None
    seen = None
    if state is not None and args:
        per_step = (args.get("per_device_train_batch_size") or 0) * (args.get("gradient_accumulation_steps") or 1)
        seen = int(state.get("global_step", 0)) * per_step or None
    ev.capacity = CapacityFacts(model=name, parameters=params or parameters_from_name(name), lora_r=lora.get("r"),
                                lora_targets=lora.get("target_modules"), examples_seen=seen)


def read_foreign_tables(ev: Evidence, root: Path, options: ForeignOptions) -> tables.TrainingFile | None:
    """Predictions, training examples and metrics, from flags or found by name in root; returns the
    training file read (its prompts serve the verbalizer check)."""
    pred = options.predictions or find_beside(root, PREDICTION_NAMES)
    if pred is not None:
        ev.rankings = tables.read_predictions(pred, options.columns, options.retriever_order)
        ev.sources["rankings"] = str(pred)
        ev.split_k["test"] = Counter(ev.rankings.num_candidates.tolist())
    else:
        for name in ("rankings", "scores"):
            ev.missing[name] = ("a predictions file (--predictions FILE: user, candidates, scores or ranked list, "
                                "target)")
    train = options.train_file or find_beside(root, TRAIN_NAMES)
    tf = None
    if train is not None:
        tf = tables.read_training_file(train, options.columns)
        if options.train_negatives:
            tf.side.negatives_declared = options.train_negatives
        ev.training = tf.side
        ev.sources["training"] = str(train)
        if tf.side.k_counts:
            ev.split_k["train"] = tf.side.k_counts
    else:
        need = "a training-examples file (--train-file FILE: prompt/completion or candidates/target per example)"
        for name in ("label_counts", "negatives"):
            ev.missing[name] = need
        ev.missing["split_k"] = need + " and predictions"
    metrics = options.metrics or find_beside(root, METRIC_NAMES, (".json",))
    if metrics is not None:
        ev.metrics = metrics_in(json.loads(metrics.read_text()), str(metrics))
        ev.sources["metrics"] = str(metrics)
        ev.fingerprint = sha256_file(metrics)
    else:
        ev.missing["metrics"] = "the reported metrics (--metrics FILE, or all_results.json / metrics.json)"
    if ev.rankings is not None and ev.training is not None and ev.training.negative_items:
        # Foreign runs rarely carry interaction counts: how often the retriever proposed an item at
        # test stands in for its popularity (random negatives are mostly items it never proposes).
        exposure: Counter = Counter()
        for cands in ev.rankings.candidate_items or []:
            exposure.update(cands)
        ev.popularity, ev.popularity_source = dict(exposure), "appearances among test candidates"
    return tf


def _tokenizer_dir(root: Path, ckpts: dict[int, Path]) -> Path | None:
    for place in [root] + [ckpts[s] for s in sorted(ckpts, reverse=True)]:
        if (place / "tokenizer.json").is_file() or (place / "tokenizer_config.json").is_file():
            return place
    return None


def _verbalizer(ev: Evidence, root: Path, ckpts: dict[int, Path], options: ForeignOptions,
                training: tables.TrainingFile | None) -> None:
    prompts = training.prompts if training is not None else []
    labels = training.labels if training is not None else []
    scored = options.label_ids
    for place in [root] + [ckpts[s] for s in sorted(ckpts, reverse=True)]:
        if scored is None and (place / "verbalizer.json").is_file():
            scored = json.loads((place / "verbalizer.json").read_text()).get("label_ids")
    tok_dir = _tokenizer_dir(root, ckpts)
    if not labels or (tok_dir is None and scored is None):
        ev.missing["verbalizer"] = "a tokenizer in the output directory and training prompts with lettered candidates"
        return
    facts = VerbalizerFacts(labels=labels, scored_ids=scored, source=str(tok_dir or root))
    if tok_dir is not None and prompts:
        from transformers import AutoTokenizer

        from rerank_dist.doctor.probe import in_context

        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        resolved = in_context(tokenizer, prompts[:4], labels)
        facts.in_context_ids, facts.in_context_error, facts.naive_mismatches = resolved
    ev.verbalizer = facts
