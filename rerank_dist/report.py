"""The run's final table (console + report.md), a loss-curve plot, and the doctor's verdict when it has one."""

from __future__ import annotations

import json
from pathlib import Path

from rerank_dist.config import RunConfig
from rerank_dist.io import atomic_path, atomic_write_text, read_json
from rerank_dist.paths import RunPaths

COLUMNS = ["recall@1", "recall@5", "ndcg@5", "recall@10", "ndcg@10", "mrr@10"]
ROWS = [("random order", "random_order"), ("retriever order", "retriever_order"), ("reranker", "reranker")]


def _table(metrics: dict, subset: str) -> list[str]:
    first = metrics["reranker"]
    n = first["num_users"] if subset == "all_users" else first["num_retrieved"]
    title = "all users" if subset == "all_users" else "retrieved subset"
    lines = [f"{title} ({n} users)", "| order | " + " | ".join(COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for label, key in ROWS:
        values = metrics[key][subset]
        lines.append(f"| {label} | " + " | ".join(f"{values[c]:.4f}" for c in COLUMNS) + " |")
    return lines


def _loss_curve(log_path: Path) -> list[tuple[int, float]]:
    if not log_path.is_file():
        return []
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def _plot(curve: list[tuple[int, float]], chance: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in curve], [v for _, v in curve], lw=1, label="train loss")
    ax.axhline(chance, color="grey", ls="--", lw=1, label="chance ln(K)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy over labels")
    ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _doctor_section(paths: RunPaths, split: str) -> list[str]:
    """The doctor's verdict on exactly these outputs (doctor.json names the metrics file it read), or how to get one."""
    from rerank_dist.doctor.readers.common import sha256_file
    from rerank_dist.doctor.render import summary_for_report

    return summary_for_report(paths.root / "doctor.json", sha256_file(paths.metrics(split)))


def write_report(cfg: RunConfig, split: str = "test") -> str:
    paths = RunPaths(Path(cfg.run_dir))
    metrics = read_json(paths.metrics(split))
    lines = [f"# rerank_dist report: {cfg.run_dir} ({split})", ""]
    retr = paths.retriever / "metrics_test.json"
    if retr.is_file():
        r = read_json(retr)
        full = r.get("full_catalogue", r)
        shown = ", ".join(f"{k} {full[k]:.4f}" for k in ("ndcg@10", "recall@10", "mrr@10", "recall@20") if k in full)
        lines += [f"Retriever (LRURec) over the whole catalogue, all users: {shown}", ""]
    lines += _table(metrics, "all_users") + [""] + _table(metrics, "retrieved_subset") + [""]
    blind = metrics["reranker"].get("ranking_blind", [])
    if blind:
        lines.append(f"Cannot reflect ranking (K >= {metrics['reranker']['num_candidates']} candidates): {', '.join(blind)}")
    summary_path = paths.ranker / "train_summary.json"
    if summary_path.is_file():
        s = read_json(summary_path)
        lines.append(f"Training loss: {s['loss_first_steps']:.4f} (first steps) -> {s['loss_last_steps']:.4f} "
                     f"(last steps); chance ln(K) = {s['chance_loss']:.4f}; {s['steps']} steps, "
                     f"{s['examples']} examples, {s['minutes']} min; best val NDCG@10 {s['best_val_ndcg@10']:.4f} "
                     f"at step {s['best_step']}")
        curve = _loss_curve(paths.train_log)
        if curve:
            _plot(curve, s["chance_loss"], paths.root / "loss.png")
            lines.append("Loss curve: loss.png")
    rer = metrics["reranker"]["all_users"]["ndcg@10"]
    ret = metrics["retriever_order"]["all_users"]["ndcg@10"]
    verdict = "beats" if rer > ret else "does not beat"
    lines.append(f"Verdict: the reranker {verdict} the retriever's order on NDCG@10 over all users "
                 f"({rer:.4f} vs {ret:.4f}).")
    if not metrics.get("scored_all_users", True):
        lines.append("WARNING: score.max_users limited scoring; these are not all-user numbers.")
    lines += [""] + _doctor_section(paths, split)
    text = "\n".join(lines) + "\n"
    atomic_write_text(paths.report, text)
    return text
