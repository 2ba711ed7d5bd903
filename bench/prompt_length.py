"""Prompt length in tokens against prompt.history_items and prompt.title_max_tokens (tokenizer only).

    .venv/bin/python bench/prompt_length.py
    .venv/bin/python bench/prompt_length.py --history 5,10,20 --titles 8,16,32 --split train

Builds the split's prompts exactly as training does (``build_examples`` + ``tokenize_examples``)
for every combination and reports mean / median / max tokens per prompt, next to the cost a
forward pass scales with (about linearly at these lengths: the matmuls dominate attention).
No model is loaded. Results: bench/results/prompt_length.{json,md}.
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


def prompt_length_table(config: str, run_dir: str, history: list[int], titles: list[int], split: str) -> list[dict]:
    """Mean / median / max prompt tokens of ``split`` for each (history_items, title_max_tokens)."""
    import pandas as pd

    from rerank_dist.config import labels_for
    from rerank_dist.settings import load_config
    from rerank_dist.data.prepare import load_dataset
    from rerank_dist.examples import build_examples, tokenize_examples
    from rerank_dist.modeling import load_tokenizer
    from rerank_dist.paths import RunPaths

    base = load_config(config, overrides=[f"run_dir={run_dir}"])
    paths = RunPaths(Path(base.run_dir))
    tokenizer = load_tokenizer(base.model)
    dataset = load_dataset(paths.data)
    candidates = pd.read_parquet(paths.candidates(split))
    rows = []
    for h in history:
        for t in titles:
            cfg = load_config(config, overrides=[f"run_dir={run_dir}", f"prompt.history_items={h}",
                                                 f"prompt.title_max_tokens={t}"])
            examples, _ = build_examples(candidates, dataset, cfg.prompt, labels_for(cfg), tokenizer, split,
                                         dataset.num_items)
            lengths = [len(x) for x in tokenize_examples(examples, tokenizer)]
            rows.append({"history_items": h, "title_max_tokens": t, "prompts": len(lengths),
                         "mean_tokens": round(statistics.mean(lengths), 1), "median_tokens": statistics.median(lengths),
                         "max_tokens": max(lengths), "min_tokens": min(lengths)})
            print(f"history_items={h:>3} title_max_tokens={t:>3}: mean {rows[-1]['mean_tokens']:7.1f}  "
                  f"max {rows[-1]['max_tokens']:5d}  ({len(lengths)} prompts)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/smollm2_cpu.yaml")
    parser.add_argument("--run-dir", default="runs/default", help="prepared run (data/, retriever/)")
    parser.add_argument("--split", default="train", choices=["train", "val", "test"])
    parser.add_argument("--history", default="5,10,20", help="prompt.history_items values")
    parser.add_argument("--titles", default="8,16,32", help="prompt.title_max_tokens values")
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args()

    from rerank_dist.io import atomic_write_text, write_json

    history = [int(x) for x in args.history.split(",")]
    titles = [int(x) for x in args.titles.split(",")]
    rows = prompt_length_table(args.config, args.run_dir, history, titles, args.split)
    ref = next((r for r in rows if r["history_items"] == 20 and r["title_max_tokens"] == 32), rows[-1])
    for r in rows:
        r["mean_vs_default"] = round(r["mean_tokens"] / ref["mean_tokens"], 3)
    out = Path(args.out_dir)
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    write_json(out / "prompt_length.json", {"bench": "prompt_length", "when": when, "command": " ".join(sys.argv),
                                            "config": args.config, "run_dir": args.run_dir, "split": args.split,
                                            "reference": "history_items=20, title_max_tokens=32", "rows": rows})
    md = ["# Prompt length vs prompt.history_items and prompt.title_max_tokens\n",
          f"bench/prompt_length.py, {when}; {args.split} split of {args.run_dir} ({rows[0]['prompts']} prompts), "
          f"SmolLM2 tokenizer, config {args.config} otherwise. Tokens per prompt; \"vs default\" is the mean "
          f"relative to history_items=20, title_max_tokens=32 (the config's values). Training and scoring "
          f"time per prompt grow about linearly with it at these lengths.\n",
          "| history_items | title_max_tokens | mean | median | max | mean vs default |", "|---|---|---|---|---|---|"]
    md += [f"| {r['history_items']} | {r['title_max_tokens']} | {r['mean_tokens']} | {r['median_tokens']} | "
           f"{r['max_tokens']} | {r['mean_vs_default']} |" for r in rows]
    atomic_write_text(out / "prompt_length.md", "\n".join(md) + "\n")
    print(f"results in {out}/prompt_length.md", flush=True)


if __name__ == "__main__":
    main()
