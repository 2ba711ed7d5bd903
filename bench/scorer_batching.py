"""Scorer batching on a CPU: a fixed number of prompts per forward against a token budget, side by side.

    .venv/bin/python bench/scorer_batching.py --threads 2 --rounds 3

The project's ``score_prompts`` (length-sorted batches, left padding, label logits only) on one
random model in rotating order inside each round, so load from other processes falls on every
variant alike. Prompt lengths are drawn from two bands: ``narrow`` like this project's test prompts
(mean 619, max 661 tokens with SmolLM2; bench/results/scorer_throughput.json) and ``wide`` (200 to
660 tokens: histories of very different lengths), where padding can matter. Variants: score.batch_size
1 (the CPU default), 8, and score.token_budget = 8 x the mean length (the same tokens per forward as
8 prompts on average). Reported: prompts/s, batches and the padding share of the tokens run
(``score.padding_waste``), and that every variant's scores agree (float32: rounding only).

Results: bench/results/scorer_batching.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


class OneProcess:
    """The part of an Accelerator score_prompts uses, for a single CPU process."""

    num_processes, process_index, device, is_local_main_process = 1, 0, torch.device("cpu"), False

    @contextlib.contextmanager
    def split_between_processes(self, inputs):
        yield inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    from rerank_dist.io import atomic_write_text, write_json
    from rerank_dist.score import _batches, padding_waste, score_prompts

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                         vocab_size=8192, max_position_embeddings=1024)).eval()
    labels = torch.arange(100, 120)  # (K,) 20 labels
    rng = np.random.default_rng(0)
    bands = {"narrow": rng.integers(577, 662, size=args.prompts), "wide": rng.integers(200, 661, size=args.prompts)}
    rows = []
    for band, lengths in bands.items():
        prompts = [rng.integers(200, 8000, size=int(n)).tolist() for n in lengths]
        budget = 8 * int(np.mean(lengths))
        variants = {"batch_size=1": (1, 0), "batch_size=8": (8, 0), f"token_budget={budget}": (8, budget)}
        seconds = {name: [] for name in variants}
        scores = {}
        for r in range(args.rounds):
            names = list(variants)[r % len(variants):] + list(variants)[:r % len(variants)]
            for name in names:
                batch_size, tokens = variants[name]
                started = time.perf_counter()
                scores[name] = score_prompts(OneProcess(), model, prompts, labels, 0, batch_size, token_budget=tokens)
                seconds[name].append(time.perf_counter() - started)
                print(f"{band} round {r + 1}: {name} {len(prompts) / seconds[name][-1]:.2f} prompts/s", flush=True)
        first = next(iter(scores.values()))
        for name, (batch_size, tokens) in variants.items():
            planned = _batches(prompts, batch_size, tokens)
            rows.append({"band": band, "variant": name, "mean_tokens": round(float(np.mean(lengths)), 1),
                         "max_tokens": int(max(lengths)), "batches": len(planned),
                         "padding_waste": round(padding_waste(prompts, planned), 4),
                         "prompts_per_s": round(len(prompts) * args.rounds / sum(seconds[name]), 3),
                         "round_seconds": [round(s, 2) for s in seconds[name]],
                         "max_abs_diff_vs_first": float(np.abs(scores[name] - first).max())})
    result = {"bench": "scorer_batching", "when": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads(),
              "model": f"random Llama, hidden {args.hidden}, {args.layers} layers, vocab 8192, float32",
              "prompts": args.prompts, "rounds": args.rounds, "rows": rows}
    write_json(RESULTS / "scorer_batching.json", result)
    lines = [f"# Scorer batching on a CPU ({result['cpu_capability']}, {result['torch_threads']} threads)", "",
             f"`{result['command']}`; {result['model']}; {args.prompts} prompts, {args.rounds} rotated rounds.", "",
             "| lengths | variant | batches | padding share | prompts/s | max abs score diff |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['band']} (mean {r['mean_tokens']}, max {r['max_tokens']}) | {r['variant']} | {r['batches']} | "
              f"{r['padding_waste']:.1%} | {r['prompts_per_s']} | {r['max_abs_diff_vs_first']:.1e} |" for r in rows]
    atomic_write_text(RESULTS / "scorer_batching.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
