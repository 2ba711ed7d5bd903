"""The data stage: raw files -> ``items.parquet``, ``sequences.parquet``, ``meta.json``; and back.

The three files appear together or not at all: they are written into a temporary directory beside
the data directory, which then replaces the old one as a whole (``io.atomic_dir``). A run that fails
or is killed half-way leaves the previous directory untouched: its complete set of files, and the
stage marker that vouches for exactly those files. A new set never appears next to an old marker,
as the marker goes with the directory it was written into. ``load_dataset`` still refuses a
directory that lacks a file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from rerank_dist.config import DataConfig
from rerank_dist.data import DataError
from rerank_dist.data.preprocess import Processed, preprocess
from rerank_dist.data.sources import RATINGS, load_raw
from rerank_dist.io import atomic_dir, read_json, write_json, write_parquet

ITEMS_FILE = "items.parquet"
SEQUENCES_FILE = "sequences.parquet"
META_FILE = "meta.json"
# The pipeline's completion marker for this directory (pipeline.MARKER); it lives here and is
# replaced along with the data files.
STAGE_MARKER = "stage.json"
FORMAT_VERSION = 1

_SUMMARY_KEYS = ("num_users", "num_items", "num_interactions", "mean_length", "min_length", "max_length")
_RAW_KEYS = ("raw_ratings", "raw_users", "raw_movies")


@dataclass
class Dataset:
    """Processed data in memory: item ids are 1..num_items, user ids 1..num_users."""

    titles: dict[int, str]  # item id -> display title
    sequences: dict[int, list[int]]  # user id -> item ids in time order
    num_items: int
    meta: dict[str, Any]

    @property
    def num_users(self) -> int:
        return len(self.sequences)


def prepare_data(cfg: DataConfig, data_dir: str | Path, cache_dir: str | Path,
                 log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Read, preprocess and write the dataset for ``cfg``; returns the contents of meta.json."""
    data_dir = Path(data_dir)
    _check_replaceable(data_dir)
    raw = load_raw(cfg, cache_dir)
    processed = preprocess(raw.ratings, raw.movies, cfg.min_count, ratings_name=raw.origins[RATINGS])
    meta = _meta(cfg, raw.provenance, processed)
    _write(data_dir, processed, meta)
    _report(meta, log)
    return meta


def load_dataset(data_dir: str | Path) -> Dataset:
    """Read what ``prepare_data`` wrote, checking ids are dense; raises DataError if incomplete."""
    data_dir = Path(data_dir)
    meta_path = data_dir / META_FILE
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: not found; prepare the data first")
    meta = read_json(meta_path)
    items = _read_parquet(data_dir / ITEMS_FILE, ("item_id", "title"))
    sequences = _read_parquet(data_dir / SEQUENCES_FILE, ("user_id", "items"))
    _check_dense(items["item_id"], data_dir / ITEMS_FILE, "item_id")
    _check_dense(sequences["user_id"], data_dir / SEQUENCES_FILE, "user_id")
    seqs = {int(u): [int(i) for i in s] for u, s in zip(sequences["user_id"], sequences["items"])}
    _check_items_known(seqs, len(items), data_dir / SEQUENCES_FILE)
    titles = dict(zip(items["item_id"].astype(int).tolist(), items["title"].astype(str).tolist()))
    return Dataset(titles=titles, sequences=seqs, num_items=len(items), meta=meta)


# ---------------------------------------------------------------- writing


def _meta(cfg: DataConfig, provenance: dict[str, Any], processed: Processed) -> dict[str, Any]:
    stats = processed.stats
    fixups = {k: v for k, v in stats.items() if k not in _SUMMARY_KEYS and k not in _RAW_KEYS}
    return {
        "format_version": FORMAT_VERSION,
        "dataset": cfg.dataset,
        "min_count": cfg.min_count,
        **{k: stats[k] for k in _SUMMARY_KEYS},
        "raw": {k: stats[k] for k in _RAW_KEYS},
        "fixups": fixups,
        "source": provenance,
        "config": dataclasses.asdict(cfg),
    }


def _check_replaceable(data_dir: Path) -> None:
    """Refuse a data directory holding files this stage did not write: replacing it would delete them."""
    if not data_dir.is_dir():
        return
    ours = {ITEMS_FILE, SEQUENCES_FILE, META_FILE, STAGE_MARKER}
    foreign = sorted(p.name for p in data_dir.iterdir() if p.name not in ours and not p.name.startswith("."))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise DataError(f"{data_dir}: holds {shown}, which the data stage did not write; it replaces this "
                        f"directory as a whole, so move them elsewhere (or use another run_dir)")


def _write(data_dir: Path, processed: Processed, meta: dict[str, Any]) -> None:
    # All files into a fresh directory that replaces data_dir only once complete (see the module docstring).
    with atomic_dir(data_dir) as tmp:
        write_parquet(tmp / ITEMS_FILE, processed.items)
        write_parquet(tmp / SEQUENCES_FILE, processed.sequences)
        write_json(tmp / META_FILE, meta)


def _report(meta: dict[str, Any], log: Callable[[str], Any]) -> None:
    src = meta["source"]
    log(f"data: {meta['num_users']} users, {meta['num_items']} items, {meta['num_interactions']} interactions "
        f"(mean length {meta['mean_length']:.2f}) from {src['source']} {src['dataset']}"
        f"{'' if src['official_release'] else ' (not the official release files)'}")
    fx = meta["fixups"]
    log(f"data: {fx['unknown_movie_ratings']} ratings named movies absent from movies.csv (dropped); "
        f"{fx['empty_titles']} movies without a usable title (dropped, {fx['untitled_movie_ratings']} ratings); "
        f"{fx['whitespace_fixed']} titles had whitespace fixed; "
        f"{fx['kcore_removed_ratings']} ratings removed by the {meta['min_count']}-core filter")


# ---------------------------------------------------------------- reading


def _read_parquet(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: not found; prepare the data again")
    try:
        frame = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}); prepare the data again") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(columns)}")
    return frame


def _check_dense(ids: pd.Series, path: Path, column: str) -> None:
    if not np.array_equal(ids.to_numpy(), np.arange(1, len(ids) + 1)):
        raise DataError(f"{path}: column {column} must be 1..{len(ids)} in order; prepare the data again")


def _check_items_known(sequences: dict[int, list[int]], num_items: int, path: Path) -> None:
    flat = np.fromiter((i for s in sequences.values() for i in s), dtype=np.int64)
    if flat.size and (flat.min() < 1 or flat.max() > num_items):
        raise DataError(f"{path}: item ids must lie in 1..{num_items} (items.parquet); prepare the data again")
