"""LlamaRec's training set at four sizes: every stage up to the first optimizer step, at 1 and 2 processes.

    python bench/scale.py                                      # every shape, 1 and 2 processes
    python bench/scale.py --shapes ml-latest-small,ml-100k --processes 1
    python bench/scale.py --shapes ml-1m --processes 2 --keep --work /tmp/scale

Synthetic data shaped like ml-latest-small (LlamaRec's "ML-100k"), ML-100K, ML-1M and 10x ML-1M
(users, items and mean sequence length from LlamaRec's Table 2 and the MovieLens releases), written as
a table and run through the real stages with LlamaRec's recipe for the training set
(retriever.train_prefixes_per_user=0: every prefix; random negatives; no training candidates):

* ``prepare``: the data stage (one process);
* ``retrieve``: LRURec (one epoch, a small one: its quality is not measured here) and the
  validation/test candidates;
* ``train_build``: the train stage up to its first optimizer step with a tiny random Llama that has
  SmolLM2-135M's real tokenizer (so tokenising costs what it costs): building and tokenising every
  example into the store, then one step;
* ``train_reopen``: the same again on the finished store (a resume or a requeue): it is opened, not
  built;
* ``model_only``: a process that imports the stack and loads the tokenizer and the tiny model, the
  baseline the "above the model" figures subtract.

Each stage runs in a child process; its wall time and the peak resident memory of its largest
process (``ru_maxrss`` of the waited-for descendants: the workers under torchrun) are recorded, with
the build and reopen times the train stage prints. Results: bench/results/scale.json (one row per
shape, process count and stage), scale.md and scale.png, with the growth exponent of time and
memory over the number of examples (log-log slope).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"

# users, items, interactions (mean length = interactions / users): LlamaRec Table 2 for ML-100k
# (ml-latest-small); the MovieLens 100K and 1M releases.
SHAPES = {
    "ml-latest-small": (610, 3_650, 90_274),
    "ml-100k": (943, 1_682, 100_000),
    "ml-1m": (6_040, 3_706, 1_000_209),
    "10x-ml-1m": (60_400, 3_706, 10_002_090),
}
WORDS = ("the night love story man last world time war city house dark king blue life day girl dead "
         "american return star secret lost great little big game blood dream summer black heart").split()


def generate(shape: str, out: Path, seed: int = 0) -> dict:
    """interactions.parquet + titles.parquet shaped like `shape` (lengths skewed as real logs are)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    users, items, interactions = SHAPES[shape]
    rng = np.random.default_rng(seed)
    mean = interactions / users
    # Lognormal lengths with the real mean, at least 20 (MovieLens keeps users with 20+ ratings).
    lengths = np.maximum(20, rng.lognormal(math.log(mean) - 0.5, 1.0, users)).astype(np.int64)
    lengths = np.minimum(np.round(lengths * interactions / lengths.sum()).astype(np.int64), items - 25)
    lengths = np.maximum(lengths, 20)
    popularity = 1.0 / np.arange(1, items + 1) ** 0.8
    popularity /= popularity.sum()
    user_col, item_col, stamp_col = [], [], []
    for u, n in enumerate(lengths, start=1):
        chosen = rng.choice(items, size=int(n), replace=False, p=popularity) + 1
        user_col.append(np.full(n, u))
        item_col.append(chosen)
        stamp_col.append(1_000_000_000 + np.sort(rng.integers(0, 10**8, n)))
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"user_id": np.concatenate(user_col), "item_id": np.concatenate(item_col),
                             "timestamp": np.concatenate(stamp_col)}), out / "interactions.parquet")
    words = rng.integers(0, len(WORDS), size=(items, 4))
    sizes = rng.integers(1, 5, size=items)
    titles = [" ".join(WORDS[w] for w in row[:k]).title() + f" ({1950 + i % 70})"
              for i, (row, k) in enumerate(zip(words, sizes))]
    pq.write_table(pa.table({"item_id": np.arange(1, items + 1), "title": titles}), out / "titles.parquet")
    return {"users": users, "items": items, "interactions": int(lengths.sum())}


def tiny_model(out: Path) -> Path:
    """A 2-layer random Llama with SmolLM2-135M's tokenizer (its real vocabulary and merges)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rerank_dist.config import ModelConfig
    from rerank_dist.modeling import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig())
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# The child that measures one command: its wall time and the largest peak RSS among its descendants.
_MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
r = subprocess.run(sys.argv[2:], stdout=open(sys.argv[1], "w"), stderr=subprocess.STDOUT)
print(json.dumps({"rc": r.returncode, "wall_s": time.perf_counter() - t,
                  "peak_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def measure(cmd: list[str], log: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(log), *cmd], capture_output=True, text=True, env=env,
                         cwd=REPO)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"]:
        sys.exit(f"{' '.join(cmd)} failed (exit {result['rc']}); see {log}:\n" + log.read_text()[-3000:])
    return result


def overrides(run_dir: Path, raw: Path, model: Path) -> list[str]:
    return [f"run_dir={run_dir}", "data.source=local", "data.dataset=custom", "data.format=table",
            f"data.raw_dir={raw}", "data.interactions_file=interactions.parquet", "data.titles_file=titles.parquet",
            # LlamaRec's training set: every prefix, random negatives, shuffled, no training candidates.
            "retriever.train_prefixes_per_user=0", "retriever.train_candidates=none", "prompt.negatives=random",
            "prompt.train_order=shuffled", "prompt.history_items=20", "prompt.max_train_examples=0",
            "retriever.max_epochs=1", "retriever.max_minutes=0", "retriever.embed_dim=16",
            f"model.name_or_path={model}", "model.dtype=float32", "model.lora_layers=0",
            "train.batch_size=4", "train.micro_batch_size=2", "train.max_steps=1", "train.eval_every=1",
            "train.eval_users=8", "train.save_every=0", "train.save_every_minutes=0", "train.max_minutes=0"]


def stage_cmd(stage: str, processes: int, args: list[str]) -> list[str]:
    if stage == "prepare":
        return [sys.executable, "-m", "rerank_dist.cli", "prepare", *args]
    return [sys.executable, "-m", "rerank_dist.cli", "launch", "--nproc-per-node", str(processes), stage, *args]


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def run_shape(shape: str, processes: int, work: Path, model: Path, keep: bool) -> list[dict]:
    raw = work / shape / "raw"
    if not (raw / "titles.parquet").is_file():
        generate(shape, raw)
    run_dir = work / shape / f"run-{processes}p"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = overrides(run_dir, raw, model)
    rows = []
    for stage in ("prepare", "retrieve", "train_build", "train_reopen"):
        if stage == "train_reopen":
            shutil.rmtree(run_dir / "ranker")  # a new training on the finished store: opened, not built
        log = work / shape / f"{stage}-{processes}p.log"
        print(f"[scale] {shape}, {processes} process(es): {stage} ...", flush=True)
        result = measure(stage_cmd(stage.split("_")[0], processes, args), log)
        text = log.read_text()
        row = {"shape": shape, "processes": processes, "stage": stage, "wall_s": round(result["wall_s"], 1),
               "peak_rss_gb_per_process": round(result["peak_rss_kb"] / 2**20, 3),
               # the machine's 1-minute load average when the stage ended: 2 cores are busy at 2.0
               "load_1min": round(os.getloadavg()[0], 2), "commit": _commit()}
        built = re.search(r"examples: ([\d,]+) built in (\d+) s", text)
        reused = re.search(r"examples: reusing .* \(([\d,]+) rows, opened in ([\d.]+) s\)", text)
        if built:
            row["build_s"] = int(built.group(2))
        if reused:
            row["reopen_s"] = float(reused.group(2))
        rows.append(row)
        print(f"[scale]   {row}", flush=True)
    meta = json.loads((run_dir / "data" / "meta.json").read_text())
    store_meta = json.loads((run_dir / "examples" / "train" / "meta.json").read_text())
    size = sum(f.stat().st_size for f in (run_dir / "examples" / "train").glob("part-*.arrow"))
    for row in rows:
        row.update(users=meta["num_users"], items=meta["num_items"], interactions=meta["num_interactions"],
                   examples=store_meta["rows"], store_gb=round(size / 2**30, 2))
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return rows


def model_only(model: Path, work: Path) -> dict:
    code = ("from rerank_dist.config import ModelConfig; from rerank_dist.modeling import load_model, load_tokenizer; "
            "import accelerate, datasets, torch; "
            f"c = ModelConfig(name_or_path={str(model)!r}, dtype='float32', lora_layers=0); "
            "load_tokenizer(c); load_model(c, training=True, device=torch.device('cpu'))")
    result = measure([sys.executable, "-c", code], work / "model_only.log")
    return {"shape": "-", "processes": 1, "stage": "model_only", "wall_s": round(result["wall_s"], 1),
            "peak_rss_gb_per_process": round(result["peak_rss_kb"] / 2**20, 3), "examples": 0}


def slope(xs: list[float], ys: list[float]) -> float | None:
    pairs = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pairs) < 2:
        return None
    return round(float(np.polyfit(*zip(*pairs), 1)[0]), 3)


def write_results(rows: list[dict], baseline: dict, cpu: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for row in rows:  # only the train stages load the model; each row against its own run's baseline
        row.setdefault("model_only_gb", baseline["peak_rss_gb_per_process"])
        row["above_model_gb"] = (round(row["peak_rss_gb_per_process"] - row["model_only_gb"], 3)
                                 if row["stage"].startswith("train") else None)
    growth = {}
    for processes in sorted({r["processes"] for r in rows}):
        for stage in ("train_build", "train_reopen"):
            sel = sorted((r for r in rows if r["processes"] == processes and r["stage"] == stage),
                         key=lambda r: r["examples"])
            key = "build_s" if stage == "train_build" else "reopen_s"
            growth[f"{stage}/{processes}p"] = {
                "time_exponent": slope([r["examples"] for r in sel], [r.get(key, r["wall_s"]) for r in sel]),
                "stage_wall_exponent": slope([r["examples"] for r in sel], [r["wall_s"] for r in sel]),
                "rss_above_model_exponent": slope([r["examples"] for r in sel],
                                                  [max(r["above_model_gb"] or 0, 1e-3) for r in sel])}
    report = {"cpu_capability": cpu, "cpus": len(os.sched_getaffinity(0)), "baseline": baseline, "rows": rows,
              "growth": growth, "date": time.strftime("%Y-%m-%d")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# LlamaRec's every-prefix training set at scale ({report['cpus']} cores, {cpu})", "",
             "`python bench/scale.py`: synthetic data shaped like each dataset, LlamaRec's training set (every "
             "prefix, random negatives), a tiny random Llama with SmolLM2-135M's tokenizer, every stage up to the "
             "first optimizer step. Peak RSS is the largest process's; 'above model' subtracts a process that "
             "only loads the stack, tokenizer and model, measured in the same invocation (`model_only_gb` in the JSON; "
             f"{baseline['peak_rss_gb_per_process']:.2f} GB in the latest). 'load' is the 1-minute load average as the "
             "stage ended (other work on the machine slows the wall times); `commit` in the JSON says which code "
             "measured each row.", "",
             "| shape | examples | processes | stage | wall s | build s | reopen s | peak RSS GB/process | above model GB | store GB | load |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['examples']:,} | {r['processes']} | {r['stage']} | {r['wall_s']} | "
                     f"{r.get('build_s', '')} | {r.get('reopen_s', '')} | {r['peak_rss_gb_per_process']:.2f} | "
                     f"{'' if r['above_model_gb'] is None else format(r['above_model_gb'], '.2f')} | {r.get('store_gb', '')} | "
                     f"{r.get('load_1min', '')} |")
    lines += ["", "Growth over the number of examples (log-log slope; 1 = linear):", ""]
    lines += [f"- {k}: build/reopen time {v['time_exponent']}, stage wall time {v['stage_wall_exponent']}, "
              f"RSS above the model {v['rss_above_model_exponent']}" for k, v in growth.items()]
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for processes in sorted({r["processes"] for r in rows}):
        for stage, marker in (("train_build", "o"), ("train_reopen", "s"), ("retrieve", "^")):
            sel = sorted((r for r in rows if r["processes"] == processes and r["stage"] == stage),
                         key=lambda r: r["examples"])
            if not sel:
                continue
            xs = [r["examples"] for r in sel]
            ax_t.plot(xs, [r["wall_s"] for r in sel], marker=marker, label=f"{stage}, {processes}p")
            ax_m.plot(xs, [r["peak_rss_gb_per_process"] for r in sel], marker=marker, label=f"{stage}, {processes}p")
    for ax, title in ((ax_t, "stage wall time (s)"), (ax_m, "peak RSS per process (GB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training examples (every prefix)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_m.axhline(baseline["peak_rss_gb_per_process"], color="gray", ls=":", label="model only")
    ax_m.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "scale.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--work", default="runs/scale")
    parser.add_argument("--keep", action="store_true", help="keep each run directory (the stores are large)")
    parser.add_argument("--merge", action="store_true", help="add to bench/results/scale.json's rows instead of "
                                                             "replacing them (same shape and processes: replaced)")
    args = parser.parse_args()
    import torch

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = tiny_model(work / "tiny-llama-smollm2-tokenizer")
    baseline = model_only(model, work)
    rows: list[dict] = []
    if args.merge and (RESULTS / "scale.json").is_file():
        rows = json.loads((RESULTS / "scale.json").read_text())["rows"]
    for shape in args.shapes.split(","):
        for processes in map(int, args.processes.split(",")):
            new = run_shape(shape, processes, work, model, args.keep)
            for row in new:
                row["model_only_gb"] = baseline["peak_rss_gb_per_process"]
            rows = [r for r in rows if (r["shape"], r["processes"]) != (shape, processes)] + new
            rows.sort(key=lambda r: (r["examples"], r["processes"], r["stage"]))
            write_results(rows, baseline, str(torch.backends.cpu.get_cpu_capability()))
    print((RESULTS / "scale.md").read_text())


if __name__ == "__main__":
    main()
