"""Learning curve of the LLM ranker on the embedded default: test quality against training examples.

    python bench/ranker_quality.py                                   # 200 / 800 / 3,200 examples, both orders
    python bench/ranker_quality.py --sizes 200,800 --budget-minutes 60   # a shorter curve (resumable later)

For each training order (``prompt.train_order``: shuffled, LlamaRec's training; retriever, the
order evaluation shows) one training run grows through the sizes: the learning rate is constant
after warmup (``train.lr_schedule=constant``) so that lengthening the run with ``train.max_steps``
resumes it (the project's own resume) instead of starting over. At each size the adapter of that
step is scored:

* the pure LLM order, the fusion with the retriever's scores (weight chosen on validation users
  only, as ``score.fusion`` does), the retriever's order and a random order, on test;
* test NDCG@10 / Recall@5 over **all** test users. Only the users whose target the retriever found
  are scored by the LLM: every other user ranks the target nowhere under any order (a miss, 0),
  so scoring them would change no number here (``rerank-dist score`` scores every user);
* paired bootstrap intervals over all test users for LLM vs retriever, fused vs retriever and
  LLM vs random.

Everything lives in ``--work`` (default runs/ranker_quality); a point already measured is read
back, a training already past a size continues from its checkpoint, so an interrupted bench (or a
longer --sizes list later) picks up where it stopped. Results: bench/results/ranker_quality.{json,md,png}.
Evaluation shows candidates in retriever order (``prompt.eval_order=retriever``, LlamaRec's protocol).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rerank_dist.settings import load_config  # noqa: E402
from rerank_dist.io import atomic_path, atomic_write_text, read_json, write_json  # noqa: E402
from rerank_dist.paths import RunPaths  # noqa: E402


def _point_config(args, order: str, size: int, run_dir: Path):
    steps = math.ceil(size / args.batch_size)
    overrides = [f"run_dir={run_dir}", f"retriever.train_prefixes_per_user={args.prefixes_per_user}",
                 f"prompt.train_order={order}", "prompt.eval_order=retriever", "prompt.max_train_examples=0",
                 "train.lr_schedule=constant", f"train.max_steps={steps}", "train.epochs=100",
                 f"train.batch_size={args.batch_size}", "train.max_minutes=0", "train.keep_last=2",
                 "train.eval_every=1000000", f"train.eval_users={args.eval_users}", "train.save_every_minutes=5",
                 f"score.fusion_val_users={args.val_users}"]
    if args.history_items is not None:
        overrides.append(f"prompt.history_items={args.history_items}")
    return load_config(ROOT / args.config, overrides + args.set)


def _share_retriever(base: Path, run_dir: Path) -> None:
    """Every curve uses the same data and retriever: copied once from the base run."""
    for part in ("data", "retriever"):
        if not (run_dir / part).exists():
            shutil.copytree(base / part, run_dir / part)


def _all_users(ranks_scored: np.ndarray, num_users: int) -> np.ndarray:
    """Ranks over every test user: the scored ones, then -1 (a miss) for users whose target was not retrieved."""
    return np.concatenate([ranks_scored, -np.ones(num_users - len(ranks_scored), dtype=ranks_scored.dtype)])


def _measure(cfg, step_dir: Path, say) -> dict:
    """Test metrics of the adapter in step_dir: pure LLM, fused (weight from validation), retriever, random."""
    import pandas as pd
    import torch

    from rerank_dist.config import labels_for
    from rerank_dist.data.prepare import load_dataset
    from rerank_dist.distributed import build_accelerator
    from rerank_dist.metrics import metrics_from_ranks, paired_comparison, target_ranks
    from rerank_dist.modeling import load_for_scoring, load_tokenizer
    from rerank_dist.evaluation import baseline_scores
    from rerank_dist.fusion import fuse, retriever_score_matrix
    from rerank_dist.score import _fusion_weight, _llm_scores

    paths = RunPaths(Path(cfg.run_dir))
    accelerator = build_accelerator(cfg)
    tokenizer = load_tokenizer(cfg.model)
    dataset = load_dataset(paths.data)
    labels = labels_for(cfg)
    label_ids = torch.tensor(read_json(step_dir / "verbalizer.json")["label_ids"], dtype=torch.long)
    model = load_for_scoring(cfg.model, step_dir, device=accelerator.device)
    started = time.time()
    fusion = _fusion_weight(accelerator, model, cfg, dataset, tokenizer, labels, label_ids, step_dir)
    test = pd.read_parquet(paths.candidates("test"))
    informative = test[test["target_rank"] >= 0]
    got = _llm_scores(accelerator, model, cfg, "test", informative, dataset, tokenizer, labels, label_ids,
                      step_dir, f"bench-test-{step_dir.name}")
    examples = got["examples"]
    target_index = np.array([e.label_index for e in examples])
    orders = {"llm": got["single"], "fused": fuse(got["single"], retriever_score_matrix(examples), fusion["weight"]),
              **baseline_scores(examples, cfg.prompt.seed)}
    ranks = {name: _all_users(target_ranks(s, target_index), len(test)) for name, s in orders.items()}
    out = {"metrics": {name: metrics_from_ranks(r, (1, 5, 10)) for name, r in ranks.items()},
           "paired": {f"{a}_vs_{b}": paired_comparison(ranks[a], ranks[b], ("ndcg@10", "recall@5"), 2000, 0)
                      for a, b in (("llm", "retriever_order"), ("fused", "retriever_order"), ("llm", "random_order"))},
           "fusion": {k: v for k, v in fusion.items() if k != "saved_dirs"},
           "test_users": int(len(test)), "test_users_scored": int(len(informative)),
           "scoring_seconds": round(time.time() - started, 1)}
    for directory in got["saved_dirs"] + fusion["saved_dirs"]:
        shutil.rmtree(directory, ignore_errors=True)
    return out


def _train_to(cfg, say) -> dict:
    from rerank_dist import pipeline

    pipeline.train(cfg, say)
    return read_json(RunPaths(Path(cfg.run_dir)).ranker / "train_summary.json")


def _table(points: list[dict]) -> str:
    lines = ["| train order | examples seen | final loss (chance 3.00) | LLM N@10 | LLM R@5 | fused N@10 | fused R@5 "
             "| fusion w | retriever N@10 | retriever R@5 | random N@10 | LLM - retriever N@10 [95%] "
             "| fused - retriever N@10 [95%] | fused - retriever R@5 [95%] | train min |",
             "|---" * 15 + "|"]
    for p in points:
        m, d = p["metrics"], p["paired"]

        def ci(pair, metric):
            c = d[pair][metric]
            return f"{c['diff']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]"

        lines.append(f"| {p['train_order']} | {p['examples_seen']} | {p['loss_last_steps']:.3f} "
                     f"| {m['llm']['ndcg@10']:.4f} | {m['llm']['recall@5']:.4f} "
                     f"| {m['fused']['ndcg@10']:.4f} | {m['fused']['recall@5']:.4f} | {p['fusion']['weight']} "
                     f"| {m['retriever_order']['ndcg@10']:.4f} | {m['retriever_order']['recall@5']:.4f} "
                     f"| {m['random_order']['ndcg@10']:.4f} | {ci('llm_vs_retriever_order', 'ndcg@10')} "
                     f"| {ci('fused_vs_retriever_order', 'ndcg@10')} | {ci('fused_vs_retriever_order', 'recall@5')} "
                     f"| {p['train_minutes']:.1f} |")
    return "\n".join(lines)


def _plot(points: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("ndcg@10", "recall@5")):
        for order, style in (("shuffled", "-o"), ("retriever", "-s")):
            pts = sorted((p for p in points if p["train_order"] == order), key=lambda p: p["examples_seen"])
            if not pts:
                continue
            xs = [p["examples_seen"] for p in pts]
            ax.plot(xs, [p["metrics"]["llm"][metric] for p in pts], style, label=f"LLM, trained {order}")
            ax.plot(xs, [p["metrics"]["fused"][metric] for p in pts], style, alpha=0.5, label=f"fused, trained {order}")
        if points:
            ax.axhline(points[0]["metrics"]["retriever_order"][metric], color="k", ls="--", lw=1, label="retriever order")
            ax.axhline(np.mean([p["metrics"]["random_order"][metric] for p in points]), color="grey", ls=":", lw=1,
                       label="random order")
        ax.set_xscale("log")
        sizes = sorted({p["examples_seen"] for p in points})
        ax.set_xticks(sizes, [str(x) for x in sizes])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training examples seen")
        ax.set_ylabel(f"test {metric} (all users)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/smollm2_cpu.yaml")
    parser.add_argument("--sizes", default="200,800,3200", help="training examples seen at each point")
    parser.add_argument("--orders", default="shuffled,retriever", help="prompt.train_order values")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--history-items", type=int, default=None, help="prompt.history_items (default: the config's)")
    parser.add_argument("--prefixes-per-user", type=int, default=6,
                        help="retriever.train_prefixes_per_user: 610 users x 6 = 3,660 distinct training examples")
    parser.add_argument("--eval-users", type=int, default=16, help="validation users at the end of each segment")
    parser.add_argument("--val-users", type=int, default=0, help="validation users for the fusion weight (0 = all retrieved)")
    parser.add_argument("--budget-minutes", type=float, default=120.0, help="start no new point after this")
    parser.add_argument("--work", default="runs/ranker_quality")
    parser.add_argument("--out", default="bench/results/ranker_quality")
    parser.add_argument("--set", action="append", default=[], help="extra config override (repeatable)")
    args = parser.parse_args()

    import torch

    from rerank_dist import pipeline

    work, out = ROOT / args.work, ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    results_path = work / "points.json"
    points = read_json(results_path)["points"] if results_path.is_file() else []
    started = time.time()
    say = print

    base_cfg = _point_config(args, "shuffled", 8, work / "base")
    pipeline.prepare(base_cfg, say)
    pipeline.retrieve(base_cfg, say)
    sizes = [int(s) for s in args.sizes.split(",")]
    for size in sorted(sizes):
        for order in args.orders.split(","):
            if any(p["train_order"] == order and p["examples_seen"] == size for p in points):
                continue
            if (time.time() - started) / 60 > args.budget_minutes:
                say(f"[bench] budget of {args.budget_minutes} min spent; stopping before {order} @ {size}")
                break
            run_dir = work / f"train-{order}"
            _share_retriever(work / "base", run_dir)
            cfg = _point_config(args, order, size, run_dir)
            say(f"[bench] {order} order: training to {size} examples")
            t0 = time.time()
            summary = _train_to(cfg, say)
            step_dir = RunPaths(run_dir).step_dir(summary["steps"])
            say(f"[bench] {order} @ {size}: scoring step {summary['steps']}")
            point = {"train_order": order, "examples_seen": summary["examples_seen"], "step": summary["steps"],
                     "loss_last_steps": summary["loss_last_steps"], "chance_loss": summary["chance_loss"],
                     "train_minutes": round((time.time() - t0) / 60, 2),
                     "distinct_examples": summary["examples"],
                     **_measure(cfg, step_dir, say)}
            points.append(point)
            write_json(results_path, {"points": points})
            say(f"[bench] {order} @ {size}: LLM N@10 {point['metrics']['llm']['ndcg@10']:.4f}, fused "
                f"{point['metrics']['fused']['ndcg@10']:.4f}, retriever {point['metrics']['retriever_order']['ndcg@10']:.4f}")
    points.sort(key=lambda p: (p["train_order"], p["examples_seen"]))
    meta = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "config": args.config, "sizes": sizes, "history_items": base_cfg.prompt.history_items, "overrides": args.set,
            "argv": sys.argv[1:],
            "eval_order": "retriever", "test_users": points[0]["test_users"] if points else None,
            "minutes_this_invocation": round((time.time() - started) / 60, 1)}
    write_json(out.with_suffix(".json"), {"meta": meta, "points": points})
    text = (f"# Ranker learning curve ({args.config}, CPU {meta['cpu_capability']}, {meta['threads']} threads)\n\n"
            f"Test metrics over all {meta['test_users']} test users; evaluation in retriever order; fusion weight "
            f"chosen on validation users. Produced by `python bench/ranker_quality.py {' '.join(sys.argv[1:])}` "
            f"(resumable: points already in --work are read back).\n\n"
            + _table(points) + "\n")
    atomic_write_text(out.with_suffix(".md"), text)
    if points:
        _plot(points, out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
