"""report.md from a metrics file: the schema with the final order, paired intervals, protocol and fusion,
and older files that have none of these (they must keep rendering)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from rerank_dist.io import write_json
from rerank_dist.metrics import paired_comparison, ranking_report
from rerank_dist.paths import RunPaths
from rerank_dist.report import write_report

USERS, K = 400, 20


def _orders() -> dict[str, np.ndarray]:
    """Target ranks (U,) of four orders on the same users: ~20% retrieved, fused best, random worst."""
    rng = np.random.default_rng(0)
    present = rng.random(USERS) < 0.2
    retriever = np.where(present, rng.integers(0, K, USERS), -1)
    llm = np.where(present, np.maximum(retriever - rng.integers(0, 3, USERS), 0), -1)
    fused = np.where(present, np.maximum(llm - 2, 0), -1)
    rand = np.where(present, rng.integers(0, K, USERS), -1)
    return {"reranker": llm, "fused": fused, "retriever_order": retriever, "random_order": rand}


def _old_metrics(ranks: dict[str, np.ndarray]) -> dict:
    """A metrics file as score.py wrote it before final orders: three reports, NDCG/MRR@K>=N over-flagged."""
    out = {name: ranking_report(ranks[name], K, (1, 5, 10, 20)) for name in ("reranker", "retriever_order",
                                                                            "random_order")}
    out["reranker"]["ranking_blind"] = ["recall@20", "ndcg@20", "mrr@20"]
    out.update(split="test", scored_all_users=True, prompt_stats={}, seconds=1.0)
    return out


def _new_metrics(ranks: dict[str, np.ndarray]) -> dict:
    out = _old_metrics(ranks)
    out["reranker"]["ranking_blind"] = ["recall@20"]
    out["fused"] = ranking_report(ranks["fused"], K, (1, 5, 10, 20))
    out["final_order"] = "fused"
    out["protocol"] = {"train_order": "shuffled", "eval_order": "retriever", "negatives": "retriever",
                       "permutations": 1}
    out["fusion"] = {"weight": 0.3, "chosen_on": "val", "objective": "ndcg@10", "val_users": 127,
                     "grid": {"0.0": 0.061, "0.3": 0.0702, "1.0": 0.065}, "normalisation": "z-score per user"}
    pairs = [("fused", "retriever_order"), ("reranker", "random_order"), ("reranker", "retriever_order")]
    out["paired"] = {f"{a}_vs_{b}": paired_comparison(ranks[a], ranks[b], resamples=500) for a, b in pairs}
    return out


def _render(tmp_path: Path, metrics: dict) -> str:
    run = tmp_path / "run"
    run.mkdir()
    write_json(RunPaths(run).metrics("test"), metrics)
    text = write_report(SimpleNamespace(run_dir=str(run)))
    assert (run / "report.md").read_text() == text
    return text


def _row(text: str, label: str) -> list[str]:
    """The first table row whose order cell starts with label: its cells."""
    row = next(line for line in text.splitlines() if line.startswith(f"| {label}"))
    return [c.strip() for c in row.strip("|").split("|")]


def test_an_older_metrics_file_renders_as_before(tmp_path):
    ranks = _orders()
    text = _render(tmp_path, _old_metrics(ranks))
    assert "random order" in text and "retriever order" in text
    assert _row(text, "LLM order (pure)")[0] == "LLM order (pure) **(final)**"  # the only LLM order is the final
    assert "fused" not in text and "Protocol:" not in text and "Fusion:" not in text and "Paired" not in text
    # over-flagged NDCG/MRR@20 of older files are not repeated: only Recall@20 is blind over 20 candidates
    assert "Cannot reflect ranking (K >= 20 candidates): recall@20\n" in text
    verdict = [line for line in text.splitlines() if line.startswith("Verdict:")]
    assert len(verdict) == 2 and "no paired interval in this file" in verdict[0]
    assert verdict[0].startswith("Verdict: final order (LLM order (pure)) vs retriever order: NDCG@10 ")
    assert "Doctor: not run yet" in text


def test_the_final_order_paired_intervals_protocol_and_fusion_are_rendered(tmp_path):
    ranks = _orders()
    metrics = _new_metrics(ranks)
    text = _render(tmp_path, metrics)
    labels = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")
              and not line.startswith("| order")]
    assert labels[:4] == ["random order", "retriever order", "LLM order (pure)",
                          "fused LLM + retriever (w 0.3) **(final)**"]
    assert len(labels) == 8  # all users and the retrieved subset
    assert _row(text, "fused")[5] == f"{metrics['fused']['all_users']['ndcg@10']:.4f}"
    assert ("Protocol: training order shuffled, evaluation order retriever, negatives retriever, "
            "candidate permutations 1") in text
    fusion = next(line for line in text.splitlines() if line.startswith("Fusion:"))
    assert "w = 0.3" in fusion and "val, 127 users" in fusion and "z-score per user" in fusion
    assert "NDCG@10 by weight 0: 0.0610, 0.3: 0.0702, 1: 0.0650" in fusion
    entry = metrics["paired"]["fused_vs_retriever_order"]["ndcg@10"]
    shown = f"NDCG@10 {entry['diff']:+.4f} [{entry['low']:+.4f}, {entry['high']:+.4f}]"
    assert f"- fused LLM + retriever (w 0.3) - retriever order: {shown}, Recall@5 " in text
    assert "- LLM order (pure) - random order: NDCG@10 " in text
    assert "Cannot reflect ranking (K >= 20 candidates): recall@20\n" in text
    verdict = [line for line in text.splitlines() if line.startswith("Verdict:")]
    assert verdict[0].startswith(f"Verdict: final order (fused LLM + retriever (w 0.3)) vs retriever order: {shown} (")
    assert "Recall@5" in verdict[0] and verdict[1].startswith("Verdict: LLM order (pure) vs random order: NDCG@10 ")
    assert "no paired interval" not in text
    assert re.search(r"NDCG@10 [+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\] \((better|worse|not distinguishable)\)",
                     verdict[1])


@pytest.mark.parametrize("missing", ["paired", "protocol", "fusion", "final_order"])
def test_each_new_key_is_optional(tmp_path, missing):
    metrics = _new_metrics(_orders())
    del metrics[missing]
    text = _render(tmp_path, metrics)
    assert "Verdict: final order" in text
    if missing == "final_order":  # the default is the LLM's own order, even when a fused row is present
        assert "LLM order (pure) **(final)**" in text and "(not the final order" in text


def test_a_permuted_final_order_is_labelled_with_its_permutations(tmp_path):
    ranks = _orders()
    metrics = _new_metrics(ranks)
    for key in ("fused", "fusion"):
        del metrics[key]
    metrics["permuted"] = ranking_report(ranks["fused"], K, (1, 5, 10, 20))
    metrics["final_order"] = "permuted"
    metrics["protocol"]["permutations"] = 4
    metrics["paired"] = {"permuted_vs_retriever_order": paired_comparison(ranks["fused"], ranks["retriever_order"],
                                                                          resamples=200)}
    text = _render(tmp_path, metrics)
    assert "| LLM x 4 permutations **(final)** |" in text
    assert "Verdict: final order (LLM x 4 permutations) vs retriever order: NDCG@10 " in text
    assert "- LLM x 4 permutations - retriever order: NDCG@10 " in text


def test_a_training_log_cut_by_a_kill_still_renders_its_curve(tmp_path):
    """A run killed mid-append leaves a cut last line in train_log.jsonl: the curve is drawn from the
    complete lines and the report says one was left out."""
    import json

    run = tmp_path / "run"
    paths = RunPaths(run)
    paths.ranker.mkdir(parents=True)
    write_json(paths.metrics("test"), _old_metrics(_orders()))
    write_json(paths.ranker / "train_summary.json", {
        "loss_first_steps": 3.0, "loss_last_steps": 2.0, "chance_loss": 3.0, "steps": 3, "examples": 12,
        "minutes": 0.1, "best_val_ndcg@10": 0.1, "best_step": 2})
    paths.train_log.write_text("".join(json.dumps({"step": s, "loss": 3.0 - s / 3}) + "\n" for s in (1, 2, 3))
                               + '{"step": 4, "lo')
    with pytest.raises(ValueError):  # precondition: the last line is cut
        json.loads(paths.train_log.read_text().splitlines()[-1])
    text = write_report(SimpleNamespace(run_dir=str(run)))
    assert (run / "loss.png").is_file()
    assert re.search(r"train_log\.jsonl: line 4 .*cut", text), text
