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
import pyarrow as pa
import pyarrow.parquet as pq

from rerank_dist import io as rio
from rerank_dist.config import DATASET_DEFAULTS, DataConfig
from rerank_dist.data.errors import DataError
from rerank_dist.data.catalog import CATALOG
from rerank_dist.data.preprocess import Processed, preprocess
from rerank_dist.data.sources import INTERACTIONS, TITLES, load_raw
from rerank_dist.io import atomic_dir, atomic_path, read_json, write_json

ITEMS_FILE = "items.parquet"
SEQUENCES_FILE = "sequences.parquet"
META_FILE = "meta.json"
# The pipeline's completion marker for this directory (pipeline.MARKER); it lives here and is
# replaced along with the data files.
STAGE_MARKER = "stage.json"
FORMAT_VERSION = 1

_SUMMARY_KEYS = ("num_users", "num_items", "num_interactions", "mean_length", "min_length", "max_length")
_RAW_KEYS = ("raw_interactions", "raw_users", "raw_items")


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
    raw = load_raw(cfg, cache_dir, log=log)
    rule = title_rule(cfg)
    processed = preprocess(raw.interactions, raw.titles, cfg.min_count, title_rule=rule,
                           interactions_name=raw.origins[INTERACTIONS], titles_name=raw.origins[TITLES])
    processed.stats.update(raw.stats)
    meta = _meta(cfg, raw.provenance, processed, rule)
    _write(data_dir, processed, meta)
    _report(meta, log)
    return meta


def title_rule(cfg: DataConfig) -> str:
    """data.title_rule, with auto resolved to the dataset's rule."""
    return DATASET_DEFAULTS[cfg.dataset].title_rule if cfg.title_rule == "auto" else cfg.title_rule


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
    lists = sequences["items"].combine_chunks()
    flat = lists.flatten().to_numpy()
    _check_items_known(flat, len(items), data_dir / SEQUENCES_FILE)
    offsets = lists.offsets.to_numpy()
    # One Python list per user (what the later stages index), cut from one flat array.
    seqs = dict(zip(sequences["user_id"].to_numpy().tolist(),
                    (flat[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:]))))
    titles = dict(zip(items["item_id"].to_numpy().tolist(), items["title"].to_pylist()))
    return Dataset(titles=titles, sequences=seqs, num_items=len(items), meta=meta)


# ---------------------------------------------------------------- writing


def _meta(cfg: DataConfig, provenance: dict[str, Any], processed: Processed, rule: str) -> dict[str, Any]:
    stats = processed.stats
    fixups = {k: v for k, v in stats.items() if k not in _SUMMARY_KEYS and k not in _RAW_KEYS}
    defaults = DATASET_DEFAULTS[cfg.dataset]
    spec = CATALOG.get(cfg.dataset)
    return {
        "format_version": FORMAT_VERSION,
        "dataset": cfg.dataset,
        "min_count": cfg.min_count,
        "title_rule": rule,
        **{k: stats[k] for k in _SUMMARY_KEYS},
        "raw": {k: stats[k] for k in _RAW_KEYS},
        "fixups": fixups,
        # What the dataset implies for fields a run leaves unset (config.DATASET_DEFAULTS).
        "dataset_defaults": {"title_rule": defaults.title_rule, "retriever.max_len": defaults.max_len,
                             "retriever.batch_size": defaults.batch_size},
        "llamarec_table2": spec.llamarec if spec is not None and cfg.format == "native" else None,
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


def write_parquet(path: Path, table: pd.DataFrame | pa.Table) -> None:
    """A pandas frame or an Arrow table as Parquet, atomically (Arrow: the list column stays zero-copy)."""
    if isinstance(table, pd.DataFrame):
        rio.write_parquet(path, table)
        return
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _write(data_dir: Path, processed: Processed, meta: dict[str, Any]) -> None:
    # All files into a fresh directory that replaces data_dir only once complete (see the module docstring).
    with atomic_dir(data_dir) as tmp:
        write_parquet(tmp / ITEMS_FILE, processed.items)
        write_parquet(tmp / SEQUENCES_FILE, processed.sequences)
        write_json(tmp / META_FILE, meta)


def _report(meta: dict[str, Any], log: Callable[[str], Any]) -> None:
    src = meta["source"]
    official = {True: "", False: " (not the official release files)",
                None: " (checksums not pinned; recorded in meta.json)"}[src["official_release"]]
    log(f"data: {meta['num_users']:,} users, {meta['num_items']:,} items, {meta['num_interactions']:,} interactions "
        f"(mean length {meta['mean_length']:.2f}) from {src['source']} {src['dataset']}{official}")
    fx, raw = meta["fixups"], meta["raw"]
    log(f"data: {fx['unknown_item_interactions']:,} interactions named items absent from the titles "
        f"(dropped); {fx['empty_titles']:,} items without a usable title (dropped, "
        f"{fx['untitled_item_interactions']:,} interactions); {fx['whitespace_fixed']:,} titles had whitespace "
        f"fixed; {fx['kcore_removed_interactions']:,} interactions removed by the {meta['min_count']}-core filter "
        f"(of {raw['raw_interactions']:,} read)")
    extra = {k: v for k, v in fx.items() if k in ("duplicate_item_rows", "duplicate_metadata_ids",
                                                  "conflicting_titles", "duplicate_interactions") and v}
    if extra:
        log("data: also " + "; ".join(f"{k.replace('_', ' ')}: {v:,}" for k, v in extra.items()))
    defaults = meta["dataset_defaults"]
    log(f"data: defaults for {meta['dataset']}: title rule {defaults['title_rule']} (this run: {meta['title_rule']}), "
        f"retriever.max_len {defaults['retriever.max_len']}, retriever.batch_size {defaults['retriever.batch_size']} "
        f"(used where the config does not set them)")
    for line in _table2_lines(meta):
        log(line)


def _table2_lines(meta: dict[str, Any]) -> list[str]:
    """This run's statistics next to LlamaRec's Table 2 row for the dataset, where it has one."""
    ref = meta.get("llamarec_table2")
    if not ref:
        return []
    rounded = ref.get("interactions_rounded")
    rows = [("users", f"{meta['num_users']:,}", f"{ref['users']:,}"),
            ("items", f"{meta['num_items']:,}", f"{ref['items']:,}"),
            ("interactions", f"{meta['num_interactions']:,}",
             f"{ref['interactions'] // 1000}K" if rounded else f"{ref['interactions']:,}"),
            ("mean length", f"{meta['mean_length']:.2f}", f"{ref['mean_length']:.2f}")]
    lines = [f"data: {'':<14}{'this run':>12}{'LlamaRec':>12}"]
    lines += [f"data: {name:<14}{ours:>12}{theirs:>12}" for name, ours, theirs in rows]
    return lines


# ---------------------------------------------------------------- reading


def _read_parquet(path: Path, columns: tuple[str, ...]) -> pa.Table:
    if not path.is_file():
        raise DataError(f"{path}: not found; prepare the data again")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}); prepare the data again") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(columns)}")
    return table


def _check_dense(ids: pa.ChunkedArray, path: Path, column: str) -> None:
    if not np.array_equal(ids.to_numpy(), np.arange(1, len(ids) + 1)):
        raise DataError(f"{path}: column {column} must be 1..{len(ids)} in order; prepare the data again")


def _check_items_known(flat: np.ndarray, num_items: int, path: Path) -> None:
    if flat.size and (flat.min() < 1 or flat.max() > num_items):
        raise DataError(f"{path}: item ids must lie in 1..{num_items} (items.parquet); prepare the data again")
