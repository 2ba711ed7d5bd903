"""Padded tokens per training micro-batch: the present uniform shuffle against length grouping (tokenizer only).

    .venv/bin/python bench/padding.py                       # ml-latest-small, 20 history titles
    .venv/bin/python bench/padding.py --examples 0          # every training prefix (slower to build)

Prepares bundled ml-latest-small, builds the training examples store exactly as the train stage does
(SmolLM2-135M's real tokenizer, 20 history titles of up to 32 tokens, 20 candidates; random negatives,
every training prefix of every user, a seeded subset of --examples; so no retriever has to be trained: the prompt length depends on the titles shown, not on how the
negatives were chosen), and cuts the training order into micro-batches of 4, each left-padded to its
longest prompt, as the training collate does. It counts padded slots against real tokens for the
present order (the DataLoader's seeded uniform shuffle) and for train.length_grouping windows, at the
global batches of the default config (8) and the LlamaRec recipes (16). No model is loaded.
Results: bench/results/padding.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


def build_store(run_dir: Path, examples: int):
    """The training examples store of a prepared ml-latest-small run (built once, reused)."""
    from rerank_dist import example_store as store
    from rerank_dist.cli import main as cli
    from rerank_dist.config import labels_for
    from rerank_dist.modeling import load_tokenizer
    from rerank_dist.paths import RunPaths
    from rerank_dist.pipeline import recorded_key
    from rerank_dist.settings import load_config
    from rerank_dist.data.prepare import load_dataset

    overrides = [f"run_dir={run_dir}", "prompt.history_items=20", "prompt.title_max_tokens=32",
                 "retriever.train_candidates=none", "prompt.negatives=random", "prompt.train_order=shuffled",
                 "retriever.train_prefixes_per_user=0",
                 f"prompt.max_train_examples={examples}"]
    if cli(["prepare", *overrides]) != 0:
        raise SystemExit("prepare failed")
    cfg = load_config(None, overrides=overrides)
    tokenizer = load_tokenizer(cfg.model)
    labels = labels_for(cfg)
    source = store.StoreSource(load_dataset(RunPaths(run_dir).data), None, cfg.retriever.train_prefixes_per_user)
    spec = store.store_spec(cfg, recorded_key(cfg, "prepare"), tokenizer, labels)
    if not store.is_complete(spec):
        store.reset_if_stale(spec)
        plan = store.row_plan(source, cfg.prompt, len(labels))
        titles = store.prompt_pieces(source, cfg.prompt, labels, tokenizer)
        for part in store.missing_parts(spec, len(plan)):
            store.build_part(spec, plan, part, source, cfg.prompt, labels, tokenizer, titles)
        store.finish(spec, plan, source, cfg.prompt, labels, tokenizer)
    return cfg, store.StoredExamples(spec.directory)


def measure(lengths, seed: int, micro: int, batches: list[int], windows: list[int]) -> list[dict]:
    import torch

    from rerank_dist.length_grouping import LengthGroupedSampler, padding_share

    # The present order: a DataLoader with shuffle=True and a seeded generator (train.py).
    uniform = list(torch.utils.data.RandomSampler(range(len(lengths)), generator=torch.Generator().manual_seed(seed)))
    pad0, real = padding_share(lengths, uniform, micro)
    rows = [{"order": "uniform shuffle (present)", "batch_size": None, "length_grouping": 0, "padded": pad0,
             "real": real, "padding_share": round(pad0 / (pad0 + real), 4), "padding_cut": 0.0}]
    for batch in batches:
        for window in windows:
            order = LengthGroupedSampler(lengths, batch, window, seed).order()
            pad, real_g = padding_share(lengths, order, micro)
            assert real_g == real
            rows.append({"order": "length grouped", "batch_size": batch, "length_grouping": window, "padded": pad,
                         "real": real, "padding_share": round(pad / (pad + real), 4),
                         "padding_cut": round(1 - pad / pad0, 4)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/padding")
    parser.add_argument("--examples", type=int, default=8192, help="prompt.max_train_examples (0 = every prefix)")
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--windows", default="1,8,64")
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args()

    import torch

    from rerank_dist.io import atomic_write_text, write_json

    started = time.time()
    cfg, examples = build_store(Path(args.run_dir), args.examples)
    lengths = examples.lengths()
    print(f"{len(lengths)} prompts: mean {lengths.mean():.1f}, median {statistics.median(lengths.tolist())}, "
          f"min {lengths.min()}, max {lengths.max()} tokens ({time.time() - started:.0f} s to build)", flush=True)
    rows = measure(lengths, cfg.train.seed, args.micro, [8, 16], [int(w) for w in args.windows.split(",")])
    cpu = torch.backends.cpu.get_cpu_capability()
    out = Path(args.out_dir)
    stats = {"prompts": len(lengths), "mean_tokens": round(float(lengths.mean()), 1),
             "min_tokens": int(lengths.min()), "max_tokens": int(lengths.max())}
    write_json(out / "padding.json", {"bench": "padding", "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                                      "command": " ".join(sys.argv), "cpu_capability": cpu, "micro_batch": args.micro,
                                      "seed": cfg.train.seed, "prompt_stats": stats, "rows": rows})
    md = ["# Padded tokens per micro-batch: uniform shuffle vs train.length_grouping\n",
          f"`{' '.join(sys.argv)}` ({time.strftime('%Y-%m-%d')}, CPU capability {cpu}; tokenizer only, no model). "
          f"ml-latest-small training prompts (SmolLM2-135M tokenizer, 20 history titles of up to 32 tokens, 20 "
          f"candidates, random negatives): {stats['prompts']} prompts, mean {stats['mean_tokens']} tokens, "
          f"min {stats['min_tokens']}, max {stats['max_tokens']}. Micro-batches of {args.micro}, each left-padded "
          f"to its longest prompt. Padded slots are computed like real tokens; the cut is against the present "
          f"uniform shuffle.\n",
          "| order | global batch | window (steps) | padded slots | real tokens | padding share | padding cut |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['order']} | {r['batch_size'] or '-'} | {r['length_grouping'] or '-'} | {r['padded']:,} | "
                  f"{r['real']:,} | {r['padding_share']:.2%} | {r['padding_cut']:.1%} |")
    atomic_write_text(out / "padding.md", "\n".join(md) + "\n")
    print("\n".join(md[-len(rows) - 2:]))


if __name__ == "__main__":
    main()
