"""Stages and their order: prepare -> retrieve -> train -> score -> export -> report (-> doctor, in `run`).

Each stage reads the previous stage's files in the run directory and writes its own. A stage whose
outputs exist for the same inputs is skipped, so a rerun after a crash continues where it stopped.
A stage's inputs are the config sections it depends on (less the fields that only say where
caches live or how often to save), the key of the stage before it (so a stage that is redone makes
every later one redo too) and, for data.source=local, the raw files' contents.

Every stage that writes the run directory holds its writer's lock while it runs (``run_lock.py``):
a second writer on the same directory is refused, naming the first; ``run`` holds it once for all
its stages.

``run`` redoes whatever its config changed, in order. A stage run on its own never does that: it
reads what earlier stages wrote, so it refuses to start when those outputs were made with other
settings, naming each field and both values (``check_upstream``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

from rerank_dist.config import ConfigError, RunConfig, save_config
from rerank_dist.distributed import process_state
from rerank_dist.io import read_json, write_json
from rerank_dist.paths import RunPaths, cache_dir
from rerank_dist.run_lock import writer_lock

# The config sections each stage's output depends on.
STAGE_INPUTS = {
    "prepare": ("data",),
    "retrieve": ("data", "retriever"),
    "train": ("data", "retriever", "prompt", "model", "train"),
    "score": ("score",),
}
UPSTREAM = {"prepare": None, "retrieve": "prepare", "train": "retrieve", "score": "train"}
# Fields that say where things are kept or how a run is watched, not what its outputs are.
ENVIRONMENT_FIELDS = {"data.download_dir", "model.cache_dir", "model.gguf_fallback", "train.resume",
                      "train.report_to", "train.examples_dir"}
MARKER = "stage.json"
# Train fields that only say how long to run, how often to checkpoint and how to validate: changing
# them continues the same training run (resume), any other change starts a new one.
RUN_LENGTH_FIELDS = {"epochs", "max_steps", "max_minutes", "save_every", "save_every_minutes", "keep_last", "patience",
                     "eval_every", "eval_users", "resume", "report_to"}
RANKER_INPUTS = "inputs.json"


def _stage_dir(cfg: RunConfig, stage: str) -> Path:
    paths = RunPaths(Path(cfg.run_dir))
    return {"prepare": paths.data, "retrieve": paths.retriever, "train": paths.ranker, "score": paths.root / "scores"}[stage]


def _inputs(cfg: RunConfig, stage: str) -> dict[str, Any]:
    """The settings a stage's outputs are made from: {"section.field": value}."""
    flat = {}
    for section in STAGE_INPUTS[stage]:
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            if f"{section}.{key}" not in ENVIRONMENT_FIELDS:
                flat[f"{section}.{key}"] = value
    return flat


def _recorded(cfg: RunConfig, stage: str) -> dict[str, Any]:
    marker = _stage_dir(cfg, stage) / MARKER
    return read_json(marker) if marker.is_file() else {}


def recorded_key(cfg: RunConfig, stage: str) -> str:
    """The key a finished stage recorded, or "not run"."""
    return _recorded(cfg, stage).get("key", "not run")


def _stage_key(cfg: RunConfig, stage: str) -> str:
    """What a stage's outputs were made from (see the module docstring), as one hash."""
    parts = [json.dumps(_inputs(cfg, stage), sort_keys=True)]
    upstream = UPSTREAM[stage]
    if upstream is not None:
        parts.append(recorded_key(cfg, upstream))
    if stage == "prepare" and cfg.data.source == "local":
        from rerank_dist.data.sources import local_fingerprint

        parts.append(local_fingerprint(cfg.data))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def stage_done(cfg: RunConfig, stage: str) -> bool:
    """True when the stage's outputs exist for these settings (its recorded key is this config's)."""
    return recorded_key(cfg, stage) == _stage_key(cfg, stage)


def _mark(cfg: RunConfig, stage: str, seconds: float) -> None:
    write_json(_stage_dir(cfg, stage) / MARKER, {"stage": stage, "key": _stage_key(cfg, stage),
                                                 "seconds": round(seconds, 1), "inputs": _inputs(cfg, stage)})


def check_upstream(cfg: RunConfig, stage: str) -> None:
    """Refuse to run `stage` alone on outputs that earlier stages made with other settings.

    Raises ConfigError with one line per differing field (the earlier stage's value and this
    command's) and how to redo it; outputs that do not exist yet are left to the stage's own
    "run X first" errors.
    """
    needs = {"retrieve": "prepare", "train": "retrieve", "score": "train", "export": "train", "report": "train"}
    upstream = needs.get(stage)
    problems: list[str] = []
    while upstream is not None:
        recorded = _recorded(cfg, upstream)
        if recorded and recorded.get("key") != _stage_key(cfg, upstream):
            where = _stage_dir(cfg, upstream)
            before = recorded.get("inputs", {})
            diff = [f"{field}: {where} was made with {before[field]!r}, this command asks for {value!r}"
                    for field, value in _inputs(cfg, upstream).items() if field in before and before[field] != value]
            problems.extend(diff or [f"{where}: made from other inputs (an earlier stage or the raw data changed since)"])
        upstream = UPSTREAM[upstream]
    if problems:
        redo = "run `rerank-dist run` with these settings to redo the stages they change, or drop the override"
        raise ConfigError("\n".join(f"{p}; {redo}" for p in reversed(problems)))


def _writes_run_dir(stage: str) -> Callable:
    """Run the stage holding the run directory's writer's lock (main process; re-entrant under `run`)."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def locked(cfg: RunConfig, log: Callable[[str], None] = print) -> Any:
            with writer_lock(cfg.run_dir, stage, say=log):
                return fn(cfg, log)
        return locked
    return wrap


def _record_config(cfg: RunConfig) -> None:
    """The run directory's config.yaml: what a later stage on this run starts from."""
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    save_config(cfg, Path(cfg.run_dir) / "config.yaml")


@_writes_run_dir("prepare")
def prepare(cfg: RunConfig, log: Callable[[str], None] = print) -> dict:
    from rerank_dist.data.prepare import prepare_data

    paths = RunPaths(Path(cfg.run_dir))
    if stage_done(cfg, "prepare"):
        log(f"[prepare] up to date: {paths.data}")
        return read_json(paths.data / "meta.json")
    started = time.time()
    _record_config(cfg)
    log(f"[prepare] {cfg.data.dataset} from {cfg.data.source} -> {paths.data}")
    meta = prepare_data(cfg.data, paths.data, cache_dir(cfg.model.cache_dir), log=log)
    _mark(cfg, "prepare", time.time() - started)
    return meta


@_writes_run_dir("retrieve")
def retrieve(cfg: RunConfig, log: Callable[[str], None] = print) -> dict:
    """On every process of the job: the main one trains the retriever, all of them make candidates
    (rerank_dist.retrieval.stage). Returns the test metrics (on the main process; {} elsewhere when
    the stage ran)."""
    from rerank_dist.data.prepare import load_dataset
    from rerank_dist.distributed import ProcessShares, main_decides
    from rerank_dist.retrieval.stage import run_retriever_stage

    paths = RunPaths(Path(cfg.run_dir))
    check_upstream(cfg, "retrieve")
    state = process_state()
    # One decision for all: a process that skipped while another ran would leave it waiting in a collective.
    if main_decides(state, stage_done(cfg, "retrieve")):
        log(f"[retrieve] up to date: {paths.retriever}")
        return read_json(paths.retriever / "metrics_test.json")
    started = time.time()
    if state.is_main_process:
        _record_config(cfg)
    log(f"[retrieve] training LRURec (budget {cfg.retriever.max_minutes} min) on the main process, candidates on "
        f"{state.num_processes} process(es) -> {paths.retriever}")
    metrics = run_retriever_stage(cfg.retriever, load_dataset(paths.data), paths.retriever, log=log,
                                  device=state.device, workers=ProcessShares(state))
    if state.is_main_process:
        _mark(cfg, "retrieve", time.time() - started)
    state.wait_for_everyone()  # the next stage reads the candidates on every process
    return metrics


def _training_run_key(cfg: RunConfig) -> str:
    """What makes two trainings the same run that one may resume: the retriever's candidates and
    every setting except RUN_LENGTH_FIELDS."""
    payload = {"retrieve": recorded_key(cfg, "retrieve"),
               **{k: v for k, v in _inputs(cfg, "train").items()
                  if not (k.startswith("train.") and k.split(".", 1)[1] in RUN_LENGTH_FIELDS)}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _set_aside_other_run(cfg: RunConfig, log: Callable[[str], None]) -> None:
    """Outputs in ranker/ from a training with other inputs must not be resumed (that would quietly
    continue the old run): move them to ranker.replaced-<time>/ and record this run's inputs."""
    paths = RunPaths(Path(cfg.run_dir))
    key = _training_run_key(cfg)
    inputs = paths.ranker / RANKER_INPUTS
    if paths.ranker.is_dir() and any(paths.ranker.iterdir()):
        if inputs.is_file() and read_json(inputs).get("key") == key:
            return
        moved = paths.root / f"ranker.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        paths.ranker.rename(moved)
        log(f"[train] {paths.ranker} held a training with other inputs; moved it to {moved}, starting afresh")
    write_json(inputs, {"key": key})


@_writes_run_dir("train")
def train(cfg: RunConfig, log: Callable[[str], None] = print) -> dict:
    from rerank_dist.train import train as train_loop

    paths = RunPaths(Path(cfg.run_dir))
    check_upstream(cfg, "train")
    if stage_done(cfg, "train") and (paths.best / "adapter_model.safetensors").is_file():
        log(f"[train] up to date: {paths.best}")
        return read_json(paths.ranker / "train_summary.json")
    state = process_state()
    if state.is_main_process:
        _set_aside_other_run(cfg, log)
        _record_config(cfg)
    state.wait_for_everyone()
    started = time.time()
    # The examples store is named by what it is built from: the candidates (or, with no training
    # candidates, the prepared data).
    upstream = "retrieve" if cfg.retriever.train_candidates != "none" else "prepare"
    summary = train_loop(cfg, recorded_key(cfg, upstream))
    if state.is_main_process:
        _mark(cfg, "train", time.time() - started)
    state.wait_for_everyone()
    return summary


@_writes_run_dir("score")
def score(cfg: RunConfig, log: Callable[[str], None] = print) -> dict[str, dict]:
    from rerank_dist.score import score_split

    check_upstream(cfg, "score")
    results = {}
    started = time.time()
    for split in cfg.score.splits:
        log(f"[score] {split}: reloading {RunPaths(Path(cfg.run_dir)).best} from disk")
        results[split] = score_split(cfg, split)
    if process_state().is_main_process:
        # Recorded, not acted on: scoring always scores again; `rerank-dist tables` reads it to skip a
        # run whose scores are those of its adapter.
        _mark(cfg, "score", time.time() - started)
    return results


@_writes_run_dir("export")
def export(cfg: RunConfig, log: Callable[[str], None] = print) -> dict:
    """export/adapter (PEFT) and export/merged (sharded safetensors), written by the main process."""
    from rerank_dist.export import export_run

    check_upstream(cfg, "export")
    state = process_state()
    manifest: dict = {}
    if state.is_main_process:
        log(f"[export] {RunPaths(Path(cfg.run_dir)).export}")
        manifest = export_run(cfg, log)
    state.wait_for_everyone()
    return manifest


@_writes_run_dir("report")
def report(cfg: RunConfig, log: Callable[[str], None] = print) -> str:
    from rerank_dist.report import write_report

    check_upstream(cfg, "report")
    text = write_report(cfg)
    log(text)
    return text


def doctor(cfg: RunConfig, log: Callable[[str], None] = print) -> Any:
    """The doctor on this run's outputs (doctor.md, doctor.json, PNGs), its summary then added to report.md.

    Never raises: every output of the run is complete before it starts, and a doctor that cannot
    finish (a backbone that no longer loads, say) must not turn a finished run into a failed one.
    Returns the DoctorReport, or None when it could not finish.
    """
    from rerank_dist.doctor import DoctorOptions, run_doctor
    from rerank_dist.report import write_report

    try:
        result = run_doctor(Path(cfg.run_dir), DoctorOptions(), say=log, cfg=cfg)
    except Exception as err:
        log(f"[doctor] could not finish ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            f"the run's outputs and report.md are unaffected")
        return None
    write_report(cfg)  # report.md again, now with the doctor's summary
    log(f"[doctor] verdict: {result.verdict}; details in {Path(cfg.run_dir) / 'doctor.md'} "
        f"(`rerank-dist doctor {cfg.run_dir}` exits 0/1/2 on pass/warnings/failures)")
    return result


@_writes_run_dir("run")
def run_all(cfg: RunConfig, log: Callable[[str], None] = print) -> None:
    """Every stage in order. Launched as several processes, the data is prepared on the main process
    first (the others then find it done); the retriever trains on the main process and every process
    makes its share of the candidates; training and scoring use every process."""
    state = process_state()
    started = time.time()
    if state.is_main_process:
        _record_config(cfg)
    with state.main_process_first():
        prepare(cfg, log)
    retrieve(cfg, log)
    train(cfg, log)
    score(cfg, log)
    if cfg.export.in_run:
        export(cfg, log)
    if state.is_main_process:
        report(cfg, log)
        doctor(cfg, log)  # after the report is on disk: whatever the doctor finds, the run's outputs stay
        log(f"[run] finished in {(time.time() - started) / 60:.1f} min; outputs in {cfg.run_dir}")


def retriever_grid(cfg: RunConfig, log: Callable[[str], None] = print, space: dict | None = None,
                   seeds: tuple[int, ...] = (0, 1, 2), grid_seed: int = 0, copy_to: str = "") -> dict | None:
    """The retriever's grid (rerank_dist.retrieval.grid) on this run's data, in <run_dir>/retriever_grid.

    Launched as several processes, each trains its share of the configurations (one at a time, on
    its own threads); they meet at a barrier before the selection and before the summary. The
    summary (grid.json, .md, .png) is also written to copy_to (a .json path) when given.
    Returns the summary on the main process, None on the others.
    """
    with writer_lock(cfg.run_dir, "grid", say=log):  # a second grid on this run would race on its results
        return _retriever_grid(cfg, log, space, seeds, grid_seed, copy_to)


def _retriever_grid(cfg: RunConfig, log: Callable[[str], None], space: dict | None, seeds: tuple[int, ...],
                    grid_seed: int, copy_to: str) -> dict | None:
    from rerank_dist.data.prepare import load_dataset
    from rerank_dist.distributed import ProcessShares
    from rerank_dist.retrieval.grid import GRID, Workers, run_grid, write_outputs

    state = process_state()
    with state.main_process_first():
        if state.is_main_process:
            prepare(cfg, log)
    shares = ProcessShares(state)
    workers = Workers(state.process_index, state.num_processes, shares.wait_for_everyone)
    paths = RunPaths(Path(cfg.run_dir))
    summary = run_grid(cfg.retriever, load_dataset(paths.data), paths.root / "retriever_grid", space or GRID,
                       grid_seed, seeds, workers=workers, log=log, name=cfg.data.dataset)
    if summary is not None:
        best = summary["best"]
        log(f"[grid] selected weight_decay {best['config']['weight_decay']:g}, dropout {best['config']['dropout']:g} "
            f"on validation; test over seeds {best['seeds']}: ndcg@10 {best['test']['ndcg@10']:.4f} "
            f"recall@10 {best['test']['recall@10']:.4f} -> {paths.root / 'retriever_grid' / 'grid.json'}")
        if copy_to:
            write_outputs(summary, Path(copy_to))
            log(f"[grid] also written to {copy_to} (+ .md, .png)")
    return summary
