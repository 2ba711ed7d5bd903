"""Training examples as data: built and tokenized once per run into memory-mapped Arrow files.

LlamaRec trains on every prefix of every user's sequence: 88,444 examples on ml-latest-small and
about a million on ML-1M. Kept as Python objects, each process would hold all of them (8.4 GB for
ml-latest-small). Here they are built once, written to disk as Arrow, and every process (on every
node; the run directory is shared) maps the same files; a DataLoader reads rows lazily, so a
process's memory does not grow with the number of examples or with the world size.

A store directory (default ``<run_dir>/examples/train``)::

    part-00000.arrow   Arrow IPC stream, rows of one part: input_ids list<uint16> (int32 for vocabularies over 65,536; the prompt, ids as
                       prompts.encode_prompts gives them), label int8 (index of the target among the
                       shown candidates), user, prefix_len, target int32, candidate_ids list<int32>
    part-00000.json    that part's counts (examples.ExampleStats), written after its rows
    meta.json          written last, once every part is there: the inputs the store was made from,
                       the row count, the merged stats, probe prompts for the verbalizer check

The rows are cut into parts of a fixed size (PART_ROWS), so the same examples land in the same
files in the same order whatever the number of processes that built them; a killed build keeps
its finished parts and the next attempt makes only the missing ones. ``meta.json`` records what
the store was made from (the prepared data or the retriever's candidates, every prompt field, the
tokenizer): a store of the run's own default directory made from other inputs is rebuilt, one in a
directory the user named (``train.examples_dir``, shared by several runs) is refused with both
values, since another run may be using it.

The title counts (``title_fixes``, ``titles_truncated``) are over the whole catalogue here, not
over the items the training prompts happen to show.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa

from rerank_dist.config import PromptConfig, RunConfig
from rerank_dist.examples import (ExampleStats, ExamplesError, RowPlan, candidate_arrays, plan_rows, render_examples,
                                  sequence_arrays)
from rerank_dist.io import atomic_path, read_json, write_json
from rerank_dist.prompts import PromptPieces, TitleBook

STORE_VERSION = 1
# Rows per part file: a unit of work small enough to spread over processes and to resume. The
# environment variable exists for tests, which need several parts from a few dozen rows.
PART_ROWS = int(os.environ.get("RERANK_DIST_EXAMPLE_PART_ROWS", "16384"))
META = "meta.json"
PROBES_PER_PART = 1  # prompts kept as text per part for the verbalizer check (its first row)
MAX_PROBES = 16  # of which meta.json keeps at most this many


def _schema(vocab_size: int) -> pa.Schema:
    # uint16 token ids where the vocabulary fits (SmolLM2, Llama-2): half the disk and page cache.
    ids = pa.uint16() if vocab_size <= 2**16 else pa.int32()
    return pa.schema([("input_ids", pa.list_(ids)), ("label", pa.int8()), ("user", pa.int32()),
                      ("prefix_len", pa.int32()), ("target", pa.int32()), ("candidate_ids", pa.list_(pa.int32()))])
# Prompt fields that do not change a training example.
_NOT_TRAINING_PROMPT = {"eval_order"}


@dataclass(frozen=True)
class StoreSpec:
    directory: Path
    inputs: dict[str, Any]  # what the examples are made from; recorded in meta.json
    named_by_user: bool     # train.examples_dir was set: refuse (not rebuild) a store made from other inputs

    def part_path(self, part: int) -> Path:
        return self.directory / f"part-{part:05d}.arrow"

    def part_stats_path(self, part: int) -> Path:
        return self.directory / f"part-{part:05d}.json"


def default_dir(cfg: RunConfig) -> Path:
    """The run's store directory: train.examples_dir, else <run_dir>/examples/train."""
    return Path(cfg.train.examples_dir) if cfg.train.examples_dir else Path(cfg.run_dir) / "examples" / "train"


def store_spec(cfg: RunConfig, upstream_key: str, tokenizer: Any, labels: Sequence[str]) -> StoreSpec:
    """Where the run's training examples live and what they are made from.

    ``upstream_key``: the recorded key of the stage the rows come from (the retrieve stage when the
    examples use its training candidates, else the prepare stage).
    """
    prompt = {f"prompt.{k}": v for k, v in vars(cfg.prompt).items() if k not in _NOT_TRAINING_PROMPT}
    inputs = {"store_version": STORE_VERSION, "part_rows": PART_ROWS, "rows_from": _rows_from(cfg), "upstream_key": upstream_key,
              "retriever.train_prefixes_per_user": cfg.retriever.train_prefixes_per_user,
              **prompt, "labels": "".join(labels), "model.name_or_path": cfg.model.name_or_path,
              "tokenizer": tokenizer_fingerprint(tokenizer)}
    return StoreSpec(default_dir(cfg), inputs, bool(cfg.train.examples_dir))


def _rows_from(cfg: RunConfig) -> str:
    return "sequences" if cfg.retriever.train_candidates == "none" else "candidates"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the tokenizer's vocabulary and rules (two tokenizers with one hash encode alike)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(
        sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    extra = json.dumps([type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token,
                        getattr(tokenizer, "chat_template", None)], default=str)
    return hashlib.sha256((text + extra).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- state of a store on disk


def is_complete(spec: StoreSpec) -> bool:
    """Whether the store is finished and made from spec.inputs (ExamplesError if named by the user and not)."""
    meta_path = spec.directory / META
    if not meta_path.is_file():
        return False
    return _recorded_inputs_match(spec, read_json(meta_path).get("inputs", {}))


def _recorded_inputs_match(spec: StoreSpec, recorded: dict[str, Any]) -> bool:
    if recorded == spec.inputs:
        return True
    if spec.named_by_user:
        diff = [f"{k}: the store has {recorded.get(k)!r}, this run needs {v!r}"
                for k, v in spec.inputs.items() if recorded.get(k) != v]
        raise ExamplesError(f"train.examples_dir={spec.directory}: made for other settings ({'; '.join(diff)}); "
                            f"point train.examples_dir at another directory, or delete this one")
    return False


def reset_if_stale(spec: StoreSpec, say: Callable[[str], None] = print) -> None:
    """Before a build: parts made from other inputs (a default directory's) are removed; a user-named
    directory holding another store is refused. Main process only."""
    d = spec.directory
    marker = d / "inputs.json"
    if marker.is_file():
        if _recorded_inputs_match(spec, read_json(marker)):
            return
        changed = sorted(k for k, v in spec.inputs.items() if read_json(marker).get(k) != v)
        say(f"examples: {d} was made for other settings ({', '.join(changed)}); rebuilding it")
        shutil.rmtree(d)
    elif d.is_dir() and any(d.iterdir()):
        if spec.named_by_user:
            raise ExamplesError(f"train.examples_dir={d}: the directory holds other files, not an examples store; "
                                f"name an empty or new directory")
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    write_json(marker, spec.inputs)


def part_ranges(num_rows: int) -> list[tuple[int, int]]:
    """(start, stop) of each part: fixed by the row count alone, so by no process count."""
    return [(lo, min(lo + PART_ROWS, num_rows)) for lo in range(0, num_rows, PART_ROWS)]


def missing_parts(spec: StoreSpec, num_rows: int) -> list[int]:
    """Parts not yet written (a part counts once its stats file, written after its rows, is there)."""
    return [i for i in range(len(part_ranges(num_rows)))
            if not (spec.part_stats_path(i).is_file() and spec.part_path(i).is_file())]


# ---------------------------------------------------------------- building


@dataclass
class StoreSource:
    """What the rows are made from: the prepared dataset and, unless the negatives are all random
    and the retriever made no training candidates, the retriever's candidates for the training split."""

    dataset: Any                      # .titles, .sequences, .num_items
    candidates_path: Path | None      # candidates_train.parquet, or None: rows from the sequences
    prefixes_per_user: int            # retriever.train_prefixes_per_user (rows from the sequences)


def row_plan(source: StoreSource, cfg: PromptConfig, num_labels: int) -> RowPlan:
    """The training rows, in the order the store keeps them (the same on every process)."""
    if source.candidates_path is None:
        arrays = sequence_arrays(source.dataset.sequences, source.prefixes_per_user)
        if not len(arrays[0]):
            raise ExamplesError(f"training examples: no user has a training prefix with a non-empty history "
                                f"(every sequence needs at least 4 items: a history item, a training target, "
                                f"the validation and the test item); the dataset is too short")
    else:
        import pandas as pd

        if not source.candidates_path.is_file():
            raise ExamplesError(f"{source.candidates_path}: not found; run the retrieve stage first")
        arrays = candidate_arrays(pd.read_parquet(source.candidates_path))
        if not len(arrays[0]):
            raise ExamplesError(f"{source.candidates_path}: no training rows (every sequence too short for a "
                                f"training prefix)")
    return plan_rows(arrays, "train", cfg, num_labels)


def prompt_pieces(source: StoreSource, cfg: PromptConfig, labels: Sequence[str], tokenizer: Any) -> Any:
    """The titles and their prompt pieces, tokenised once per process for all the parts it builds."""
    book = TitleBook(source.dataset.titles, tokenizer, cfg.title_max_tokens)
    pieces = PromptPieces.build(tokenizer, cfg, labels, book)
    if pieces is not None:
        pieces.prepare(list(source.dataset.titles))
    return book, pieces


def build_part(spec: StoreSpec, plan: RowPlan, part: int, source: StoreSource, cfg: PromptConfig,
               labels: Sequence[str], tokenizer: Any, titles: Any = None, batch_rows: int = 1024) -> None:
    """Write one part's rows (temp file, then rename) and then its stats file.

    ``titles``: ``prompt_pieces(...)`` of this process, to reuse across parts (made here if None).
    """
    start, stop = part_ranges(len(plan))[part]
    book, pieces = titles if titles is not None else prompt_pieces(source, cfg, labels, tokenizer)
    stats = ExampleStats(labels)
    probes: list[str] = []
    schema = _schema(len(tokenizer))
    columns: dict[str, list] = {name: [] for name in schema.names}
    with atomic_path(spec.part_path(part)) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for example, ids in render_examples(plan, start, stop, source.dataset, cfg, labels, tokenizer, book,
                                                "train", source.dataset.num_items, stats, with_text=False,
                                                pieces=pieces):
                if len(probes) < PROBES_PER_PART:
                    probes.append(example.prompt)  # the first row's: always rendered
                for name, value in (("input_ids", ids), ("label", example.label_index), ("user", example.user),
                                    ("prefix_len", example.prefix_len), ("target", example.target),
                                    ("candidate_ids", example.candidate_ids)):
                    columns[name].append(value)
                if len(columns["label"]) >= batch_rows:
                    _write_batch(writer, schema, columns)
            if columns["label"]:
                _write_batch(writer, schema, columns)
    write_json(spec.part_stats_path(part), {"part": part, "rows": [start, stop], "stats": stats.to_dict(),
                                            "probes": probes})


def _write_batch(writer: pa.ipc.RecordBatchStreamWriter, schema: pa.Schema, columns: dict[str, list]) -> None:
    writer.write_batch(pa.record_batch([pa.array(columns[name], type=field.type) for name, field in
                                        zip(schema.names, schema)], schema=schema))
    for values in columns.values():
        values.clear()


def finish(spec: StoreSpec, plan: RowPlan, source: StoreSource, cfg: PromptConfig, labels: Sequence[str],
           tokenizer: Any) -> dict[str, Any]:
    """meta.json, once every part is written (main process, after all builders are done)."""
    parts = part_ranges(len(plan))
    missing = missing_parts(spec, len(plan))
    if missing:
        raise RuntimeError(f"{spec.directory}: parts {missing[:5]} were not written; cannot finish the store")
    part_meta = [read_json(spec.part_stats_path(i)) for i in range(len(parts))]
    book = TitleBook(source.dataset.titles, tokenizer, cfg.title_max_tokens)
    for item in source.dataset.titles:
        book(item)
    stats = ExampleStats.merge(labels, [m["stats"] for m in part_meta]).summary(
        "train", cfg.train_order, cfg, book.fixes, book.truncated, plan.rows_left_out)
    probes = [p for m in part_meta for p in m["probes"]]
    if len(probes) > MAX_PROBES:  # evenly spaced, the first and the last part's included
        probes = [probes[i] for i in sorted({round(j * (len(probes) - 1) / (MAX_PROBES - 1)) for j in range(MAX_PROBES)})]
    meta = {"inputs": spec.inputs, "rows": len(plan), "parts": len(parts), "stats": stats, "probes": probes}
    write_json(spec.directory / META, meta)
    return meta


# ---------------------------------------------------------------- reading


class StoredExamples:
    """The store's rows as a map-style dataset: (prompt token ids, label index) per row, read lazily
    from the memory-mapped parts (a torch DataLoader takes it as it is)."""

    def __init__(self, directory: Path):
        from datasets import Dataset, concatenate_datasets

        self.directory = Path(directory)
        self.meta = read_json(self.directory / META)
        # Dataset.from_file maps the Arrow file; nothing is copied into this process's memory.
        tables = [Dataset.from_file(str(self.directory / f"part-{i:05d}.arrow")) for i in range(self.meta["parts"])]
        data = concatenate_datasets(tables) if len(tables) > 1 else tables[0]
        if len(data) != self.meta["rows"]:
            raise ExamplesError(f"{self.directory}: {len(data)} rows in the parts, meta.json says {self.meta['rows']}; "
                                f"delete the directory to rebuild it")
        self.data = data.with_format("numpy", columns=["input_ids", "label"])

    def __len__(self) -> int:
        return self.meta["rows"]

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        row = self.data[int(index)]
        return row["input_ids"].tolist(), int(row["label"])

    def lengths(self) -> np.ndarray:
        """Prompt tokens of every row, (n,), read column-wise from the mapped files (no ids copied)."""
        import pyarrow.compute as pc

        column = self.data.with_format("arrow")[:].column("input_ids")
        return pc.list_value_length(column).to_numpy().astype(np.int64)

    def rows(self, indices: Sequence[int]) -> dict[str, Any]:
        """Every column of some rows, as Python values (for inspection and tests)."""
        return self.data.with_format(None)[list(map(int, indices))] if len(indices) else {}

    def candidates(self, max_rows: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(targets (n,), shown candidates (n, K)) of every row, or of ``max_rows`` evenly spaced rows,
        read column-wise from the mapped files."""
        table = self.data.with_format("arrow")
        if max_rows and len(self) > max_rows:
            table = table.select(np.linspace(0, len(self) - 1, max_rows).astype(int).tolist())
        table = table[:]  # pyarrow.Table
        targets = table.column("target").to_numpy()
        flat = table.column("candidate_ids").combine_chunks().flatten().to_numpy()
        return targets, flat.reshape(len(targets), -1)

    @property
    def stats(self) -> dict[str, Any]:
        return self.meta["stats"]

    @property
    def probes(self) -> list[str]:
        return self.meta["probes"]

