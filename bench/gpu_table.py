"""The GPU kit's results table: bench/gpu.sh's output folder -> gpu.json and gpu.md.

    python3 bench/gpu_table.py OUT_DIR [--dest bench/results/gpu]

OUT_DIR (what bench/gpu.sh leaves in $OUT) holds ``rows.txt`` (one row name per line, in run order)
and per row ``NAME.status`` (ok | failed | skipped, then a note), ``NAME.args`` (the settings the row
adds to the baseline's), and ``NAME.summary.json`` (a training row: train_summary.json, or TRL's row
from bench/gpu_trl.py in the same fields) or ``NAME.metrics.json`` (a scoring row: metrics_test.json);
``gpu.txt`` names the GPU; ``model_config.json`` is the model's config.json. A scoring row may leave
``NAME.rankings.parquet`` (its rankings_test.parquet): merged-weights scores are then compared with the
4-bit + adapter ones user by user (``merged_vs_nf4``).

MFU = tokens/s x k x N / the GPU's dense bf16 peak, with N the parameters of the decoder layers
(every matmul weight a token passes through: attention and MLP projections; not the embedding, a
lookup, nor the head, which this project applies at the answer position only) and k = 6 with
gradient checkpointing (forward 2N, the forward again 2N, backward 2N: the frozen base needs only
activation gradients, not weight gradients) and 4 without. Attention's score/value products (~4 x
layers x positions x hidden per token) are left out, so MFU is a little understated. Tokens are
real (non-padding) prompt tokens; TRL's also count its completion (the letter and EOS).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

# Dense bf16 tensor-core peak (no sparsity), by the name nvidia-smi gives, first match wins.
PEAK_BF16_TFLOPS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4),
                    ("A100", 312.0), ("L40S", 362.0)]


def decoder_params(config: dict) -> int:
    """Matmul weights per decoder layer x layers: q, k, v, o and the gated MLP's three projections."""
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q = config["num_attention_heads"] * head_dim
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    attention = hidden * q + 2 * hidden * kv + q * hidden
    return layers * (attention + 3 * hidden * inter)


def peak_tflops(gpu_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in gpu_name), None)


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _checkpointing(summary: dict) -> bool:
    options = summary.get("memory_options") or {}
    value = options.get("gradient_checkpointing", summary.get("gradient_checkpointing"))
    return value in (True, "true")


def collect(out: Path) -> dict[str, Any]:
    gpu = (out / "gpu.txt").read_text().splitlines()[0].strip() if (out / "gpu.txt").is_file() else "unknown GPU"
    config = _read(out / "model_config.json")
    n = decoder_params(config) if config else None
    peak = peak_tflops(gpu)
    names = [line.strip() for line in (out / "rows.txt").read_text().splitlines() if line.strip()]
    rows = []
    for name in names:
        status_text = (out / f"{name}.status").read_text().strip() if (out / f"{name}.status").is_file() else "missing"
        status, _, note = status_text.partition(" ")
        args = (out / f"{name}.args").read_text().strip() if (out / f"{name}.args").is_file() else ""
        row: dict[str, Any] = {"name": name, "status": status, "note": note, "args": args}
        summary, metrics = _read(out / f"{name}.summary.json"), _read(out / f"{name}.metrics.json")
        if summary is not None and status == "ok":
            ckpt = _checkpointing(summary)
            tps = summary.get("tokens_per_s")
            options = summary.get("memory_options") or {}
            row.update({"kind": "train", "tokens_per_s": tps, "peak_memory_gib": summary.get("peak_memory_gib"),
                        "gradient_checkpointing": ckpt,
                        "quantization": options.get("quantization", summary.get("quantization")),
                        "padding_share": summary.get("padding_share"), "steps": summary.get("steps"),
                        "world_size": summary.get("world_size"), "backend": summary.get("backend"),
                        "loss_first_steps": summary.get("loss_first_steps"),
                        "loss_last_steps": summary.get("loss_last_steps"),
                        "compile_stats": summary.get("compile_stats")})
            if n and peak and tps:
                row["flops_per_token"] = f"{6 if ckpt else 4}N"
                row["mfu"] = round(tps * (6 if ckpt else 4) * n / (peak * 1e12), 4)
        elif metrics is not None and status == "ok":
            row.update({"kind": "score", "prompts_per_s": metrics.get("prompts_per_second"),
                        "peak_memory_gib": metrics.get("peak_memory_gib"),
                        "ndcg@10": (metrics.get("reranker") or {}).get("all_users", {}).get("ndcg@10"),
                        "users": (metrics.get("reranker") or {}).get("num_users")})
        rows.append(row)
    trl = next((r for r in rows if r["name"] == "trl" and r.get("tokens_per_s")), None)
    for row in rows:
        if trl and row.get("kind") == "train" and row["name"] != "trl" and row.get("tokens_per_s"):
            row["vs_trl_tokens_per_s"] = round(row["tokens_per_s"] / trl["tokens_per_s"], 3)
            if row.get("peak_memory_gib") and trl.get("peak_memory_gib"):
                row["vs_trl_peak_memory"] = round(row["peak_memory_gib"] / trl["peak_memory_gib"], 3)
    merged, nf4 = out / "score_merged.rankings.parquet", out / "score_nf4.rankings.parquet"
    return {"bench": "gpu", "when": time.strftime("%Y-%m-%d %H:%M:%S"), "gpu": gpu,
            "decoder_params": n, "peak_bf16_tflops": peak,
            "merged_vs_nf4": score_difference(nf4, merged) if merged.is_file() and nf4.is_file() else None,
            "mfu_formula": "tokens/s x k x N / peak; N = decoder-layer matmul parameters, k = 6 with gradient "
                           "checkpointing, 4 without",
            "rows": rows}


def score_difference(reference: Path, other: Path) -> dict[str, Any]:
    """Two scorings of the same prompts (rankings_test.parquet), user by user: the largest and the mean
    absolute difference of the LLM's label scores, and the share of users whose order of the candidates
    by those scores is the same, whole and at the top. Users are matched by (user, prefix_len); their
    candidate lists must be equal."""
    import numpy as np
    import pandas as pd

    keys = ["user", "prefix_len"]
    a, b = (pd.read_parquet(p, columns=[*keys, "candidates", "scores"]) for p in (reference, other))
    both = a.merge(b, on=keys, suffixes=("_a", "_b"), validate="one_to_one")
    if len(both) != len(a) or len(both) != len(b):
        raise ValueError(f"{other}: {len(b)} users against {len(a)} in {reference}, {len(both)} in common; "
                         f"expected the same users")
    if not all(np.array_equal(x, y) for x, y in zip(both["candidates_a"], both["candidates_b"])):
        raise ValueError(f"{other}: candidate lists differ from {reference}'s; expected the same prompts")
    sa, sb = np.stack(both["scores_a"]), np.stack(both["scores_b"])  # (users, K)
    order_a, order_b = (np.argsort(-s, axis=1, kind="stable") for s in (sa, sb))
    diff = np.abs(sa - sb)
    return {"users": len(both), "max_abs_score_diff": float(diff.max()), "mean_abs_score_diff": float(diff.mean()),
            "same_order_share": float((order_a == order_b).all(axis=1).mean()),
            "same_top1_share": float((order_a[:, 0] == order_b[:, 0]).mean())}


def _fmt(value: Any, spec: str = "") -> str:
    if value is None or value == "":
        return "-"
    return format(value, spec) if spec else str(value)


def markdown(result: dict) -> str:
    lines = [f"# GPU speed: {result['gpu']}\n",
             f"Written by `bench/gpu_table.py` from one `bash bench/gpu.sh` run ({result['when']}). Training: random-weight "
             f"Qwen3-4B on ml-latest-small prompts, one GPU; each row is the baseline (NF4, bf16 autocast, gradient "
             f"checkpointing, micro-batch 4, batch 16, LoRA r=16 on q/k/v/o in every layer) with the settings in *adds* changed. "
             f"Tokens/s: real (non-padding) tokens, the first step left out. MFU: {result['mfu_formula']} "
             f"(N = {_fmt(result['decoder_params'], ',')}, peak {_fmt(result['peak_bf16_tflops'])} TFLOP/s dense bf16).\n",
             "| row | adds | status | tokens/s | vs TRL | MFU | FLOPs/token | peak GiB | vs TRL memory | checkpointing | "
             "quantization | padding | loss first -> last |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r.get("kind") == "score":
            continue
        loss = (f"{r['loss_first_steps']:.3f} -> {r['loss_last_steps']:.3f}"
                if r.get("loss_first_steps") is not None and r.get("loss_last_steps") is not None else "-")
        lines.append(f"| {r['name']} | {r['args'] or '-'} | {r['status']}{(': ' + r['note']) if r['note'] else ''} | "
                     f"{_fmt(r.get('tokens_per_s'), ',.0f')} | {_fmt(r.get('vs_trl_tokens_per_s'), '.2f')} | "
                     f"{_fmt(r.get('mfu'), '.1%')} | {_fmt(r.get('flops_per_token'))} | {_fmt(r.get('peak_memory_gib'))} | "
                     f"{_fmt(r.get('vs_trl_peak_memory'), '.2f')} | {_fmt(r.get('gradient_checkpointing'))} | "
                     f"{_fmt(r.get('quantization'))} | {_fmt(r.get('padding_share'), '.2%')} | {loss} |")
    scores = [r for r in result["rows"] if r.get("kind") == "score" or r["name"].startswith("score")]
    if scores:
        lines += ["", "| scorer | adds | status | prompts/s | peak GiB | users | NDCG@10 |", "|---|---|---|---|---|---|---|"]
        for r in scores:
            lines.append(f"| {r['name']} | {r['args'] or '-'} | {r['status']}{(': ' + r['note']) if r['note'] else ''} | "
                         f"{_fmt(r.get('prompts_per_s'), '.1f')} | {_fmt(r.get('peak_memory_gib'))} | "
                         f"{_fmt(r.get('users'))} | {_fmt(r.get('ndcg@10'), '.4f')} |")
    diff = result.get("merged_vs_nf4")
    if diff:
        lines += ["", f"Merged 16-bit weights against 4-bit + adapter, the same {diff['users']} users: label scores "
                      f"differ by at most {diff['max_abs_score_diff']:.4f} (mean {diff['mean_abs_score_diff']:.4f}); "
                      f"the same candidate order for {diff['same_order_share']:.1%} of users, the same first "
                      f"candidate for {diff['same_top1_share']:.1%}."]
    compiled = [r for r in result["rows"] if r.get("compile_stats")]
    if compiled:
        lines += ["", "torch.compile: " + "; ".join(f"{r['name']} {r['compile_stats']['graphs']} graphs, "
                                                    f"{r['compile_stats']['graph_breaks']} graph breaks" for r in compiled)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="bench/gpu.sh's output folder ($OUT)")
    parser.add_argument("--dest", default="", help="write gpu.json and gpu.md here (default: OUT itself)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not (out / "rows.txt").is_file():
        print(f"error: {out}/rows.txt: not found; expected bench/gpu.sh's output folder", file=sys.stderr)
        return 2
    result = collect(out)
    dest = Path(args.dest) if args.dest else out
    dest.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu.json", json.dumps(result, indent=2) + "\n"), ("gpu.md", markdown(result))):
        tmp = dest / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(dest / name)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
