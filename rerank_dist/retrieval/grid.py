"""The retriever's hyperparameter grid, tuned as LlamaRec tuned LRURec: chosen on validation only.

LlamaRec's text says weight decay and dropout were tuned per dataset; its code (train_retriever.py)
searches weight decay {0, 0.01} x dropout {0, 0.1, 0.2, 0.3, 0.4, 0.5}, with the recurrence's dropout
tied to the model's (``bert_dropout`` and ``bert_attn_dropout`` set together), everything else fixed
(lr 1e-3, AdamW, batch 16 / 64, early stopping on validation Recall@10). ``GRID`` is that search.

Each configuration trains once at ``grid_seed`` and is ranked by its validation Recall@10 (LlamaRec's
``best_metric``; ties: validation NDCG@10, then the grid's order). The test split is computed for
every run and stored, but never read by the selection. The selected configuration is then trained at
every one of ``seeds`` (the grid's own run is kept for ``grid_seed``) and its test figures reported as
the mean over those seeds. So is the reference configuration (today's defaults) when the grid did not
select it, so that "better on validation" is judged over the same seeds.

Resumable: every run writes ``runs/<name>/result.json`` atomically when it has finished (config,
seed, validation and test metrics, training facts) and is skipped when that file exists for the same
settings; a killed grid continues with the runs that have no result. Several processes split the runs
(process i takes runs i, i + n, ...); they meet only at a barrier before the selection (every
process then reads the same files and selects the same configuration) and before the summary.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from rerank_dist.config import RetrieverConfig
from rerank_dist.io import atomic_write_text, read_json, write_json, write_png
from rerank_dist.metrics import metrics_from_ranks
from rerank_dist.retrieval.candidates import TEST_KS, ranks_on_test_split
from rerank_dist.retrieval.checkpoint import save_retriever
from rerank_dist.retrieval.scoring import full_catalogue_ranks
from rerank_dist.retrieval.train import train_retriever, validation_examples

# LlamaRec's search (train_retriever.py). dropout also sets attn_dropout.
GRID: dict[str, list[float]] = {"weight_decay": [0.0, 0.01], "dropout": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]}
TUNED_FIELDS = ("weight_decay", "dropout", "attn_dropout")
SELECT_ON = ("recall@10", "ndcg@10")  # validation metric, then the tie-break
RESULT_FILE = "result.json"
SUMMARY_FILE = "grid.json"
REPORTED = ("ndcg@5", "recall@5", "mrr@5", "ndcg@10", "recall@10", "mrr@10", "recall@20")


@dataclasses.dataclass(frozen=True)
class Workers:
    """This process's share of the grid: index, count, and a barrier over all of them."""

    index: int = 0
    count: int = 1
    barrier: Callable[[], None] = lambda: None

    @property
    def is_main_process(self) -> bool:
        return self.index == 0


def grid_configs(space: Mapping[str, Sequence[float]] = GRID) -> list[dict[str, float]]:
    """Every combination of the space's values, in order; attn_dropout follows dropout (as LlamaRec)."""
    names = list(space)
    configs = []
    for values in itertools.product(*(space[n] for n in names)):
        config = {n: float(v) for n, v in zip(names, values)}
        if "dropout" in config and "attn_dropout" not in config:
            config["attn_dropout"] = config["dropout"]
        configs.append(config)
    return configs


def run_name(config: Mapping[str, float], seed: int) -> str:
    """"wd0.01-do0.2-ado0.2-seed0": a directory name that says the run's settings."""
    short = {"weight_decay": "wd", "dropout": "do", "attn_dropout": "ado"}
    return "-".join(f"{short.get(k, k)}{v:g}" for k, v in sorted(config.items())) + f"-seed{seed}"


def with_config(base: RetrieverConfig, config: Mapping[str, float], seed: int) -> RetrieverConfig:
    return dataclasses.replace(base, **config, seed=seed)


def _settings(cfg: RetrieverConfig) -> dict:
    """What a stored result must have been trained with to be reused (candidate-only fields aside)."""
    skip = {"top_k", "train_prefixes_per_user", "train_candidates"}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}


def base_settings(cfg: RetrieverConfig) -> dict:
    """The settings the grid holds fixed: what it trains with, less the tuned fields and the seed."""
    return {k: v for k, v in _settings(cfg).items() if k not in TUNED_FIELDS and k != "seed"}


def validation_metrics(model: Any, sequences: Mapping[int, Sequence[int]], max_len: int) -> dict[str, float]:
    """Validation target seq[-2] ranked over the whole catalogue from seq[:-2], history excluded."""
    histories, targets = validation_examples(sequences)
    return metrics_from_ranks(full_catalogue_ranks(model, histories, targets, max_len), ks=TEST_KS)


def run_one(cfg: RetrieverConfig, dataset: Any, run_dir: Path, log: Callable[[str], None] = print) -> dict:
    """Train one configuration (or reuse its stored result): its validation and test metrics.

    The checkpoint is kept next to result.json; result.json is written last, atomically, so its
    presence means the run finished.
    """
    result_path = run_dir / RESULT_FILE
    if result_path.is_file():
        stored = read_json(result_path)
        if stored.get("settings") == _settings(cfg):
            return stored
        log(f"grid: {run_dir.name}: stored result was made with other settings; training again")
    started = time.monotonic()
    model, summary = train_retriever(cfg, dataset.sequences, dataset.num_items, log=log, progress=False)
    minutes = (time.monotonic() - started) / 60
    save_retriever(model, cfg, run_dir)
    val = validation_metrics(model, dataset.sequences, cfg.max_len)
    test = metrics_from_ranks(ranks_on_test_split(model, dataset.sequences, cfg.max_len), ks=TEST_KS)
    result = {"name": run_dir.name, "config": {k: getattr(cfg, k) for k in TUNED_FIELDS}, "seed": cfg.seed,
              "val": val, "test": test, "settings": _settings(cfg), "train_minutes": round(minutes, 2),
              "best_epoch": summary.best_epoch, "epochs": summary.epochs, "stopped_by": summary.stopped_by,
              "load_average": os.getloadavg()[0]}
    write_json(result_path, result)
    log(f"grid: {run_dir.name}: val recall@10 {val['recall@10']:.4f} ndcg@10 {val['ndcg@10']:.4f} "
        f"({minutes:.1f} min, best epoch {summary.best_epoch}/{summary.epochs}, {summary.stopped_by})")
    return result


def select(results: Sequence[dict]) -> dict:
    """The result with the best validation Recall@10 (then NDCG@10, then the earlier in the list).
    Reads ``val`` only."""
    if not results:
        raise ValueError("no grid results to select from")
    return max(enumerate(results), key=lambda ir: (*(ir[1]["val"][m] for m in SELECT_ON), -ir[0]))[1]


def _mean_std(results: Sequence[dict], split: str) -> tuple[dict, dict]:
    keys = [k for k in REPORTED if all(k in r[split] for r in results)]
    values = {k: np.array([r[split][k] for r in results], dtype=np.float64) for k in keys}
    return ({k: float(v.mean()) for k, v in values.items()},
            {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()})


def _share(items: Sequence[Any], workers: Workers) -> list[Any]:
    return list(items[workers.index::workers.count])


def run_grid(base: RetrieverConfig, dataset: Any, out_dir: str | Path, space: Mapping[str, Sequence[float]] = GRID,
             grid_seed: int = 0, seeds: Sequence[int] = (0, 1, 2), reference: Mapping[str, float] | None = None,
             workers: Workers = Workers(), log: Callable[[str], None] = print, name: str = "") -> dict | None:
    """Run (or resume) the grid in out_dir; the summary (also written to out_dir/grid.json) on the main
    process, None on the others. reference: the configuration the selection is compared with
    (default: base's own values of the tuned fields)."""
    out_dir = Path(out_dir)
    started = time.monotonic()
    configs = grid_configs(space)
    reference = dict(reference or {k: getattr(base, k) for k in TUNED_FIELDS})
    runs_dir = out_dir / "runs"

    def run(config: Mapping[str, float], seed: int) -> dict:
        cfg = with_config(base, config, seed)
        return run_one(cfg, dataset, runs_dir / run_name(config, seed), log)

    for config in _share(configs, workers):
        run(config, grid_seed)
    workers.barrier()
    grid = [read_json(runs_dir / run_name(c, grid_seed) / RESULT_FILE) for c in configs]
    best = select(grid)
    chosen = {k: best["config"][k] for k in TUNED_FIELDS}
    repeated = [chosen] + ([reference] if reference != chosen else [])
    # The grid's own run stands for grid_seed, except for a reference outside the grid's space.
    extra = [(c, s) for c in repeated for s in seeds if s != grid_seed or c not in configs]
    for config, seed in _share(extra, workers):
        run(config, seed)
    workers.barrier()
    if not workers.is_main_process:
        return None

    def over_seeds(config: Mapping[str, float]) -> dict:
        results = [read_json(runs_dir / run_name(config, s) / RESULT_FILE) for s in seeds]
        val_mean, val_std = _mean_std(results, "val")
        test_mean, test_std = _mean_std(results, "test")
        return {"config": dict(config), "seeds": list(seeds), "val": val_mean, "val_std": val_std,
                "test": test_mean, "test_std": test_std, "runs": [r["name"] for r in results]}

    summary = {
        "dataset": name,
        "space": {k: list(v) for k, v in space.items()},
        "grid_seed": grid_seed,
        "selected_on": f"validation {SELECT_ON[0]} (ties: {SELECT_ON[1]}) at seed {grid_seed}",
        "best": over_seeds(chosen),
        "reference": over_seeds(reference),
        "best_beats_reference_on_val": None,
        "base": base_settings(base),
        "runs": [{k: r[k] for k in ("name", "config", "seed", "val", "test", "train_minutes", "best_epoch",
                                    "epochs", "stopped_by", "load_average")} for r in grid],
        "minutes_this_invocation": round((time.monotonic() - started) / 60, 2),
        "processes": workers.count,
    }
    summary["best_beats_reference_on_val"] = (summary["best"]["val"][SELECT_ON[0]]
                                              > summary["reference"]["val"][SELECT_ON[0]])
    write_outputs(summary, out_dir / SUMMARY_FILE)
    return summary


def markdown(summary: dict) -> str:
    """The grid's table (one row per configuration at the grid seed) and the selected configuration's
    figures over seeds, next to the reference's."""
    lines = [f"# LRURec grid{(' on ' + summary['dataset']) if summary.get('dataset') else ''}", "",
             f"Selected on {summary['selected_on']}; test never read by the selection.", "",
             "| weight decay | dropout (= attn dropout) | val R@10 | val N@10 | test R@10 | test N@10 | min | "
             "epochs (best) |", "|---|---|---|---|---|---|---|---|"]
    best_cfg = summary["best"]["config"]
    for r in summary["runs"]:
        mark = " **(selected)**" if r["config"] == best_cfg else ""
        lines.append(f"| {r['config']['weight_decay']:g} | {r['config']['dropout']:g}{mark} | "
                     f"{r['val']['recall@10']:.4f} | {r['val']['ndcg@10']:.4f} | {r['test']['recall@10']:.4f} | "
                     f"{r['test']['ndcg@10']:.4f} | {r['train_minutes']:.1f} | {r['epochs']} ({r['best_epoch']}) |")
    lines += ["", f"Over seeds {summary['best']['seeds']} (mean ± std):", "",
              "| configuration | val R@10 | val N@10 | test R@10 | test N@10 | test M@10 |", "|---|---|---|---|---|---|"]
    for label, entry in (("selected", summary["best"]), ("reference (defaults)", summary["reference"])):
        c = entry["config"]
        name = f"{label}: wd {c['weight_decay']:g}, dropout {c['dropout']:g}"
        cells = [f"{entry[s][m]:.4f} ± {entry[s + '_std'][m]:.4f}" for s, m in
                 (("val", "recall@10"), ("val", "ndcg@10"), ("test", "recall@10"), ("test", "ndcg@10"),
                  ("test", "mrr@10"))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, out: Path) -> None:
    """Validation and test Recall@10 against dropout, one line per weight decay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=False)
    for split, ax in zip(("val", "test"), axes):
        for wd in sorted({r["config"]["weight_decay"] for r in summary["runs"]}):
            rows = sorted((r for r in summary["runs"] if r["config"]["weight_decay"] == wd),
                          key=lambda r: r["config"]["dropout"])
            ax.plot([r["config"]["dropout"] for r in rows], [r[split]["recall@10"] for r in rows], marker="o",
                    label=f"weight decay {wd:g}")
        ax.set_title(f"{split} Recall@10 (seed {summary['grid_seed']})")
        ax.set_xlabel("dropout (= attn dropout)")
        ax.legend()
    fig.tight_layout()
    write_png(fig, out)


def write_outputs(summary: dict, json_path: Path) -> None:
    """json_path and, next to it, the same name as .md and .png."""
    json_path = Path(json_path)
    write_json(json_path, summary)
    atomic_write_text(json_path.with_suffix(".md"), markdown(summary))
    plot(summary, json_path.with_suffix(".png"))
