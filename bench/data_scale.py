"""Scale check of the data stage: prepare a synthetic log of 10 million interactions.

    python bench/data_scale.py                       # 10M interactions, integer ids
    python bench/data_scale.py --text-ids            # ids like Amazon's ("A1B2C3...", "B000...")
    python bench/data_scale.py --interactions 1000000 --keep --workdir /tmp/scale

Writes an interactions CSV (user, item, timestamp) and a titles CSV into a work directory, then runs
the data stage on them (data.source=local, data.format=table) in a child process, and reports its
time and peak resident memory, then the time (and the child's overall peak) of reading the result
back into Python lists (load_dataset), as the retriever stage does.
User activity and item popularity are skewed (a few heavy users and hit items, a long tail), so the
5-core filter has work to do, as on real logs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv


def generate(workdir: Path, n: int, users: int, items: int, text_ids: bool, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    # Skewed draws: u**2 and u**3 of a uniform u put most mass on low ids (heavy users, hit items).
    user = (users * rng.random(n) ** 2).astype(np.int64)
    item = (items * rng.random(n) ** 3).astype(np.int64)
    stamp = rng.integers(1_300_000_000, 1_700_000_000, n)
    user_col, item_col, title_ids = pa.array(user), pa.array(item), pa.array(np.arange(items))
    if text_ids:  # Amazon-like text ids: every id a string, preprocessing hashes text
        user_col = pc.binary_join_element_wise("A", pc.cast(user_col, pa.string()), "XZ", "")
        item_col = pc.binary_join_element_wise("B00", pc.cast(item_col, pa.string()), "")
        title_ids = pc.binary_join_element_wise("B00", pc.cast(title_ids, pa.string()), "")
    pcsv.write_csv(pa.table({"user_id": user_col, "item_id": item_col, "timestamp": pa.array(stamp)}),
                   workdir / "interactions.csv")
    titles = pc.binary_join_element_wise("Product ", pc.cast(pa.array(np.arange(items)), pa.string()),
                                         " (deluxe edition)", "")
    pcsv.write_csv(pa.table({"item_id": title_ids, "title": titles}), workdir / "titles.csv")
    return {"generate_s": round(time.perf_counter() - started, 1),
            "csv_mb": round((workdir / "interactions.csv").stat().st_size / 1e6, 1)}


def child(workdir: Path) -> None:
    """Runs in the measured process: the data stage, then reading its output back."""
    from rerank_dist.config import DataConfig
    from rerank_dist.data import load_dataset, prepare_data

    cfg = DataConfig(source="local", dataset="custom", format="table", raw_dir=str(workdir),
                     interactions_file="interactions.csv", titles_file="titles.csv")
    started = time.perf_counter()
    meta = prepare_data(cfg, workdir / "data", workdir / "cache", log=lambda m: print(m, file=sys.stderr))
    prepared = time.perf_counter()
    # ru_maxrss: kilobytes on Linux; the peak so far, i.e. of the data stage alone.
    prepare_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dataset = load_dataset(workdir / "data")
    loaded = time.perf_counter()
    print(json.dumps({
        "prepare_s": round(prepared - started, 1), "prepare_peak_rss_mb": round(prepare_peak),
        "load_dataset_s": round(loaded - prepared, 1),
        "num_users": meta["num_users"], "num_items": meta["num_items"],
        "num_interactions": meta["num_interactions"], "raw_interactions": meta["raw"]["raw_interactions"],
        "kcore_removed": meta["fixups"]["kcore_removed_interactions"], "loaded_users": dataset.num_users,
    }))


def cpu_capability() -> str:
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability())
    except Exception as e:  # noqa: BLE001 - a report line, not a failure
        return f"unknown ({type(e).__name__})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interactions", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=500_000)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--text-ids", action="store_true", help="Amazon-like text ids instead of integers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="", help="where the files go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child))
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="data_scale_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = {"interactions": args.interactions, "users": args.users, "items": args.items,
                  "text_ids": args.text_ids, "cpus": len(os.sched_getaffinity(0)), "cpu_capability": cpu_capability()}
        report.update(generate(workdir, args.interactions, args.users, args.items, args.text_ids, args.seed))
        started = time.perf_counter()
        result = subprocess.run([sys.executable, __file__, "--child", str(workdir)], capture_output=True, text=True)
        wall = time.perf_counter() - started
        if result.returncode:
            sys.exit(f"the data stage failed:\n{result.stderr}")
        report.update(json.loads(result.stdout.strip().splitlines()[-1]))
        # The (only) child's peak, the read-back into Python lists included. CPU seconds alongside
        # wall time: on a shared machine the wall time also measures the neighbours.
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        report["child_wall_s"] = round(wall, 1)
        report["child_cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)
        report["child_peak_rss_mb"] = round(usage.ru_maxrss / 1024)
        report["load_average_1min"] = round(os.getloadavg()[0], 2)
        print(result.stderr.strip())
        print(json.dumps(report, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
