"""Scoring throughput: the project's batched scorer against a naive one-prompt-at-a-time loop.

    .venv/bin/python bench/scorer_throughput.py --threads 1 --adapter runs/default/ranker/best
    .venv/bin/python bench/scorer_throughput.py --threads 1 --prompts 16 --rounds 1 --tag ideas \\
        --adapter runs/default/ranker/best \\
        --variants ours:bs8:intkeep,ours:bs1,ours:bs1:intkeep,ours:bs4,ours:bs16,ours:bs1:float32,ours:bs8:float32,naive:float32

* **ours**: ``rerank_dist.score.score_prompts`` with the project's scoring Accelerator on CPU and
  the config's ``score.batch_size``: length-sorted batches, left padding, one forward per batch
  with ``logits_to_keep=1``, the K label logits at the answer position (``label_logits``,
  projected in float32).
* **naive**: one prompt at a time, a full forward with full logits (``(1, L, V)``, no
  ``logits_to_keep``, no KV cache), log-softmax over the vocabulary at the last position, the K
  label tokens picked from it.

Both use the same model object (``load_for_scoring`` with ``--adapter``, else the base model
from ``load_model``) in the config's ``model.dtype`` (``--dtype`` overrides), in eval mode under
``torch.no_grad``, on the first ``--prompts`` test prompts of the run (built as ``score_split``
builds them). Variants run in rotating order inside each of ``--rounds`` rounds, in one process,
so load from other processes falls on all of them alike.

Rankings: each variant's per-row order of the K candidates (descending score, stable argsort) is
compared with the naive loop's in the same dtype. The naive scores are log-probabilities computed
from the head's own (e.g. bfloat16) logits, whose rounding can tie candidates that our float32
projection separates, so rows that differ are split into "only inside naive's ties" and "a strict
inversion". Score differences are reported on the label logits (naive: the head's logits before
the log-softmax, which only shifts a row).

Results: bench/results/scorer_throughput.json and a table in bench/results/scorer_throughput.md
(``--tag ideas``: scorer_throughput_ideas.{json,md}, for the variant sweep).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench" / "results"


def parse_variant(text: str) -> dict[str, Any]:
    """'ours:bs8', 'ours:bs16:float32', 'naive', 'naive:float32', 'ours:bs8:compile' -> a dict."""
    parts = text.strip().split(":")
    if parts[0] not in ("ours", "naive"):
        raise argparse.ArgumentTypeError(f"variant {text!r}: starts with ours or naive")
    v: dict[str, Any] = {"name": text.strip(), "kind": parts[0], "batch_size": None, "dtype": None, "compile": False,
                         "intkeep": False}
    for p in parts[1:]:
        if p.startswith("bs"):
            v["batch_size"] = int(p[2:])
        elif p in ("float32", "bfloat16", "float16"):
            v["dtype"] = p
        elif p == "compile":
            v["compile"] = True
        elif p == "intkeep":
            v["intkeep"] = True
        else:
            raise argparse.ArgumentTypeError(f"variant {text!r}: unknown part {p!r}")
    return v


class IntKeep:
    """The model as label_logits called it before it passed the answer position as an index tensor:
    ``logits_to_keep=1`` (the 'intkeep' variant, to measure that change). label_logits finds the head
    through ``.module``, as it does through a DDP wrapper."""

    def __init__(self, model) -> None:
        self.module = model

    def __call__(self, **kwargs):
        return self.module(**{**kwargs, "logits_to_keep": 1})

    def __getattr__(self, name):  # training / eval() / train() / dtype
        return getattr(self.module, name)


def naive_scores(model, token_lists: list[list[int]], label_ids, show: bool) -> tuple[np.ndarray, np.ndarray]:
    """(log-probs (N, K), the head's label logits (N, K)): one prompt per forward, full logits."""
    import torch

    logp, raw = [], []
    with torch.no_grad():
        for n, tokens in enumerate(token_lists):
            ids = torch.tensor([tokens], dtype=torch.long)  # (1, L)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits  # (1, L, V)
            last = logits[0, -1].float()  # (V,)
            logp.append(last.log_softmax(-1)[label_ids].numpy())
            raw.append(last[label_ids].numpy())
            if show and (n + 1) % 16 == 0:
                print(f"    naive {n + 1}/{len(token_lists)}", flush=True)
    return np.stack(logp), np.stack(raw)


def compare_rankings(ours: np.ndarray, naive: np.ndarray, naive_raw: np.ndarray) -> dict[str, Any]:
    """How the per-row candidate orders of ours and naive agree (see the module docstring)."""
    a = np.argsort(-ours, axis=1, kind="stable")
    b = np.argsort(-naive, axis=1, kind="stable")
    differ = ~(a == b).all(axis=1)
    strict = 0
    for row in np.flatnonzero(differ):
        o, n = ours[row], naive[row]
        # a strict inversion: ours orders i above j strictly while naive orders j above i strictly
        if ((o[:, None] > o[None, :]) & (n[:, None] < n[None, :])).any():
            strict += 1
    ties = lambda s: int(sum(len(np.unique(r)) < len(r) for r in s))  # noqa: E731
    return {"rows": int(len(ours)), "rows_identical": int((~differ).sum()), "rows_differing": int(differ.sum()),
            "rows_differing_with_strict_inversion": strict,
            "rows_differing_only_within_naive_ties": int(differ.sum()) - strict,
            "rows_with_ties_ours": ties(ours), "rows_with_ties_naive": ties(naive),
            "top1_agree": int((a[:, 0] == b[:, 0]).sum()),
            "max_abs_logit_diff": float(np.abs(ours - naive_raw).max()),
            "max_abs_centered_diff": float(np.abs((ours - ours.mean(1, keepdims=True))
                                                  - (naive - naive.mean(1, keepdims=True))).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/smollm2_cpu.yaml")
    parser.add_argument("--run-dir", default="runs/default",
                        help="prepared run directory: data/ and retriever/candidates_test.parquet are read")
    parser.add_argument("--adapter", default="",
                        help="PEFT adapter directory (e.g. RUN/ranker/best); else the base model")
    parser.add_argument("--dtype", default=None, help="override model.dtype (default: the config's, auto resolved)")
    parser.add_argument("--prompts", type=int, default=48, help="first N test prompts")
    parser.add_argument("--batch-size", type=int, default=0, help="ours' batch size (default: score.batch_size)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; every variant scores all prompts once per round")
    parser.add_argument("--variants", default="",
                        help="comma-separated extra variants, e.g. ours:bs16,ours:bs8:float32,naive:float32,"
                             "ours:bs8:compile (torch.compile, dynamic shapes), ours:bs8:intkeep (logits_to_keep=1 "
                             "as label_logits passed it before); ours and naive always run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--tag", default="", help="results go to scorer_throughput_TAG.{json,md} (e.g. ideas)")
    args = parser.parse_args()

    import torch

    from rerank_dist.hardware import resolve_dtype
    from rerank_dist.io import atomic_write_text, read_json, write_json
    from train_throughput import environment, load_run

    env = environment(args.threads)
    print(f"cpu {env['cpu_capability']}, {env['torch_threads']} torch threads, load {env['loadavg_start']}", flush=True)
    cfg, tokenizer, examples, token_lists = load_run(args.config, args.run_dir, args.dtype, split="test")
    examples, token_lists = examples[:args.prompts], token_lists[:args.prompts]
    batch_size = args.batch_size or cfg.score.batch_size
    base_dtype = resolve_dtype(cfg.model.dtype)[0]
    variants = [parse_variant(f"ours:bs{batch_size}"), parse_variant("naive")]
    for text in filter(None, args.variants.split(",")):
        v = parse_variant(text)
        if v["kind"] == "ours" and v["batch_size"] is None:
            v["batch_size"] = batch_size
        v["dtype"] = v["dtype"] or base_dtype
        canon = f"{v['kind']}" + (f":bs{v['batch_size']}" if v["kind"] == "ours" else "") + \
            ("" if v["dtype"] == base_dtype else f":{v['dtype']}") + (":compile" if v["compile"] else "") + \
            (":intkeep" if v["intkeep"] else "")
        if canon not in [x["name"] for x in variants]:
            variants.append({**v, "name": canon})
    for v in variants:
        v["dtype"] = v["dtype"] or base_dtype
    if args.adapter:
        verbalizer = read_json(Path(args.adapter) / "verbalizer.json")
        label_ids_list = verbalizer["label_ids"]
    else:
        from rerank_dist.config import labels_for
        from rerank_dist.verbalizer import verify_label_ids

        label_ids_list = verify_label_ids(tokenizer, [examples[0].prompt, examples[-1].prompt], labels_for(cfg))
    label_ids = torch.tensor(label_ids_list, dtype=torch.long)
    print(f"{len(token_lists)} test prompts, mean {statistics.mean(map(len, token_lists)):.0f} tokens "
          f"(max {max(map(len, token_lists))}); variants: {', '.join(v['name'] for v in variants)}", flush=True)

    from rerank_dist.distributed import build_accelerator
    from rerank_dist.score import score_prompts

    accelerator = build_accelerator(cfg)

    models: dict[tuple[str, bool], Any] = {}

    def model_for(dtype: str, compiled: bool):
        if (dtype, False) not in models:
            from rerank_dist.modeling import load_for_scoring, load_model

            mcfg = type(cfg.model)(**{**cfg.model.__dict__, "dtype": dtype})
            models[(dtype, False)] = (load_for_scoring(mcfg, Path(args.adapter), device=accelerator.device)
                                      if args.adapter else load_model(mcfg, training=False, device=accelerator.device))
        if compiled and (dtype, True) not in models:
            models[(dtype, True)] = torch.compile(models[(dtype, False)], dynamic=True)
        return models[(dtype, compiled)]

    def run(v) -> tuple[np.ndarray, np.ndarray | None]:
        model = model_for(v["dtype"], v["compile"])
        if v["intkeep"]:
            model = IntKeep(model)
        if v["kind"] == "naive":
            return naive_scores(model, token_lists, label_ids, show=True)
        return score_prompts(accelerator, model, token_lists, label_ids, tokenizer.pad_token_id, v["batch_size"]), None

    for v in variants:  # load (and compile) outside the timed rounds; one untimed warm-up prompt each
        model_for(v["dtype"], v["compile"])
        started = time.perf_counter()
        if v["kind"] == "naive":
            naive_scores(model_for(v["dtype"], v["compile"]), token_lists[:1], label_ids, show=False)
        else:
            score_prompts(accelerator, model_for(v["dtype"], v["compile"]), token_lists[:v["batch_size"]], label_ids,
                          tokenizer.pad_token_id, v["batch_size"])
        v["warmup_s"] = round(time.perf_counter() - started, 2)
        v["seconds"], v["scores"] = [], None

    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]  # rotate who goes first
        for v in order:
            print(f"round {r + 1}/{args.rounds}: {v['name']} ...", flush=True)
            started = time.perf_counter()
            scores, raw = run(v)
            v["seconds"].append(time.perf_counter() - started)
            v["scores"], v["raw"] = scores, raw
            print(f"round {r + 1}/{args.rounds}: {v['name']} {len(token_lists) / v['seconds'][-1]:.3f} prompts/s "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)

    naive_by_dtype = {v["dtype"]: v for v in variants if v["kind"] == "naive"}
    rows = []
    for v in variants:
        total = sum(v["seconds"])
        entry = {"variant": v["name"], "kind": v["kind"], "batch_size": v["batch_size"], "dtype": v["dtype"],
                 "compile": v["compile"], "logits_to_keep": "int 1 (before)" if v["intkeep"] else "index tensor",
                 "round_seconds": [round(s, 2) for s in v["seconds"]],
                 "warmup_s": v["warmup_s"], "prompts_per_s": round(len(token_lists) * len(v["seconds"]) / total, 4)}
        ref = naive_by_dtype.get(v["dtype"])
        if v["kind"] == "ours" and ref is not None:
            entry["rankings_vs_naive_same_dtype"] = compare_rankings(v["scores"], ref["scores"], ref["raw"])
        rows.append(entry)
    by = {e["variant"]: e for e in rows}
    main_ours, main_naive = by[variants[0]["name"]], by["naive"]
    paired = [n / o for o, n in zip(variants[0]["seconds"], variants[1]["seconds"])]
    for e in rows:
        e["speedup_vs_naive"] = round(e["prompts_per_s"] / main_naive["prompts_per_s"], 3)
    dtype = resolve_dtype(cfg.model.dtype)
    result = {"bench": "scorer_throughput", "when": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
              "environment": {**env, "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
              "setup": {"model": cfg.model.name_or_path, "adapter": args.adapter or None, "dtype": dtype[0],
                        "dtype_reason": dtype[1], "prompts": len(token_lists),
                        "mean_tokens": round(statistics.mean(map(len, token_lists)), 1),
                        "max_tokens": max(map(len, token_lists)), "score_batch_size": batch_size,
                        "rounds": args.rounds, "labels": len(label_ids_list)},
              "ours_prompts_per_s": main_ours["prompts_per_s"], "naive_prompts_per_s": main_naive["prompts_per_s"],
              "ratio": main_ours["speedup_vs_naive"],
              "ratio_per_round": [round(x, 3) for x in paired],
              "rankings": main_ours["rankings_vs_naive_same_dtype"],
              "target": ">= 2x the naive loop with identical rankings", "variants": rows}
    out = Path(args.out_dir)
    stem = "scorer_throughput" + (f"_{args.tag}" if args.tag else "")
    write_json(out / f"{stem}.json", result)
    md = ["# Scoring throughput: rerank_dist's batched scorer vs a naive loop\n",
          f"bench/scorer_throughput.py, {result['when']}; `{result['command']}`\n",
          f"SmolLM2-135M-Instruct{' + adapter ' + args.adapter if args.adapter else ' (base)'}, "
          f"{len(token_lists)} test prompts (mean {result['setup']['mean_tokens']} tokens), {args.rounds} round(s); "
          f"CPU {env['cpu_capability']}, {env['torch_threads']} torch thread(s), load average (1 min) "
          f"{env['loadavg_start'][0]} at start, {result['environment']['loadavg_end'][0]} at end. "
          f"The target: >= 2x with identical rankings.\n",
          "| variant | dtype | prompts/s | vs naive | rows identical / differing (strict inversions) | "
          "rows with ties ours / naive | max abs logit diff |",
          "|---|---|---|---|---|---|---|"]
    for e in rows:
        c = e.get("rankings_vs_naive_same_dtype")
        cmp = (f"{c['rows_identical']} / {c['rows_differing']} ({c['rows_differing_with_strict_inversion']})",
               f"{c['rows_with_ties_ours']} / {c['rows_with_ties_naive']}", f"{c['max_abs_logit_diff']:.4g}") \
            if c else ("", "", "")
        md.append(f"| {e['variant']} | {e['dtype']} | {e['prompts_per_s']} | {e['speedup_vs_naive']}x | "
                  + " | ".join(cmp) + " |")
    atomic_write_text(out / f"{stem}.md", "\n".join(md) + "\n")
    rk = result["rankings"]
    print(f"ours {result['ours_prompts_per_s']} prompts/s, naive {result['naive_prompts_per_s']} prompts/s: "
          f"{result['ratio']}x; rankings identical in {rk['rows_identical']}/{rk['rows']} rows "
          f"({rk['rows_differing_with_strict_inversion']} with a strict inversion), max abs logit diff "
          f"{rk['max_abs_logit_diff']:.4g}; results in {out}/{stem}.json", flush=True)


if __name__ == "__main__":
    main()
