"""Training-step cost against model.lora_layers and prompt.history_items, side by side in one process.

    .venv/bin/python bench/lora_layers.py                        # needs a prepared run (make demo)
    .venv/bin/python bench/lora_layers.py --layers 0,10,6 --history 20,10 --prompts 6 --rounds 2

With adapters only in the last N decoder layers no gradient is needed below them, so autograd
stops there and the backward pass shrinks; a shorter history shortens every pass. Each variant
trains on the same real training prompts of ``--run-dir`` (built as training builds them), one
example per forward + backward + AdamW step, exactly the loss the training loop uses (cross-entropy
over the K label logits). Variants are interleaved round by round, so a slower moment of a shared
machine hits all of them alike; the ratio is against the first variant (every layer, the first
history length). The quality side of the trade is bench/ranker_quality.py's job.
Results: bench/results/lora_layers.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


def _prompts(config: str, run_dir: str, history: int, n: int):
    """(token ids, label index) of the first n training prompts with ``history`` titles, and the label ids."""
    import pandas as pd
    import torch

    from rerank_dist.config import labels_for
    from rerank_dist.settings import load_config
    from rerank_dist.data.prepare import load_dataset
    from rerank_dist.examples import build_examples, tokenize_examples
    from rerank_dist.modeling import load_tokenizer
    from rerank_dist.paths import RunPaths
    from rerank_dist.verbalizer import resolve_label_ids

    cfg = load_config(config, overrides=[f"run_dir={run_dir}", f"prompt.history_items={history}"])
    paths = RunPaths(Path(cfg.run_dir))
    tokenizer = load_tokenizer(cfg.model)
    dataset = load_dataset(paths.data)
    candidates = pd.read_parquet(paths.candidates("train")).head(n)
    labels = labels_for(cfg)
    examples, _ = build_examples(candidates, dataset, cfg.prompt, labels, tokenizer, "train", dataset.num_items)
    label_ids = torch.tensor(resolve_label_ids(tokenizer, examples[0].prompt, labels))  # (K,)
    return cfg, [(ids, e.label_index) for ids, e in zip(tokenize_examples(examples, tokenizer), examples)], label_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/smollm2_cpu.yaml")
    parser.add_argument("--run-dir", default="runs/default", help="prepared run (data/, retriever/)")
    parser.add_argument("--layers", default="0,10", help="model.lora_layers values (0 = every layer)")
    parser.add_argument("--history", default="20,10", help="prompt.history_items values")
    parser.add_argument("--prompts", type=int, default=6, help="training prompts per variant and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    import torch
    from peft import get_peft_model

    from rerank_dist.io import atomic_write_text, write_json
    from rerank_dist.label_scoring import label_logits
    from rerank_dist.modeling import load_base_model, lora_config, num_decoder_layers

    if args.threads:
        torch.set_num_threads(args.threads)
    layers = [int(x) for x in args.layers.split(",")]
    histories = [int(x) for x in args.history.split(",")]
    prompts, cfg = {}, None
    for h in histories:
        cfg, prompts[h], label_ids = _prompts(args.config, args.run_dir, h, args.prompts)
    base = load_base_model(cfg.model)
    n_layers = num_decoder_layers(base)
    variants = [(n, h) for n in layers for h in histories]
    seconds: dict[tuple[int, int], list[float]] = {v: [] for v in variants}
    tokens = {h: statistics.mean(len(ids) for ids, _ in prompts[h]) for h in histories}
    for r in range(args.rounds + 1):  # round 0 warms up (allocator, kernels) and is not counted
        for n, h in variants:
            torch.manual_seed(0)
            model = get_peft_model(base, lora_config(dataclasses.replace(cfg.model, lora_layers=n), n_layers)).train()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
            t0 = time.perf_counter()
            for ids, label in prompts[h]:
                input_ids = torch.tensor([ids])                                            # (1, L)
                logits = label_logits(model, input_ids, torch.ones_like(input_ids), label_ids)  # (1, K)
                torch.nn.functional.cross_entropy(logits.float(), torch.tensor([label])).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if r:
                seconds[(n, h)].append((time.perf_counter() - t0) / len(prompts[h]))
            base = model.unload()
            print(f"round {r} lora_layers={n or 'all'} history={h}: {(time.perf_counter() - t0) / len(prompts[h]):.3f} s/example",
                  flush=True)
    ref = statistics.median(seconds[variants[0]])
    rows = [{"lora_layers": n, "adapted_layers": n if 0 < n < n_layers else n_layers, "history_items": h,
             "mean_prompt_tokens": round(tokens[h], 1), "seconds_per_example": round(statistics.median(seconds[(n, h)]), 3),
             "speedup_vs_first": round(ref / statistics.median(seconds[(n, h)]), 2)} for n, h in variants]
    meta = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "model": cfg.model.name_or_path, "decoder_layers": n_layers, "dtype": str(base.dtype),
            "prompts": args.prompts, "rounds": args.rounds, "argv": sys.argv[1:]}
    name = "lora_layers" + (f"_{args.tag}" if args.tag else "")
    write_json(RESULTS / f"{name}.json", {"meta": meta, "rows": rows})
    lines = ["# Training-step cost vs model.lora_layers and prompt.history_items",
             "",
             f"`python bench/lora_layers.py {' '.join(sys.argv[1:])}`; {meta['model']} ({n_layers} layers, "
             f"{meta['dtype']}), CPU {meta['cpu_capability']}, {meta['threads']} threads; median over "
             f"{args.rounds} interleaved rounds of {args.prompts} real training prompts, one example per "
             f"forward + backward + AdamW step.",
             "",
             "| adapted layers | history_items | mean prompt tokens | s / example | speedup vs first row |",
             "|---|---|---|---|---|"]
    lines += [f"| last {r['adapted_layers']} of {n_layers} | {r['history_items']} | {r['mean_prompt_tokens']} "
              f"| {r['seconds_per_example']} | {r['speedup_vs_first']}x |" for r in rows]
    atomic_write_text(RESULTS / f"{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
