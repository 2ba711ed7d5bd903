"""The doctor on rerank_dist runs: each check, with exactly its fault planted in a copy of the session's
finished tiny run, fails (or warns) while every other check keeps the verdict it gives on the
unplanted copy. The tiny run is re-scored on its first 64 test users once, so that a fault that
needs new scores (an untrained adapter) can be scored by the project's own scorer in seconds.

Faults are planted by editing files (the training log, the summary, the metrics, the adapter); no
model is trained here. Runs of other tools: tests/test_doctor_foreign.py.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from rerank_dist import pipeline
from rerank_dist.cli import main
from rerank_dist.settings import load_config
from rerank_dist.doctor import CHECK_IDS, DoctorOptions, Status, diagnose
from rerank_dist.io import read_json, write_json
from rerank_dist.paths import RunPaths

SUBSET_USERS = 64


def statuses(run: Path, model: bool = True) -> dict[str, Status]:
    report, _ = diagnose(run, DoctorOptions(model=model))
    return {r.id: r.status for r in report.results}


def changed(before: dict[str, Status], after: dict[str, Status]) -> dict[str, Status]:
    return {k: v for k, v in after.items() if before[k] != v}


def _rescore(run: Path, overrides: list[str]) -> None:
    cfg = load_config(overrides=[*overrides, f"run_dir={run}", f"score.max_users={SUBSET_USERS}"])
    pipeline.score(cfg, log=lambda m: None)


@pytest.fixture(scope="module")
def clean(trained_run, tmp_path_factory) -> tuple[Path, list[str], dict[str, Status]]:
    """The tiny run re-scored on 64 users, and the doctor's verdicts on it (with the model reloaded)."""
    run_dir, overrides = trained_run
    copy = tmp_path_factory.mktemp("doctor") / "run"
    shutil.copytree(run_dir, copy)
    _rescore(copy, overrides)
    return copy, overrides, statuses(copy)


@pytest.fixture
def planted(clean, tmp_path) -> tuple[Path, list[str]]:
    run, overrides, _ = clean
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy, overrides


def test_the_tiny_runs_records_and_weights_are_consistent(clean):
    """The baseline the faults are planted into: whatever concerns the saved weights and records passes;
    what fails is the tiny random model itself (a flat loss, scores no better than random)."""
    _, _, found = clean
    for check in ("best_weights_scored", "scores_reproduce", "adapter_not_noop", "candidate_counts", "metric_k",
                  "answer_balance", "negatives_match", "verbalizer", "loss_stable"):
        assert found[check] is Status.PASS, check


# ---------------------------------------------------------------- weights


def _best_step(run: Path) -> int:
    return read_json(RunPaths(run).ranker / "train_summary.json")["best_step"]


def plant_scores_from_another_step(run: Path, overrides: list[str]) -> None:
    """metrics_test.json names the last step as the scored one; validation chose another."""
    paths = RunPaths(run)
    last = max(int(p.name.split("-")[1]) for p in paths.ranker.glob("step-*"))
    write_json(paths.metrics("test"), {**read_json(paths.metrics("test")), "adapter_step": last})


def plant_weights_replaced_after_scoring(run: Path, overrides: list[str]) -> None:
    """best/ (and the best step's checkpoint, so that their hashes still agree) overwritten by another step's
    adapter after the scores were made."""
    paths = RunPaths(run)
    best = paths.step_dir(_best_step(run))
    other = next(p for p in paths.ranker.glob("step-*") if p.name != best.name)
    for target in (paths.best, best):
        shutil.copy2(other / "adapter_model.safetensors", target / "adapter_model.safetensors")


def plant_untrained_adapter(run: Path, overrides: list[str]) -> None:
    """LoRA B at its initial zeros in best/ and the best checkpoint, then scored by the project's scorer."""
    from safetensors.torch import load_file, save_file

    paths = RunPaths(run)
    for target in (paths.best, paths.step_dir(_best_step(run))):
        file = target / "adapter_model.safetensors"
        save_file({k: v * 0 if "lora_B" in k else v for k, v in load_file(file).items()}, file)
    _rescore(run, overrides)


def test_best_weights_scored_fails_when_the_scores_came_from_another_step_than_the_best(clean, planted):
    run, overrides = planted
    plant_scores_from_another_step(run, overrides)
    assert read_json(RunPaths(run).metrics("test"))["adapter_step"] != _best_step(run)
    assert changed(clean[2], statuses(run)) == {"best_weights_scored": Status.FAIL}


def test_scores_reproduce_fails_when_the_saved_weights_were_replaced_after_scoring(clean, planted):
    run, overrides = planted
    paths = RunPaths(run)
    before = (paths.best / "adapter_model.safetensors").read_bytes()
    plant_weights_replaced_after_scoring(run, overrides)
    after = (paths.best / "adapter_model.safetensors").read_bytes()
    assert after != before and after == (paths.step_dir(_best_step(run)) / "adapter_model.safetensors").read_bytes()
    assert changed(clean[2], statuses(run)) == {"scores_reproduce": Status.FAIL}


def test_adapter_not_noop_fails_when_an_untrained_adapter_was_saved_and_scored(clean, planted):
    from safetensors.torch import load_file

    run, overrides = planted
    plant_untrained_adapter(run, overrides)
    weights = load_file(RunPaths(run).best / "adapter_model.safetensors")
    assert all(not v.any() for k, v in weights.items() if "lora_B" in k)
    report, _ = diagnose(run, DoctorOptions())
    assert changed(clean[2], {r.id: r.status for r in report.results}) == {"adapter_not_noop": Status.FAIL}
    assert "scores move by up to 0 " in report.by_id()["adapter_not_noop"].value


# ---------------------------------------------------------------- the loss


def _write_log(run: Path, losses: np.ndarray, val: list[float]) -> None:
    """train_log.jsonl as the training loop writes it: a loss per step, a validation every 10."""
    lines = []
    for step, loss in enumerate(losses, start=1):
        lines.append({"step": step, "epoch": 0, "loss": float(loss), "lr": 1e-4, "grad_norm": 1.0})
        if step % 10 == 0:
            lines.append({"step": step, "event": "eval", "val_ndcg@10": val[step // 10 - 1],
                          "val_retriever_ndcg@10": 0.04, "best": True, "val_users": 16})
    (run / "ranker" / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


STEPS = np.arange(1, 41)
NOISE = np.random.default_rng(0).normal(scale=0.02, size=len(STEPS))
HEALTHY = 1.8 + 2.1 * np.exp(-STEPS / 8) + NOISE  # 3.7 -> 1.8: below ln(20) = 3.0, flattening out
IMPROVING = [0.05, 0.07, 0.08, 0.09]


@pytest.fixture(scope="module")
def healthy_log(clean, tmp_path_factory) -> tuple[Path, dict[str, Status]]:
    """The clean run with a training log of a ranker that learned (the tiny run's own log is flat)."""
    copy = tmp_path_factory.mktemp("healthy") / "run"
    shutil.copytree(clean[0], copy)
    _write_log(copy, HEALTHY, IMPROVING)
    return copy, statuses(copy, model=False)


def test_a_healthy_training_log_passes_every_loss_check(healthy_log):
    _, found = healthy_log
    for check in ("loss_falling", "loss_below_chance", "loss_stable", "val_vs_train", "capacity"):
        assert found[check] is Status.PASS, check


LOSS_FAULTS = {
    # a loss that never moves (below chance from the start: only "is it falling?" can catch it)
    "loss_falling": (2.2 + NOISE, IMPROVING, Status.FAIL),
    # falling all along, but never below chance: more steps or a higher learning rate
    "loss_below_chance": (3.9 - 0.8 * (STEPS - 1) / 39 + NOISE, IMPROVING, Status.FAIL),
    # an fp16 overflow
    "loss_stable": (np.where(STEPS == 25, math.nan, HEALTHY), IMPROVING, Status.FAIL),
    # validation NDCG falls while the training loss falls: overfitting
    "val_vs_train": (HEALTHY, [0.08, 0.06, 0.03, 0.02], Status.FAIL),
    # below chance, then stuck at 2.8: a 20-way ranker that learned a little and cannot learn more
    "capacity": (2.8 + 1.1 * np.exp(-STEPS / 4) + NOISE, IMPROVING, Status.WARN),
}


@pytest.mark.parametrize("check", sorted(LOSS_FAULTS))
def test_a_planted_loss_fault_trips_only_its_own_check(healthy_log, tmp_path, check):
    base, clean_found = healthy_log
    losses, val, expected = LOSS_FAULTS[check]
    run = tmp_path / "run"
    shutil.copytree(base, run)
    _write_log(run, losses, val)
    logged = [json.loads(line) for line in (run / "ranker" / "train_log.jsonl").read_text().splitlines()]
    curve = np.array([r["loss"] for r in logged if "loss" in r])
    vals = [r["val_ndcg@10"] for r in logged if r.get("event") == "eval"]
    chance = math.log(20)
    assert {  # the fault is in the log as planted
        "loss_falling": lambda: abs(curve[:8].mean() - curve[-8:].mean()) < 0.05 and curve.max() < chance,
        "loss_below_chance": lambda: curve.min() > chance and curve[-8:].mean() < curve[:8].mean() - 0.5,
        "loss_stable": lambda: np.isnan(curve).sum() == 1,
        "val_vs_train": lambda: vals[-1] < vals[0] / 2 and curve[-8:].mean() < curve[:8].mean(),
        "capacity": lambda: 0.85 * chance < curve[-10:].mean() < chance and np.ptp(curve[-20:]) < 0.15,
    }[check]()
    assert changed(clean_found, statuses(run, model=False)) == {check: expected}


# ---------------------------------------------------------------- data, metrics, letters, negatives, labels


def plant_fewer_val_candidates(run: Path, overrides: list[str]) -> None:
    """Validation (which chose best/) showed 10 candidates; test shows 20."""
    path = RunPaths(run).candidates("val")
    frame = pd.read_parquet(path)
    frame["candidates"] = [list(c)[:10] for c in frame["candidates"]]
    frame.to_parquet(path, index=False)


def plant_recall_at_20(run: Path, overrides: list[str]) -> None:
    """Recall@20 reported over 20 candidates, unmarked."""
    paths = RunPaths(run)
    metrics = read_json(paths.metrics("test"))
    metrics["reranker"]["all_users"]["recall@20"] = metrics["reranker"]["retrieval_rate"]
    write_json(paths.metrics("test"), metrics)


def plant_answers_mostly_a(run: Path, overrides: list[str]) -> None:
    """The training summary records 20 of the 24 answers as "A"."""
    path = RunPaths(run).ranker / "train_summary.json"
    summary = read_json(path)
    counts = {label: 0 for label in summary["train_prompt_stats"]["label_counts"]}
    counts.update(A=20, B=1, C=1, D=1, E=1)
    summary["train_prompt_stats"]["label_counts"] = counts
    write_json(path, summary)


def plant_random_negatives(run: Path, overrides: list[str]) -> None:
    """The run as if trained with prompt.negatives=random (LlamaRec's choice): config and summary say so, and
    the training examples rebuilt from them hold random catalogue items."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["prompt"]["negatives"] = "random"
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    rebuild_examples_store(run)
    path = RunPaths(run).ranker / "train_summary.json"
    summary = read_json(path)
    summary["train_prompt_stats"].update(negatives="random", target_insertion_rate=None)
    write_json(path, summary)


def rebuild_examples_store(run: Path) -> None:
    """The run's examples store made again from its (changed) config.yaml, as its train stage would."""
    from rerank_dist import example_store
    from rerank_dist.config import labels_for
    from rerank_dist.settings import load_config
    from rerank_dist.data.prepare import load_dataset
    from rerank_dist.modeling import load_tokenizer
    from tests.test_example_store import build_all

    cfg = load_config(run / "config.yaml", [f"run_dir={run}"], world_size=1)
    shutil.rmtree(example_store.default_dir(cfg))
    source = example_store.StoreSource(load_dataset(RunPaths(run).data), RunPaths(run).candidates("train"),
                                       cfg.retriever.train_prefixes_per_user)
    build_all(cfg, source, load_tokenizer(cfg.model), labels=labels_for(cfg))


def plant_label_ids_off_by_one(run: Path, overrides: list[str]) -> None:
    """Training targeted each letter's neighbour's id; the scorer reads the right ones."""
    path = RunPaths(run).ranker / "train_summary.json"
    summary = read_json(path)
    scored = read_json(RunPaths(run).best / "verbalizer.json")["label_ids"]
    summary["verbalizer"]["label_ids"] = [i + 1 for i in scored]
    write_json(path, summary)


def test_candidate_counts_fails_when_validation_shows_fewer_candidates_than_test(clean, planted):
    run, overrides = planted
    plant_fewer_val_candidates(run, overrides)
    assert {len(c) for c in pd.read_parquet(RunPaths(run).candidates("val"))["candidates"]} == {10}
    assert {len(c) for c in pd.read_parquet(RunPaths(run).rankings("test"))["candidates"]} == {20}
    assert changed(clean[2], statuses(run)) == {"candidate_counts": Status.FAIL}


def test_metric_k_fails_on_recall_at_20_over_20_candidates(clean, planted):
    run, overrides = planted
    plant_recall_at_20(run, overrides)
    reranker = read_json(RunPaths(run).metrics("test"))["reranker"]
    assert reranker["num_candidates"] == 20 and "recall@20" in reranker["all_users"]
    assert "recall@20" not in reranker["ranking_blind"]
    report, _ = diagnose(run, DoctorOptions())
    assert changed(clean[2], {r.id: r.status for r in report.results}) == {"metric_k": Status.FAIL}
    assert "recall@20 over 20 candidates" in report.by_id()["metric_k"].value


def test_answer_balance_fails_when_most_training_answers_are_a(clean, planted):
    run, overrides = planted
    plant_answers_mostly_a(run, overrides)
    summary = read_json(RunPaths(run).ranker / "train_summary.json")
    counts = summary["train_prompt_stats"]["label_counts"]
    assert sum(counts.values()) == summary["examples"] and counts["A"] / summary["examples"] > 0.8
    assert changed(clean[2], statuses(run)) == {"answer_balance": Status.FAIL}


def test_answers_mostly_a_are_expected_when_training_showed_the_retriever_order(clean, planted):
    """The same answers as above, from a run trained on the retriever's order (prompt.train_order=retriever):
    the letter is then the retriever's rank of the target, so 'A' most often is what that protocol gives."""
    run, overrides = planted
    plant_answers_mostly_a(run, overrides)
    path = RunPaths(run).ranker / "train_summary.json"
    summary = read_json(path)
    summary["train_prompt_stats"].update(order="retriever", shuffled=False)
    write_json(path, summary)
    report, ev = diagnose(run, DoctorOptions())
    assert ev.protocol.train_order == "retriever" and "train_summary.json" in ev.protocol.source
    assert changed(clean[2], {r.id: r.status for r in report.results}) == {}
    assert "expected with train_order=retriever" in report.by_id()["answer_balance"].value


def test_the_final_order_and_the_protocol_are_read_from_the_run(clean):
    run, _, _ = clean
    paths = RunPaths(run)
    metrics = read_json(paths.metrics("test"))
    frame = pd.read_parquet(paths.rankings("test"))
    _, ev = diagnose(run, DoctorOptions(model=False))
    assert ev.rankings.final_order == metrics.get("final_order", "reranker")
    if ev.rankings.final_order != "reranker":  # judged against the retriever: the ranks the rankings file shows
        assert ev.rankings.final_rank.tolist() == frame["target_rank"].tolist()
    assert ev.protocol is not None and ev.protocol.eval_order in ("shuffled", "retriever")
    for key in ("train_order", "eval_order"):
        if key in metrics.get("protocol", {}):
            assert getattr(ev.protocol, key) == metrics["protocol"][key]


def test_negatives_match_fails_when_training_negatives_are_random(clean, planted):
    run, overrides = planted
    plant_random_negatives(run, overrides)
    report, ev = diagnose(run, DoctorOptions())
    train_pop = np.median([ev.popularity.get(i, 0) for i in ev.training.negative_items])
    test_pop = np.median([ev.popularity.get(i, 0) for items in ev.rankings.candidate_items for i in items])
    assert train_pop < test_pop / 4  # catalogue items (mostly long-tail) against what the retriever proposes
    assert changed(clean[2], {r.id: r.status for r in report.results}) == {"negatives_match": Status.FAIL}


def test_verbalizer_fails_when_training_targeted_other_ids_than_the_scorer_reads(clean, planted):
    run, overrides = planted
    plant_label_ids_off_by_one(run, overrides)
    trained = read_json(RunPaths(run).ranker / "train_summary.json")["verbalizer"]["label_ids"]
    assert trained != read_json(RunPaths(run).best / "verbalizer.json")["label_ids"]
    assert changed(clean[2], statuses(run)) == {"verbalizer": Status.FAIL}


# The faults above, by the check each must trip and how.
OWN_RUN_PLANTS = {
    "best_weights_scored": (plant_scores_from_another_step, Status.FAIL),
    "scores_reproduce": (plant_weights_replaced_after_scoring, Status.FAIL),
    "adapter_not_noop": (plant_untrained_adapter, Status.FAIL),
    "candidate_counts": (plant_fewer_val_candidates, Status.FAIL),
    "metric_k": (plant_recall_at_20, Status.FAIL),
    "answer_balance": (plant_answers_mostly_a, Status.FAIL),
    "negatives_match": (plant_random_negatives, Status.FAIL),
    "verbalizer": (plant_label_ids_off_by_one, Status.FAIL),
}


# ---------------------------------------------------------------- the command and the pipeline


def test_doctor_command_prints_one_line_per_check_and_writes_its_files(clean, planted, capsys):
    run, _ = planted
    code = main(["doctor", str(run)])
    out = capsys.readouterr().out.splitlines()
    table = [line for line in out if line[:4] in ("PASS", "WARN", "FAIL", "SKIP")]
    assert [line.split()[1] for line in table] == CHECK_IDS
    assert all("fix: " in line for line in table if line.startswith(("FAIL", "WARN")))
    data = read_json(run / "doctor.json")
    assert code == data["exit_code"] == 2 and data["inputs_fingerprint"]  # the tiny model fails its ranking checks
    assert {"doctor.md", "doctor.json", "doctor_loss.png", "doctor_letters.png"} <= {p.name for p in run.iterdir()}
    assert not list(run.rglob("*.tmp"))


def test_missing_inputs_are_skipped_with_what_they_need(clean, planted):
    run, _ = planted
    paths = RunPaths(run)
    for gone in (paths.train_log, paths.ranker / "train_summary.json", paths.rankings("test")):
        gone.unlink()
    report, _ = diagnose(run, DoctorOptions())
    skipped = {r.id: r.value for r in report.results if r.status is Status.SKIP}
    assert {"loss_falling", "scores_reproduce", "predicted_letters", "reranker_vs_baselines"} <= set(skipped)
    assert "train_log.jsonl" in skipped["loss_falling"] and "rankings_test.parquet" in skipped["predicted_letters"]


def test_run_ends_with_the_doctor_and_the_report_carries_its_verdict(trained_run):
    run_dir, _ = trained_run
    data = read_json(run_dir / "doctor.json")
    assert data["kind"] == "rerank_dist" and len(data["checks"]) == len(CHECK_IDS)
    report = (run_dir / "report.md").read_text()
    assert f"Doctor: **{data['verdict']}**" in report
    assert all(f"`{c['id']}`" in report for c in data["checks"] if c["status"] in ("fail", "warn"))


def test_a_doctor_that_cannot_finish_leaves_the_run_and_its_report(clean, planted, monkeypatch):
    from rerank_dist.doctor import runner

    run, overrides = planted
    before = (run / "report.md").read_text()

    def broken(*args, **kwargs):
        raise RuntimeError("backbone gone")

    monkeypatch.setattr(runner, "run_doctor", broken)
    said: list[str] = []
    cfg = load_config(overrides=[*overrides, f"run_dir={run}"])
    assert pipeline.doctor(cfg, said.append) is None
    assert any("could not finish (RuntimeError: backbone gone)" in line for line in said)
    assert (run / "report.md").read_text() == before


def test_capacity_names_adapters_limited_to_the_last_layers():
    from rerank_dist.doctor import checks
    from rerank_dist.doctor.evidence import CapacityFacts, Curve, Evidence, VerbalizerFacts

    steps = np.arange(1, 41)
    plateau = Curve(steps, 2.8 + 1.1 * np.exp(-steps / 4), "train loss", "log")  # stuck below ln 20
    for layers, named in ((list(range(20, 30)), True), (None, False)):
        ev = Evidence(kind="rerank_dist", root=Path("."), loss=plateau)
        ev.verbalizer = VerbalizerFacts(labels=list("ABCDEFGHIJKLMNOPQRST"))
        ev.capacity = CapacityFacts(model="m", parameters=135_000_000, lora_r=8, lora_targets=["q_proj"],
                                    examples_seen=448, lora_layers=layers)
        result = checks.capacity(ev)
        assert result.status is Status.WARN
        assert ("in layers 20-29 only" in result.value) is named
        assert ("model.lora_layers: 0" in result.fix) is named


def test_the_loss_reader_reports_a_cut_last_line_and_refuses_a_damaged_one(tmp_path):
    """A last line cut by a killed run is left out with a note; a damaged line before it makes the loss
    evidence missing, naming the file and line (it is not skipped in silence)."""
    from rerank_dist.doctor.evidence import Evidence
    from rerank_dist.doctor.readers.own_run import _loss

    paths = RunPaths(tmp_path)
    paths.ranker.mkdir(parents=True)
    full = [json.dumps({"step": s, "loss": 3.0 - s / 10}) for s in (1, 2, 3)]
    paths.train_log.write_text("\n".join(full) + '\n{"step": 4, "lo')
    said: list[str] = []
    ev = Evidence(kind="rerank_dist", root=tmp_path)
    _loss(ev, paths, said.append)
    assert ev.loss is not None and list(ev.loss.steps) == [1, 2, 3]
    assert any("line 4" in m and "cut" in m for m in said), said

    paths.train_log.write_text("\n".join([full[0], '{"step": 2, "lo', full[2]]) + "\n")
    with pytest.raises(ValueError):  # precondition: line 2 is damaged and not the last
        json.loads(paths.train_log.read_text().splitlines()[1])
    ev = Evidence(kind="rerank_dist", root=tmp_path)
    _loss(ev, paths, said.append)
    assert ev.loss is None
    assert str(paths.train_log) in ev.missing["loss"] and "line 2" in ev.missing["loss"], ev.missing


def test_a_run_without_training_candidates_is_read(trained_run, tmp_path):
    """retriever.train_candidates=none makes no candidates_train.parquet: the doctor reads the run, says why
    the training lists cannot be read back, and names the setting next to the declared random negatives."""
    from rerank_dist.doctor.readers.own_run import OwnRunOptions, read_own_run

    run_dir, overrides = trained_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["prompt"]["negatives"] = "random"
    config["retriever"]["train_candidates"] = "none"
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    summary_path = RunPaths(run).ranker / "train_summary.json"
    summary = read_json(summary_path)
    summary["train_prompt_stats"].update(negatives="random", target_insertion_rate=None)
    write_json(summary_path, summary)
    RunPaths(run).candidates("train").unlink()
    shutil.rmtree(run / "examples", ignore_errors=True)  # a stored copy of the training lists would be read instead
    ev = read_own_run(run, OwnRunOptions(model=False))
    assert "config" not in ev.missing  # precondition: the edited config still validates
    assert "train_candidates=none" in ev.training.candidate_source_note
    assert ev.training.negatives_declared == "random"
    assert "candidates_train.parquet is not made with retriever.train_candidates=none" in ev.missing["negatives"]
    assert set(ev.split_k) >= {"val", "test"}  # the other splits' counts are still read
