"""LlamaRec's Tables 1 and 3 reproduced: datasets x seeds x {retriever, ranker}, our mean ± std over
seeds next to the paper's figures, and the paired interval of ranker vs retriever per dataset.

Everything lives under one root directory (``--root``)::

    <root>/<dataset>/grid/      the retriever's grid on that dataset (rerank_dist.retrieval.grid)
    <root>/<dataset>/seed<k>/   one run directory per seed, made by two cells:
                                  retriever: prepare + retrieve, with the grid's selected settings
                                  ranker:    train + score + report
    <root>/tables.json, .md     the tables, from the cells that are done

A cell is done when its stages' outputs exist for its settings (the stage keys of pipeline.py), and
is then skipped, so the command run again continues where it stopped; a grid continues its runs.
The retriever cell of seed k keeps the grid's own model of the selected configuration at seed k
(the retrieve stage reuses a checkpoint trained with the same settings), so the table's retriever is
the one the grid selected and the two never disagree. Each cell can be run on its own
(``--cell NAME``), which is what the Slurm jobs do (slurm/tables.sh: one job per cell, each after
the cell it reads).

Table 1 is over all test users (a user whose target the retriever missed counts as a miss), Table 3
over the users whose target is among the retriever's candidates. Sources, per seed:
retriever Table 1 = retriever/metrics_test.json (full catalogue), retriever Table 3 = the
candidates_test.parquet ranks of the found targets, ranker = metrics_test.json (its final order, and
the LLM's order alone), the paired interval = rankings_test.parquet (per-user target ranks).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import yaml

from rerank_dist.config import ConfigError, RunConfig
from rerank_dist.data.catalog import CATALOG
from rerank_dist.io import atomic_write_text, read_json, write_json
from rerank_dist.metrics import metrics_from_ranks, paired_bootstrap, per_user
from rerank_dist.paths import RunPaths

COLUMNS = ("ndcg@5", "recall@5", "mrr@5", "ndcg@10", "recall@10", "mrr@10")  # LlamaRec's column order
PAIRED_METRICS = ("ndcg@10", "recall@5")
KINDS = ("grid", "retriever", "ranker")
TABLES_FILE = "tables.json"

# LlamaRec (Yue et al. 2023, arXiv:2311.02089): the figures of its Table 1 (all users) and Table 3
# (users whose target is in LRURec's top 20) that docs/DESIGN.md records; None where not recorded.
# Its "ML-100k" is ml-latest-small (610 users, 3,650 items after its preprocessing).
_NONE = dict.fromkeys(COLUMNS)
PAPER: dict[str, dict[str, dict[str, dict[str, float | None]]]] = {
    "ml-latest-small": {
        "table1": {"retriever": {**_NONE, "ndcg@10": 0.0705, "recall@10": 0.1426, "mrr@10": 0.0491},
                   "ranker": {**_NONE, "ndcg@5": 0.0543, "recall@5": 0.0852, "ndcg@10": 0.0759,
                              "recall@10": 0.1524, "mrr@10": 0.0529}},
        "table3": {"retriever": {**_NONE, "ndcg@10": 0.3367}, "ranker": {**_NONE, "ndcg@10": 0.3766}},
    },
    "beauty": {
        "table1": {"retriever": {**_NONE, "ndcg@10": 0.0533, "recall@10": 0.0916},
                   "ranker": {**_NONE, "ndcg@10": 0.0554, "recall@10": 0.0971}},
        "table3": {"retriever": {**_NONE, "ndcg@10": 0.4168}, "ranker": {**_NONE, "ndcg@10": 0.4337}},
    },
    "games": {
        "table1": {"retriever": {**_NONE, "ndcg@10": 0.0800, "recall@10": 0.1463},
                   "ranker": {**_NONE, "ndcg@10": 0.0887, "recall@10": 0.1599}},
        "table3": {"retriever": {**_NONE, "ndcg@10": 0.3760}, "ranker": {**_NONE, "ndcg@10": 0.4173}},
    },
}
ML100K_NOTE = (
    "LlamaRec's ML-100k LRURec row is not self-consistent: Table 1 / Table 3 should be one constant per "
    "dataset (the share of users whose target was retrieved), and it is for LlamaRec's own row "
    "(N@10 .0759 / .3766 = 0.2015), Beauty (0.128) and Games (0.213), but LRURec's gives .0705 / .3367 = 0.209 "
    "(0.199 at @5, up to 0.214 at R@10). With LlamaRec's ratio, 0.2016 x .3367, its N@10 would be about .068 "
    "and its R@10 about .134.")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One row group of the tables: its label, the data.* overrides that select it, and its paper key."""

    label: str
    overrides: tuple[str, ...]
    spec: str = ""  # as given on the command line

    @property
    def paper(self) -> dict | None:
        return PAPER.get(self.label)


def parse_dataset(spec: str) -> Dataset:
    """NAME (bundled ml-latest-small, or a named dataset downloaded), NAME=DIR (a named dataset's
    release files in DIR) or LABEL=FILE.yaml (any dataset: FILE's data: section, e.g. format=table)."""
    label, sep, where = spec.partition("=")
    if "." in label and not where.endswith((".yaml", ".yml")):
        raise ConfigError(f"--datasets: {spec!r} looks like an override: give overrides before the options, or after "
                          "`--` (rerank-dist tables --datasets beauty -- train.lr=1e-4)")
    if not sep:
        if label not in CATALOG:
            raise ConfigError(f"--datasets: unknown dataset {label!r}; expected one of {', '.join(CATALOG)}, "
                              f"NAME=DIR (its files in DIR) or LABEL=FILE.yaml (a data: section)")
        source = "bundled" if label == "ml-latest-small" else "download"
        return Dataset(label, (f"data.source={source}", f"data.dataset={label}"), spec)
    path = Path(where).expanduser().resolve()
    if where.endswith((".yaml", ".yml")):
        if not path.is_file():
            raise ConfigError(f"--datasets {spec}: {path} not found (expected a YAML file with a data: section)")
        data = (yaml.safe_load(path.read_text()) or {}).get("data")
        if not isinstance(data, dict) or not data:
            raise ConfigError(f"--datasets {spec}: {path} has no data: section (expected data.dataset, data.source, ...)")
        return Dataset(label, tuple(_dotted("data", data)), f"{label}={path}")
    if label not in CATALOG:
        raise ConfigError(f"--datasets {spec}: {label!r} is not a named dataset ({', '.join(CATALOG)}); "
                          f"for other data give LABEL=FILE.yaml with a data: section")
    if not path.is_dir():
        raise ConfigError(f"--datasets {spec}: {path} is not a directory (expected the {label} release files)")
    return Dataset(label, ("data.source=local", f"data.dataset={label}", f"data.raw_dir={path}"), f"{label}={path}")


def _dotted(prefix: str, mapping: dict) -> list[str]:
    out = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            out += _dotted(f"{prefix}.{key}", value)
        else:
            out.append(f"{prefix}.{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    return out


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the command was asked for: the cells follow from it."""

    root: Path
    datasets: tuple[Dataset, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    grid: bool = True
    config_file: str | None = None
    overrides: tuple[str, ...] = ()
    space: tuple[tuple[str, tuple[float, ...]], ...] = ()  # the grid's search; () = LlamaRec's (grid.GRID)

    @property
    def grid_space(self) -> dict[str, list[float]]:
        from rerank_dist.retrieval.grid import GRID

        return {k: list(v) for k, v in self.space} if self.space else {k: list(v) for k, v in GRID.items()}


@dataclasses.dataclass(frozen=True)
class Cell:
    dataset: Dataset
    kind: str  # grid | retriever | ranker
    seed: int | None  # None for the grid (it trains every seed itself)

    @property
    def name(self) -> str:
        return f"{self.dataset.label}/grid" if self.kind == "grid" else f"{self.dataset.label}/seed{self.seed}/{self.kind}"

    def after(self, plan: Plan) -> str | None:
        """The cell whose outputs this one reads."""
        if self.kind == "ranker":
            return f"{self.dataset.label}/seed{self.seed}/retriever"
        if self.kind == "retriever" and plan.grid:
            return f"{self.dataset.label}/grid"
        return None


def cells(plan: Plan) -> list[Cell]:
    """Every cell, each after the cells it reads."""
    out = []
    for dataset in plan.datasets:
        if plan.grid:
            out.append(Cell(dataset, "grid", None))
        for seed in plan.seeds:  # seed by seed: an interrupted run leaves whole seeds to tabulate
            out += [Cell(dataset, "retriever", seed), Cell(dataset, "ranker", seed)]
    return out


def find_cell(plan: Plan, name: str) -> Cell:
    for cell in cells(plan):
        if cell.name == name:
            return cell
    raise ConfigError(f"--cell {name}: no such cell; expected one of {', '.join(c.name for c in cells(plan))}")


def run_dir(plan: Plan, dataset: Dataset, seed: int | None) -> Path:
    return plan.root / dataset.label / ("grid" if seed is None else f"seed{seed}")


def grid_summary_path(plan: Plan, dataset: Dataset) -> Path:
    return run_dir(plan, dataset, None) / "retriever_grid" / "grid.json"


def selected_retriever(plan: Plan, dataset: Dataset) -> dict[str, float] | None:
    """The grid's selected retriever settings, None while the grid is not done (or without a grid)."""
    if not plan.grid:
        return None
    path = grid_summary_path(plan, dataset)
    return dict(read_json(path)["best"]["config"]) if path.is_file() else None


def cell_overrides(plan: Plan, cell: Cell) -> list[str]:
    """The dotted overrides a cell's stages run with (after the config file)."""
    out = [*plan.overrides, *cell.dataset.overrides, f"run_dir={run_dir(plan, cell.dataset, cell.seed)}"]
    if cell.kind == "grid":
        return out
    out += [f"retriever.seed={cell.seed}", f"prompt.seed={cell.seed}", f"train.seed={cell.seed}"]
    selected = selected_retriever(plan, cell.dataset)
    if selected is not None:
        out += [f"retriever.{k}={v:g}" for k, v in selected.items()]
    return out


def cell_config(plan: Plan, cell: Cell) -> RunConfig:
    from rerank_dist.settings import resolve_config

    return resolve_config(plan.config_file, cell_overrides(plan, cell))[0]


def _grid_done(plan: Plan, cell: Cell) -> bool:
    path = grid_summary_path(plan, cell.dataset)
    if not path.is_file():
        return False
    from rerank_dist.retrieval.grid import base_settings

    summary = read_json(path)
    return (summary.get("space") == plan.grid_space and summary["best"].get("seeds") == list(plan.seeds)
            and summary.get("base") == base_settings(cell_config(plan, cell).retriever))


def cell_state(plan: Plan, cell: Cell) -> str:
    """"done", "waiting for <cell>" (what it reads is not done) or "to do"."""
    from rerank_dist.pipeline import stage_done

    if cell.kind == "grid":
        return "done" if _grid_done(plan, cell) else "to do"
    if cell.kind == "retriever" and plan.grid and selected_retriever(plan, cell.dataset) is None:
        return f"waiting for {cell.after(plan)}"
    cfg = cell_config(plan, cell)
    if cell.kind == "retriever":
        return "done" if stage_done(cfg, "retrieve") else "to do"
    if not stage_done(cfg, "retrieve"):
        return f"waiting for {cell.after(plan)}"
    done = stage_done(cfg, "train") and stage_done(cfg, "score") and RunPaths(Path(cfg.run_dir)).metrics("test").is_file()
    return "done" if done else "to do"


def run_cell(plan: Plan, cell: Cell, log: Callable[[str], None] = print) -> None:
    """Run one cell's stages on every process of the job (each stage skips what is already done)."""
    from rerank_dist import pipeline
    from rerank_dist.distributed import process_state

    state = cell_state(plan, cell)
    if state.startswith("waiting"):
        raise ConfigError(f"{cell.name}: {state}; run that cell first")
    cfg = cell_config(plan, cell)
    if cell.kind == "grid":
        pipeline.retriever_grid(cfg, log, space=plan.grid_space, seeds=plan.seeds, grid_seed=plan.seeds[0])
        return
    process = process_state()
    if cell.kind == "retriever":
        if process.is_main_process:
            _keep_grid_model(plan, cell, cfg, log)
        with process.main_process_first():
            if process.is_main_process:
                pipeline.prepare(cfg, log)
        pipeline.retrieve(cfg, log)
        return
    if "test" not in cfg.score.splits:
        raise ConfigError(f"score.splits={cfg.score.splits}: the tables need the test split scored")
    pipeline.train(cfg, log)
    pipeline.score(cfg, log)
    if process.is_main_process:
        pipeline.report(cfg, log)
    process.wait_for_everyone()


def _keep_grid_model(plan: Plan, cell: Cell, cfg: RunConfig, log: Callable[[str], None]) -> None:
    """Copy the grid's model of the selected configuration at this seed into the run's retriever/
    (the retrieve stage then reuses it when its settings match, and trains otherwise)."""
    from rerank_dist.retrieval.checkpoint import CONFIG_FILE, MODEL_FILE
    from rerank_dist.retrieval.grid import run_name

    selected = selected_retriever(plan, cell.dataset)
    if selected is None:
        return
    source = run_dir(plan, cell.dataset, None) / "retriever_grid" / "runs" / run_name(selected, cell.seed)
    target = RunPaths(Path(cfg.run_dir)).retriever
    if not (source / CONFIG_FILE).is_file() or (target / CONFIG_FILE).is_file():
        return
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / MODEL_FILE, target / MODEL_FILE)
    shutil.copy2(source / CONFIG_FILE, target / CONFIG_FILE)  # last: its presence marks a complete checkpoint
    log(f"[tables] {cell.name}: the grid's model at seed {cell.seed} -> {target}")


def cell_command(plan: Plan, cell: Cell, program: str = "rerank-dist") -> str:
    """The command that runs this cell alone (as the dry run shows it)."""
    return " ".join([program, "tables", *plan_arguments(plan), "--cell", cell.name])


def plan_arguments(plan: Plan) -> list[str]:
    """The plan as command-line arguments of `rerank-dist tables` (overrides first: the options after
    them take several values each)."""
    import shlex

    args = [*plan.overrides, "--root", str(plan.root), "--datasets", *(d.spec or d.label for d in plan.datasets),
            "--seeds", *map(str, plan.seeds)]
    if not plan.grid:
        args.append("--no-grid")
    for name, values in plan.space:
        args += [f"--{name.replace('_', '-')}", *(f"{v:g}" for v in values)]
    if plan.config_file:
        args += ["--config", plan.config_file]
    return [shlex.quote(a) for a in args]


# Set per cell by the command: a base override of one of these would be silently replaced.
PER_CELL = ("run_dir", "retriever.seed", "prompt.seed", "train.seed")
TUNED_BY_GRID = ("retriever.weight_decay", "retriever.dropout", "retriever.attn_dropout")


def make_plan(root: Path, dataset_specs: Sequence[str], seeds: Sequence[int], grid: bool = True,
              config_file: str | None = None, overrides: Sequence[str] = (),
              space: dict[str, Sequence[float]] | None = None) -> Plan:
    """The plan from the command line; every problem in it at once (ConfigError)."""
    problems = []
    datasets = []
    for spec in dataset_specs:
        try:
            datasets.append(parse_dataset(spec))
        except ConfigError as err:
            problems.append(str(err))
    labels = [d.label for d in datasets]
    problems += [f"--datasets: {label} given twice" for label in sorted({x for x in labels if labels.count(x) > 1})]
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        problems.append(f"--seeds: expected distinct non-negative integers, got {list(seeds)}")
    for override in overrides:
        key = override.partition("=")[0]
        if key in PER_CELL or key.startswith("data."):
            problems.append(f"{override}: the tables set {key} for each cell (--root, --datasets, --seeds); drop it")
        elif grid and key in TUNED_BY_GRID:
            problems.append(f"{override}: the grid selects {key} per dataset; drop it, or pass --no-grid to fix it")
    problems += [f"--{name.replace('_', '-')}: expected values in [0, 1], got {v}"
                 for name, values in (space or {}).items() for v in values if not 0.0 <= v <= 1.0]
    if config_file and not Path(config_file).is_file():
        problems.append(f"--config {config_file}: no such file")
    if problems:
        raise ConfigError("\n".join(problems))
    from rerank_dist.retrieval.grid import GRID

    searched = () if not space or dict(space) == GRID else tuple((k, tuple(map(float, v))) for k, v in space.items())
    return Plan(Path(root).resolve(), tuple(datasets), tuple(seeds), grid,
                str(Path(config_file).resolve()) if config_file else None, tuple(overrides), searched)


def check_plan(plan: Plan) -> list[RunConfig]:
    """Every cell's config, resolved and validated; one ConfigError naming each cell's problems."""
    configs, problems = [], []
    for cell in cells(plan):
        try:
            configs.append(cell_config(plan, cell))
        except ConfigError as err:
            problems += [f"{cell.name}: {line}" for line in str(err).splitlines()]
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))
    return configs


def dry_run_lines(plan: Plan, program: str = "rerank-dist") -> list[str]:
    """The cells, their state, the command that runs each alone and the stages it stands for."""
    import shlex

    lines = [f"tables: datasets {', '.join(d.label for d in plan.datasets)}; seeds {list(plan.seeds)}; retriever "
             f"{'tuned by the grid first' if plan.grid else 'as configured (--no-grid)'}; root {plan.root}"]
    for cell in cells(plan):
        state = cell_state(plan, cell)
        after = cell.after(plan)
        lines.append(f"{cell.name}  [{state}]" + (f"  (after {after})" if after else ""))
        lines.append(f"  {cell_command(plan, cell, program)}")
        given = " ".join(shlex.quote(o) for o in cell_overrides(plan, cell))
        if cell.kind == "grid":
            searched = " ".join(f"--{k.replace('_', '-')} " + " ".join(f"{v:g}" for v in vs)
                                for k, vs in plan.grid_space.items())
            stages = [f"{program} grid {searched} --seeds {' '.join(map(str, plan.seeds))} --grid-seed {plan.seeds[0]} "
                      f"{given}"]
        elif cell.kind == "retriever":
            stages = [f"{program} {stage} {given}" for stage in ("prepare", "retrieve")]
            if plan.grid:
                stages[0] = ("(the grid's model at this seed kept; retriever settings: the grid's selection"
                             + ("" if selected_retriever(plan, cell.dataset) else ", once it is done") + ") " + stages[0])
        else:
            stages = [f"{program} {stage} {given}" for stage in ("train", "score", "report")]
        lines += [f"  = {stage}" for stage in stages]
    lines.append(f"then: the tables -> {plan.root / TABLES_FILE} (+ .md), from the cells that are done")
    return lines


# ---------------------------------------------------------------- the tables


def _seed_figures(path: Path) -> dict[str, Any]:
    """One seed's figures from its run directory's files (only those that exist)."""
    paths = RunPaths(path)
    out: dict[str, Any] = {}
    retr = paths.retriever / "metrics_test.json"
    if retr.is_file() and paths.candidates("test").is_file():
        ranks = pd.read_parquet(paths.candidates("test"), columns=["target_rank"])["target_rank"].to_numpy()
        found = ranks[ranks >= 0]
        out["retriever"] = {"table1": {c: read_json(retr)["full_catalogue"][c] for c in COLUMNS},
                            "table3": {c: metrics_from_ranks(found, (5, 10))[c] for c in COLUMNS},
                            "users": int(len(ranks)), "retrieved": int(len(found))}
    metrics_path = paths.metrics("test")
    if metrics_path.is_file():
        metrics = read_json(metrics_path)
        final = metrics.get("final_order") or "reranker"
        for row, key in (("ranker", final), ("llm_alone", "reranker")):
            out[row] = {"table1": {c: metrics[key]["all_users"][c] for c in COLUMNS},
                        "table3": {c: metrics[key]["retrieved_subset"][c] for c in COLUMNS},
                        "order": key, "users": metrics[key]["num_users"], "retrieved": metrics[key]["num_retrieved"]}
        rankings = pd.read_parquet(paths.rankings("test"), columns=["user", "target_rank", "retriever_rank"])
        out["ranks"] = rankings.sort_values("user").reset_index(drop=True)
    return out


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0}


def _paired(ranks: Sequence[pd.DataFrame], resamples: int = 2000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Ranker (final order) - retriever on the same test users: each user's difference averaged over
    the seeds, then users resampled with replacement (95% percentile interval); and each seed's own."""
    users = ranks[0]["user"].to_numpy()
    if any(not np.array_equal(r["user"].to_numpy(), users) for r in ranks):
        raise ValueError("the seeds' rankings_test.parquet hold different users; they cannot be paired")
    out = {}
    for metric in PAIRED_METRICS:
        diffs = np.stack([per_user(r["target_rank"].to_numpy(), metric) - per_user(r["retriever_rank"].to_numpy(), metric)
                          for r in ranks])  # (S, U)
        mean, low, high = paired_bootstrap(diffs.mean(axis=0), resamples, seed)
        out[metric] = {"diff": mean, "low": low, "high": high, "per_seed": [float(d.mean()) for d in diffs]}
    return out


def collect(plan: Plan) -> dict[str, Any]:
    """The tables as data, from the run directories of the plan's seeds (whatever is done so far)."""
    datasets = []
    for dataset in plan.datasets:
        figures = {s: _seed_figures(run_dir(plan, dataset, s)) for s in plan.seeds}
        entry: dict[str, Any] = {"dataset": dataset.label, "rows": {}, "paper": dataset.paper}
        for row in ("retriever", "ranker", "llm_alone"):
            seeds = [s for s in plan.seeds if row in figures[s]]
            if not seeds:
                continue
            first = figures[seeds[0]][row]
            entry["rows"][row] = {
                "seeds": seeds,
                **{table: {c: _mean_std([figures[s][row][table][c] for s in seeds]) for c in COLUMNS}
                   for table in ("table1", "table3")},
                "per_seed": {str(s): {t: figures[s][row][t] for t in ("table1", "table3")} for s in seeds},
                "users": first["users"], "retrieved": [figures[s][row]["retrieved"] for s in seeds],
                **({"order": first["order"]} if "order" in first else {}),
            }
        ranked = [s for s in plan.seeds if "ranks" in figures[s]]
        if ranked:
            entry["paired"] = {"seeds": ranked, **_paired([figures[s]["ranks"] for s in ranked])}
        selected = selected_retriever(plan, dataset)
        if selected is not None:
            entry["retriever_settings"] = selected
        datasets.append(entry)
    return {"seeds": list(plan.seeds), "grid": plan.grid, "root": str(plan.root), "datasets": datasets,
            "cells": {c.name: cell_state(plan, c) for c in cells(plan)}}


ROW_LABELS = {"retriever": "LRURec, ours", "ranker": "ranker, ours", "llm_alone": "LLM order alone, ours"}
PAPER_LABELS = {"retriever": "LRURec (LlamaRec's paper)", "ranker": "LlamaRec (Llama-2-7B, paper)"}


def _cell(entry: dict) -> str:
    return f"{entry['mean']:.4f} ± {entry['std']:.4f}"


def markdown(tables: dict[str, Any]) -> str:
    lines = ["# LlamaRec's Tables 1 and 3, reproduced", "",
             f"Mean ± standard deviation over seeds {tables['seeds']} (sample std; one seed: ± 0). "
             f"Retriever: {'chosen by the grid on validation' if tables['grid'] else 'the config as given'}. "
             "Paper figures not recorded here are shown as -.", ""]
    heading = "| dataset | model | seeds | " + " | ".join(c.replace("ndcg", "N").replace("recall", "R").replace("mrr", "M")
                                                      for c in COLUMNS) + " |"
    for table, title in (("table1", "Table 1: all test users (a target the retriever missed is a miss)"),
                         ("table3", "Table 3: test users whose target is among the retriever's candidates")):
        lines += [f"## {title}", "", heading, "|---" * (len(COLUMNS) + 3) + "|"]
        for data in tables["datasets"]:
            for row in ("retriever", "ranker", "llm_alone"):
                paper = (data["paper"] or {}).get(table, {}).get(row)
                if paper:
                    lines.append(f"| {data['dataset']} | {PAPER_LABELS[row]} | | "
                                 + " | ".join("-" if paper[c] is None else f"{paper[c]:.4f}" for c in COLUMNS) + " |")
                if row in data["rows"]:
                    got = data["rows"][row]
                    label = ROW_LABELS[row] + (f" ({got['order']} order)" if row == "ranker" else "")
                    lines.append(f"| {data['dataset']} | {label} | {len(got['seeds'])} | "
                                 + " | ".join(_cell(got[table][c]) for c in COLUMNS) + " |")
        lines.append("")
    lines += ["## Ranker vs retriever, paired on users", ""]
    for data in tables["datasets"]:
        paired = data.get("paired")
        if not paired:
            lines.append(f"- {data['dataset']}: no ranker scored yet")
            continue
        parts = [f"{m.replace('ndcg', 'NDCG').replace('recall', 'Recall')} {p['diff']:+.4f} [{p['low']:+.4f}, {p['high']:+.4f}] "
                 f"(per seed: {', '.join(f'{d:+.4f}' for d in p['per_seed'])})" for m, p in paired.items() if m != "seeds"]
        lines.append(f"- {data['dataset']} (seeds {paired['seeds']}): " + "; ".join(parts))
    lines += ["", "Each user's difference (ranker's final order minus the retriever's order, same test users) is "
              "averaged over the seeds; the interval is the 95% percentile interval of its mean over users "
              "resampled with replacement (2,000 resamples).", ""]
    if any(d["dataset"] == "ml-latest-small" for d in tables["datasets"]):
        lines += [ML100K_NOTE, ""]
    settings = [f"- {d['dataset']}: " + ", ".join(f"{k} {v:g}" for k, v in d["retriever_settings"].items())
                for d in tables["datasets"] if "retriever_settings" in d]
    if settings:
        lines += ["Retriever settings the grid selected:", "", *settings, ""]
    waiting = [f"{name} ({state})" for name, state in tables["cells"].items() if state != "done"]
    lines += ["Cells not done: " + ", ".join(waiting) if waiting else "Every cell is done.", ""]
    return "\n".join(lines)


def write_tables(plan: Plan, copy_to: str | Path = "") -> dict[str, Any]:
    """<root>/tables.json and .md (and the same at copy_to, a .json path, when given)."""
    tables = collect(plan)
    for path in [plan.root / TABLES_FILE] + ([Path(copy_to)] if copy_to else []):
        write_json(path, tables)
        atomic_write_text(Path(path).with_suffix(".md"), markdown(tables))
    return tables
