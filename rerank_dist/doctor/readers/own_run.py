"""Evidence from a rerank_dist run directory (the layout in docs/checkpoints.md).

Facts come from what each stage recorded (train_log.jsonl, train_summary.json, best/verbalizer.json,
metrics_<split>.json, rankings_<split>.parquet, candidates, data/); the prompts and the saved
weights are then rebuilt and re-run through the project's own functions (``doctor.probe``) to
check that the records are true.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from rerank_dist.config import RunConfig, labels_for
from rerank_dist.doctor.evidence import (CapacityFacts, Curve, Evidence, Protocol, Rankings, TrainingSide,
                                         VerbalizerFacts, WeightsLineage)
from rerank_dist.doctor.readers.common import adapter_weights, metrics_in, parameter_count, parameters_from_name, \
    sha256_file
from rerank_dist.io import JsonlError, read_json, read_jsonl
from rerank_dist.metrics import target_ranks
from rerank_dist.paths import RunPaths


@dataclass
class OwnRunOptions:
    split: str = "test"
    model: bool = True            # reload the weights and re-score a sample (needs the backbone)
    sample_users: int = 16
    seed: int = 0
    device: str | None = None


def is_own_run(root: Path) -> bool:
    return (root / "config.yaml").is_file() and ((root / "ranker").is_dir() or any(root.glob("metrics_*.json")))


def _config(root: Path) -> RunConfig:
    from rerank_dist.settings import resolve_config

    # The run's own config.yaml (run_dir pointed at where it is now), as a stage on this run would see it.
    cfg, _ = resolve_config(None, [f"run_dir={root}"], world_size=1)
    return cfg


def read_own_run(root: Path, options: OwnRunOptions, say: Callable[[str], None] = lambda m: None,
                 cfg: RunConfig | None = None) -> Evidence:
    paths = RunPaths(root)
    ev = Evidence(kind="rerank_dist", root=root)
    try:
        cfg = cfg or _config(root)
    except Exception as err:  # a config that no longer validates still leaves the files to read
        cfg = None
        ev.missing["config"] = f"a readable config.yaml ({str(err).splitlines()[0]})"
    _loss(ev, paths, say)
    summary_path = paths.ranker / "train_summary.json"
    summary = read_json(summary_path) if summary_path.is_file() else None
    saved_verbalizer = read_json(paths.best / "verbalizer.json") if (paths.best / "verbalizer.json").is_file() else None
    metrics_path = paths.metrics(options.split)
    metrics = read_json(metrics_path) if metrics_path.is_file() else None
    if metrics_path.is_file():
        ev.fingerprint = sha256_file(metrics_path)
        ev.sources["metrics"] = str(metrics_path)
    _lineage(ev, paths, summary, saved_verbalizer, metrics)
    ev.adapter = adapter_weights(paths.best / "adapter_model.safetensors")
    if ev.adapter is None:
        ev.missing["adapter"] = f"{paths.best}/adapter_model.safetensors (run the train stage)"
    labels = list(saved_verbalizer["labels"]) if saved_verbalizer else (labels_for(cfg) if cfg else None)
    if metrics is not None:
        flagged = set(metrics.get("reranker", {}).get("ranking_blind", []))
        orders = {k: metrics[k] for k in ("reranker", "permuted", "fused", "retriever_order", "random_order")
                  if k in metrics}
        ev.metrics = metrics_in(orders, str(metrics_path), flagged)
    else:
        ev.missing["metrics"] = f"{metrics_path.name} (run the score stage)"
    recorded = _rankings(ev, paths, options.split, labels, metrics)
    _protocol(ev, root, summary, metrics, cfg, metrics_path.name)
    _split_counts(ev, paths, labels)
    _training(ev, summary, cfg)
    _popularity(ev, paths)
    _capacity(ev, paths, summary, cfg)
    ev.verbalizer = VerbalizerFacts(labels=labels or [], source=str(paths.best / "verbalizer.json"),
                                    scored_ids=saved_verbalizer.get("label_ids") if saved_verbalizer else None,
                                    trained_ids=(summary or {}).get("verbalizer", {}).get("label_ids"))
    if cfg is not None:
        _rebuild(ev, cfg, paths, options, recorded, say)
    else:
        for name in ("probe", "negatives"):
            ev.missing.setdefault(name, ev.missing["config"])
    return ev


def _loss(ev: Evidence, paths: RunPaths, say: Callable[[str], None] = lambda m: None) -> None:
    if not paths.train_log.is_file():
        ev.missing["loss"] = f"{paths.train_log} (run the train stage)"
        ev.missing["validation"] = ev.missing["loss"]
        return
    try:
        records, cut = read_jsonl(paths.train_log)
    except JsonlError as err:  # damaged, not cut: the curves it would give cannot be trusted
        ev.missing["loss"] = ev.missing["validation"] = f"an undamaged training log ({err})"
        return
    if cut:  # a kill mid-append: the lines before it still count
        say(f"note: {paths.train_log}: line {cut} was cut by a killed run; the loss is read from the lines before it")
    losses = [r for r in records if "loss" in r and "step" in r]
    evals = [r for r in records if r.get("event") == "eval" and "val_ndcg@10" in r]
    src = str(paths.train_log)
    ev.sources["loss"] = src
    if losses:
        ev.loss = Curve(np.array([r["step"] for r in losses]),
                        np.array([r["loss"] if r["loss"] is not None else math.nan for r in losses], dtype=np.float64),
                        "train loss", src)
    if evals:
        ev.validation = Curve(np.array([r["step"] for r in evals]), np.array([r["val_ndcg@10"] for r in evals]),
                              "val NDCG@10", src, higher_is_better=True)
        ev.validation_baseline = evals[-1].get("val_retriever_ndcg@10")


def _lineage(ev: Evidence, paths: RunPaths, summary: dict | None, saved: dict | None, metrics: dict | None) -> None:
    if summary is None and saved is None and metrics is None:
        ev.missing["lineage"] = f"{paths.ranker}/train_summary.json and {paths.metrics('test').name}"
        return
    lin = WeightsLineage()
    if summary is not None:
        lin.best_step, lin.last_step = summary.get("best_step"), summary.get("steps")
    if saved is not None:
        lin.saved_step = saved.get("step")
    if metrics is not None:
        lin.scored_step = metrics.get("adapter_step")
        if metrics.get("adapter"):
            lin.scored_path = str(Path(metrics["adapter"]).name)
            lin.expected_scored_path = paths.best.name
    best_file = paths.best / "adapter_model.safetensors"
    if best_file.is_file():
        lin.hashes["best/"] = sha256_file(best_file)
    if lin.best_step:
        step_file = paths.step_dir(lin.best_step) / "adapter_model.safetensors"
        if step_file.is_file():
            label = f"{paths.step_dir(lin.best_step).name}/"
            lin.hashes[label] = sha256_file(step_file)
            lin.must_match.append(("best/", label))
        else:
            lin.notes.append(f"{paths.step_dir(lin.best_step).name}/ is not kept: best/ compared by step only")
    ev.lineage = lin


def _score_matrix(cells, width: int) -> np.ndarray:
    """(U, N) scores from per-user lists; ragged rows padded with -inf (never above a target)."""
    scores = np.full((len(cells), width), -np.inf)
    for i, s in enumerate(cells):
        scores[i, : len(s)] = s
    return scores


def _rankings(ev: Evidence, paths: RunPaths, split: str, labels: list[str] | None,
              metrics: dict | None = None) -> pd.DataFrame | None:
    path = paths.rankings(split)
    if not path.is_file():
        for name in ("rankings", "scores", "probe"):
            ev.missing.setdefault(name, f"{path.name} (run the score stage)")
        return None
    frame = pd.read_parquet(path)
    ev.sources["rankings"] = str(path)
    cands = [list(map(int, c)) for c in frame["candidates"]]
    targets = [int(t) for t in frame["target"]]
    n = np.array([len(c) for c in cands], dtype=np.int64)
    tidx = np.array([c.index(t) if t in c else -1 for c, t in zip(cands, targets)], dtype=np.int64)
    width = int(n.max()) if len(n) else 0
    scores = _score_matrix(frame["scores"], width)  # (U, N) the LLM's own label scores (what the probe re-makes)
    # The run's final order (score.fusion / score.permutations) is written next to the LLM's scores:
    # final_scores, and target_rank follows it. Older runs have neither and final_order absent.
    final = (metrics or {}).get("final_order") or "reranker"
    final_rank = None
    if final != "reranker":
        if "final_scores" in frame:
            final_rank = target_ranks(_score_matrix(frame["final_scores"], width), tidx)
        elif f"{final}_scores" in frame:
            final_rank = target_ranks(_score_matrix(frame[f"{final}_scores"], width), tidx)
        elif "target_rank" in frame:
            final_rank = np.asarray(frame["target_rank"], dtype=np.int64)
    ev.rankings = Rankings(source=str(path), num_candidates=n, target_index=tidx,
                           reranker_rank=target_ranks(scores, tidx),
                           retriever_rank=np.asarray(frame["retriever_rank"], dtype=np.int64)
                           if "retriever_rank" in frame else None,
                           top_position=np.argmax(scores, axis=1) if width else None,
                           labels=labels, candidate_items=cands, targets=targets,
                           final_order=final, final_rank=final_rank)
    return frame


def _order_from_stats(stats: dict | None) -> str | None:
    """The display order examples.py recorded in its stats: "order" (now) or "shuffled" (older runs)."""
    if not stats:
        return None
    if stats.get("order") in ("shuffled", "retriever"):
        return stats["order"]
    if isinstance(stats.get("shuffled"), bool):
        return "shuffled" if stats["shuffled"] else "retriever"
    return None


def _protocol(ev: Evidence, root: Path, summary: dict | None, metrics: dict | None, cfg: RunConfig | None,
              metrics_name: str) -> None:
    """Training and evaluation display orders: what the examples recorded first, then what the run says
    it used (metrics' protocol), then the config (prompt.train_order / eval_order; older configs have
    prompt.shuffle_candidates, which shuffled every split or none)."""
    raw_prompt: dict = {}
    if cfg is None and (root / "config.yaml").is_file():
        try:
            import yaml

            raw_prompt = (yaml.safe_load((root / "config.yaml").read_text()) or {}).get("prompt") or {}
        except Exception:  # an unreadable config leaves the protocol unknown, as for a foreign run
            raw_prompt = {}
    prompt = cfg.prompt.__dict__ if cfg is not None else raw_prompt
    old = prompt.get("shuffle_candidates")
    old = None if not isinstance(old, bool) else "shuffled" if old else "retriever"
    recorded = (metrics or {}).get("protocol") or {}
    found: dict[str, str | None] = {}
    where: list[str] = []
    for key, stats, stats_file in (
            ("train_order", (summary or {}).get("train_prompt_stats"), "ranker/train_summary.json"),
            ("eval_order", (metrics or {}).get("prompt_stats"), metrics_name)):
        for value, source in ((_order_from_stats(stats), stats_file), (recorded.get(key), metrics_name),
                              (prompt.get(key), "config.yaml"), (old, "config.yaml (prompt.shuffle_candidates)")):
            if value in ("shuffled", "retriever"):
                found[key] = value
                where.append(f"{key} from {source}")
                break
    if found:
        ev.protocol = Protocol(train_order=found.get("train_order"), eval_order=found.get("eval_order"),
                               source="; ".join(where))
    else:
        ev.missing["protocol"] = "the display order of the candidates (prompt.train_order / prompt.eval_order)"


def _split_counts(ev: Evidence, paths: RunPaths, labels: list[str] | None) -> None:
    for split in ("train", "val"):
        path = paths.candidates(split)
        if path.is_file():
            ev.split_k[split] = Counter(len(c) for c in pd.read_parquet(path, columns=["candidates"])["candidates"])
    if ev.rankings is not None:
        ev.split_k["test"] = Counter(ev.rankings.num_candidates.tolist())
    if labels:
        ev.split_k["label set"] = Counter({len(labels): 1})
    if len(ev.split_k) < 2:
        ev.missing["split_k"] = "retriever/candidates_{train,val}.parquet and the test rankings"


def _training(ev: Evidence, summary: dict | None, cfg: RunConfig | None) -> None:
    if summary is None:
        for name in ("label_counts", "negatives"):
            ev.missing.setdefault(name, "ranker/train_summary.json (run the train stage)")
        return
    stats = summary.get("train_prompt_stats", {})
    negatives = stats.get("negatives") or (cfg.prompt.negatives if cfg else None)
    # Before the target is put into a list that lacks it: comparable with the test lists' hit rate.
    rate = None if negatives == "random" or "target_missing_rate" not in stats else 1.0 - stats["target_missing_rate"]
    note = ""
    if cfg is not None and cfg.retriever.train_candidates == "none":
        note = "no retriever candidates for training prefixes (retriever.train_candidates=none)"
    elif cfg is not None and negatives != "random":
        note = ("held-out retriever" if cfg.retriever.train_candidates == "held_out"
                else "the retriever trained on these targets (retriever.train_candidates=same)")
    ev.training = TrainingSide(source="ranker/train_summary.json", label_counts=stats.get("label_counts"),
                               negatives_declared=negatives, target_in_list_rate=rate, candidate_source_note=note)


def _popularity(ev: Evidence, paths: RunPaths) -> None:
    path = paths.data / "sequences.parquet"
    if not path.is_file():
        ev.missing.setdefault("negatives", f"{path} (run the prepare stage)")
        return
    counts: Counter = Counter()
    for items in pd.read_parquet(path, columns=["items"])["items"]:
        counts.update(int(i) for i in list(items)[:-2])  # the training part of each sequence
    ev.popularity = dict(counts)
    ev.popularity_source = "training interactions"


def _capacity(ev: Evidence, paths: RunPaths, summary: dict | None, cfg: RunConfig | None) -> None:
    adapter_cfg = paths.best / "adapter_config.json"
    lora = read_json(adapter_cfg) if adapter_cfg.is_file() else {}
    name = cfg.model.name_or_path if cfg else lora.get("base_model_name_or_path", "?")
    params = None
    try:
        from rerank_dist.memory import find_architecture

        found = find_architecture(name, cfg.model.cache_dir if cfg else "")
        params = parameter_count(found[0]) if found else None
    except Exception:  # no config.json anywhere offline: the name may still say the size
        params = None
    seen = None
    if summary is not None and cfg is not None:
        seen = int(summary.get("steps", 0)) * cfg.train.batch_size
    ev.capacity = CapacityFacts(model=Path(name).name if Path(name).is_dir() else name,
                                parameters=params or parameters_from_name(name),
                                lora_r=lora.get("r", cfg.model.lora_r if cfg else None),
                                lora_targets=lora.get("target_modules", cfg.model.lora_target_modules if cfg else None),
                                examples_seen=seen, lora_layers=lora.get("layers_to_transform"))


def _rebuild(ev: Evidence, cfg: RunConfig, paths: RunPaths, options: OwnRunOptions, recorded: pd.DataFrame | None,
             say: Callable[[str], None]) -> None:
    """Prompts (tokenizer only), then the weights (unless options.model is off)."""
    from rerank_dist.doctor import probe

    try:
        # The scorer scored the first N users (score.max_users, which a stage run alone does not record
        # in config.yaml): as many as the rankings hold; 4 prompts suffice without re-scoring.
        limit = (len(recorded) if recorded is not None else None) if options.model else 4
        rebuilt = probe.rebuild_split(cfg, paths, options.split, limit=limit)
    except Exception as err:  # no tokenizer offline, data gone, ...: these checks need it, the rest do not
        reason = f"the run's tokenizer, data and candidates ({type(err).__name__}: {str(err).splitlines()[0]})"
        ev.missing.setdefault("probe", reason)
        return
    ids, error, naive = probe.in_context(rebuilt.tokenizer, [e.prompt for e in rebuilt.examples[:4]], rebuilt.labels)
    ev.verbalizer.in_context_ids, ev.verbalizer.in_context_error, ev.verbalizer.naive_mismatches = ids, error, naive
    try:
        train_examples = probe.training_candidates(cfg, paths, rebuilt)
        ev.training = ev.training or TrainingSide(source="examples/train (the training examples store)")
        ev.training.negative_items = [c for e in train_examples for c in e.candidate_ids if c != e.target]
        ev.training.k_counts = Counter(len(e.candidate_ids) for e in train_examples)
    except FileNotFoundError as err:
        ev.missing.setdefault("negatives", _no_training_candidates(cfg, paths, err))
    except Exception as err:
        ev.missing.setdefault("negatives", f"the training candidates ({type(err).__name__}: {err})")
    if not options.model:
        ev.missing["probe"] = "the model reloaded (doctor ran without it: --no-model)"
        return
    if recorded is None or ev.verbalizer.scored_ids is None or not probe.model_available(paths):
        ev.missing.setdefault("probe", f"{paths.best} and {paths.rankings(options.split).name}")
        return
    say(f"[doctor] reloading {paths.best} and re-scoring a sample of about {options.sample_users} prompts")
    try:
        ev.probe = probe.probe_model(cfg, paths, rebuilt, recorded, list(ev.verbalizer.scored_ids),
                                     options.sample_users, options.seed, options.device)
    except Exception as err:  # e.g. the backbone cannot be found offline
        ev.missing["probe"] = f"the backbone and adapter loaded ({type(err).__name__}: {str(err).splitlines()[0]})"


def _no_training_candidates(cfg: RunConfig, paths: RunPaths, err: FileNotFoundError) -> str:
    """Why the training lists could not be read back: a run with retriever.train_candidates=none makes no
    candidates_train.parquet (its training lists were drawn from the sequences), any other lacks a stage."""
    if cfg.retriever.train_candidates == "none" and not paths.candidates("train").is_file():
        return (f"the training lists ({paths.candidates('train').name} is not made with "
                f"retriever.train_candidates=none: the target + random items from the sequences)")
    return f"the training candidates (FileNotFoundError: {err}; run the retrieve and train stages)"
