"""The run's final table (console + report.md), a loss-curve plot, and the doctor's verdict when it has one."""

from __future__ import annotations

from pathlib import Path

from rerank_dist.config import RunConfig
from rerank_dist.io import atomic_write_text, read_json, read_jsonl, write_png
from rerank_dist.metrics import is_order_invariant
from rerank_dist.paths import RunPaths

COLUMNS = ["recall@1", "recall@5", "ndcg@5", "recall@10", "ndcg@10", "mrr@10"]
# Rows in this order when the metrics file has them: baselines first, then the LLM's orders.
ORDERS = ("random_order", "retriever_order", "reranker", "permuted", "fused")
# The verdict's two questions, and the metrics it answers them on.
VERDICT_METRICS = ("ndcg@10", "recall@5")


def _order_label(metrics: dict, key: str) -> str:
    """How a row names an order (older files have only random_order / retriever_order / reranker)."""
    if key == "permuted":
        p = (metrics.get("protocol") or {}).get("permutations")
        return f"LLM x {p} permutations" if p else "LLM over candidate permutations"
    if key == "fused":
        w = (metrics.get("fusion") or {}).get("weight")
        return f"fused LLM + retriever (w {w:g})" if isinstance(w, (int, float)) else "fused LLM + retriever"
    return {"random_order": "random order", "retriever_order": "retriever order",
            "reranker": "LLM order (pure)"}.get(key, key.replace("_", " "))


def _final(metrics: dict) -> str:
    """Which order the run's rankings file uses; older files (no final_order) used the LLM's own."""
    final = metrics.get("final_order") or "reranker"
    return final if final in metrics else "reranker"


def _metric_label(name: str) -> str:
    family, _, k = name.partition("@")
    return {"ndcg": "NDCG", "mrr": "MRR", "recall": "Recall", "hit": "Hit", "precision": "Precision"}.get(
        family, family) + (f"@{k}" if k else "")


def _interval(entry: dict) -> str:
    """"+0.0031 [-0.0042, +0.0105]": a paired_comparison entry's difference and 95% interval."""
    return f"{entry['diff']:+.4f} [{entry['low']:+.4f}, {entry['high']:+.4f}]"


def _table(metrics: dict, subset: str) -> list[str]:
    first = metrics["reranker"]
    n = first["num_users"] if subset == "all_users" else first["num_retrieved"]
    title = "all users" if subset == "all_users" else "retrieved subset"
    final = _final(metrics)
    lines = [f"{title} ({n} users)", "| order | " + " | ".join(COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for key in ORDERS:
        if key not in metrics:
            continue
        values = metrics[key][subset]
        label = _order_label(metrics, key) + (" **(final)**" if key == final else "")
        lines.append(f"| {label} | " + " | ".join(f"{values[c]:.4f}" if c in values else "-" for c in COLUMNS)
                     + " |")
    return lines


def _pair_name(metrics: dict, pair: str) -> str:
    """"fused_vs_retriever_order" -> "fused LLM + retriever (w 0.3) - retriever order"."""
    a, sep, b = pair.partition("_vs_")
    return f"{_order_label(metrics, a)} - {_order_label(metrics, b)}" if sep else pair


def _paired_lines(metrics: dict) -> list[str]:
    paired = metrics.get("paired") or {}
    if not paired:
        return []
    users = metrics["reranker"]["num_users"]
    lines = [f"Paired differences over all {users} users (95% interval: users resampled with replacement; a user "
             f"whose target is not among the candidates counts 0 in both orders):"]
    for pair, entries in paired.items():
        shown = ", ".join(f"{_metric_label(m)} {_interval(e)}" for m, e in entries.items() if _complete(e))
        if shown:
            lines.append(f"- {_pair_name(metrics, pair)}: {shown}")
    return lines + [""] if len(lines) > 1 else []


def _complete(entry: object) -> bool:
    return isinstance(entry, dict) and all(isinstance(entry.get(k), (int, float)) for k in ("diff", "low", "high"))


def _protocol_line(metrics: dict) -> list[str]:
    protocol = metrics.get("protocol")
    if not protocol:
        return []
    names = {"train_order": "training order", "eval_order": "evaluation order", "negatives": "negatives",
             "train_targets": "training targets", "permutations": "candidate permutations"}
    shown = ", ".join(f"{names.get(k, k.replace('_', ' '))} {v}" for k, v in protocol.items())
    return [f"Protocol: {shown}", ""]


def _fusion_line(metrics: dict) -> list[str]:
    fusion = metrics.get("fusion")
    if not fusion or not isinstance(fusion.get("weight"), (int, float)):
        return []
    parts = [f"Fusion: retriever weight w = {fusion['weight']:g}"]
    if fusion.get("chosen_on"):
        users = ""
        if fusion.get("val_users") is not None:
            scored = fusion.get("val_users_scored")
            users = (f", {fusion['val_users']} users" if scored in (None, fusion["val_users"])
                     else f", {fusion['val_users']} users ({scored} scored: those whose target was retrieved)")
        parts[0] += f", chosen on {fusion['chosen_on']}{users}, not on the users above"
    if fusion.get("normalisation"):
        parts.append(f"normalisation: {fusion['normalisation']}")
    grid = fusion.get("grid") or {}
    if grid:
        objective = _metric_label(fusion["objective"]) if fusion.get("objective") else "score"
        shown = ", ".join(f"{_number(w)}: {v:.4f}" if isinstance(v, (int, float)) else f"{w}: {v}"
                          for w, v in grid.items())
        parts.append(f"{fusion.get('chosen_on', 'validation')} {objective} by weight {shown}")
    lines = ["; ".join(parts)]
    if _final(metrics) != "fused":
        lines[0] += f" (not the final order: that is {_order_label(metrics, _final(metrics))})"
    return lines


def _number(text: object) -> str:
    try:
        return f"{float(text):g}"
    except (TypeError, ValueError):
        return str(text)


def _comparison(metrics: dict, a: str, b: str) -> str:
    """a against b on the verdict's metrics: the paired interval when the file has one, else the two means."""
    entries = (metrics.get("paired") or {}).get(f"{a}_vs_{b}") or {}
    parts = []
    for m in VERDICT_METRICS:
        e = entries.get(m)
        if _complete(e):
            word = "better" if e["low"] > 0 else "worse" if e["high"] < 0 else "not distinguishable"
            parts.append(f"{_metric_label(m)} {_interval(e)} ({word})")
            continue
        va = metrics.get(a, {}).get("all_users", {}).get(m)
        vb = metrics.get(b, {}).get("all_users", {}).get(m)
        if va is None or vb is None:
            continue
        word = "ahead" if va > vb else "not ahead"
        parts.append(f"{_metric_label(m)} {va:.4f} vs {vb:.4f} ({word}; no paired interval in this file)")
    return ", ".join(parts)


def _verdict(metrics: dict) -> list[str]:
    """The run's answer to two questions: does its final order beat the retriever's, and does the LLM's own
    order (with no retriever in it) beat chance? A fused order can beat the retriever with a useless LLM."""
    final = _final(metrics)
    lines = [f"Verdict: final order ({_order_label(metrics, final)}) vs retriever order: "
             f"{_comparison(metrics, final, 'retriever_order')}."]
    if "random_order" in metrics:
        lines.append(f"Verdict: LLM order (pure) vs random order: {_comparison(metrics, 'reranker', 'random_order')}.")
    return lines


def _invariant(metric: str, num_candidates: int) -> bool:
    try:
        return is_order_invariant(metric, num_candidates)
    except ValueError:  # a name this version does not know: show it as the run marked it
        return True


def _loss_curve(log_path: Path) -> tuple[list[tuple[int, float]], int]:
    """(step, loss) per logged step, and the number of a last line cut by a killed run (0: none)."""
    if not log_path.is_file():
        return [], 0
    records, cut = read_jsonl(log_path)
    return [(r["step"], r["loss"]) for r in records if "loss" in r], cut


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
    write_png(fig, out)


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
    lines += _protocol_line(metrics)
    lines += _table(metrics, "all_users") + [""] + _table(metrics, "retrieved_subset") + [""]
    lines += _paired_lines(metrics)
    lines += _fusion_line(metrics)
    # Older files listed NDCG/MRR@K >= N as blind too; only the order-invariant families are.
    n = metrics["reranker"]["num_candidates"]
    blind = [m for m in metrics["reranker"].get("ranking_blind", []) if _invariant(m, n)]
    if blind:
        lines.append(f"Cannot reflect ranking (K >= {metrics['reranker']['num_candidates']} candidates): {', '.join(blind)}")
    summary_path = paths.ranker / "train_summary.json"
    if summary_path.is_file():
        s = read_json(summary_path)
        lines.append(f"Training loss: {s['loss_first_steps']:.4f} (first steps) -> {s['loss_last_steps']:.4f} "
                     f"(last steps); chance ln(K) = {s['chance_loss']:.4f}; {s['steps']} steps, "
                     f"{s['examples']} examples, {s['minutes']} min; best val NDCG@10 {s['best_val_ndcg@10']:.4f} "
                     f"at step {s['best_step']}")
        curve, cut = _loss_curve(paths.train_log)
        if curve:
            _plot(curve, s["chance_loss"], paths.root / "loss.png")
            lines.append("Loss curve: loss.png")
        if cut:
            lines.append(f"Note: {paths.train_log.name}: line {cut} was cut by a killed run and is left out")
    lines += _verdict(metrics)
    if not metrics.get("scored_all_users", True):
        lines.append("WARNING: score.max_users limited scoring; these are not all-user numbers.")
    lines += [""] + _doctor_section(paths, split)
    text = "\n".join(lines) + "\n"
    atomic_write_text(paths.report, text)
    return text
