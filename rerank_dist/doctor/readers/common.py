"""Helpers every reader uses: hashes of weights, LoRA B statistics, tables with list cells, metric
names, and a parameter count from a config.json."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from rerank_dist.doctor.evidence import AdapterWeights, ReportedMetric
from rerank_dist.io import sha256_file

WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "adapter_model.bin")


class DoctorInputError(ValueError):
    """An input the doctor cannot read at all (one-line message); the CLI exits with status 2."""


def weights_file(directory: Path) -> Path | None:
    """The weights a directory holds (adapter first: that is what a LoRA run saves)."""
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    return None


def weights_hash(directory: Path) -> str | None:
    """sha256 of a directory's weights; a sharded checkpoint hashes its shards in index order."""
    found = weights_file(directory)
    if found is None:
        return None
    if found.name.endswith(".index.json"):
        shards = sorted(set(json.loads(found.read_text()).get("weight_map", {}).values()))
        digest = hashlib.sha256()
        for shard in shards:
            digest.update(sha256_file(directory / shard).encode())
        return digest.hexdigest()
    return sha256_file(found)


def adapter_weights(path: Path) -> AdapterWeights | None:
    """LoRA B statistics of an adapter_model.safetensors (B starts at zero: all-zero B = untrained)."""
    if path.name != "adapter_model.safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    num_b = zero_b = 0
    max_abs = 0.0
    with safe_open(str(path), framework="np") as f:
        for key in f.keys():
            if "lora_B" not in key:
                continue
            tensor = np.asarray(f.get_tensor(key), dtype=np.float64)
            num_b += 1
            m = float(np.abs(tensor).max()) if tensor.size else 0.0
            zero_b += m == 0.0
            max_abs = max(max_abs, m)
    return AdapterWeights(str(path), num_b, zero_b, max_abs)


# ---------------------------------------------------------------- tables


def read_table(path: Path) -> pd.DataFrame:
    """A Parquet, JSON Lines, JSON (records) or CSV file as a DataFrame."""
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix == ".gz" else path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix in (".jsonl", ".jsonl.gz", ".ndjson"):
            return pd.read_json(path, lines=True)
        if suffix == ".json":
            return pd.read_json(path)
        if suffix in (".csv", ".csv.gz", ".tsv"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    except (ValueError, OSError) as err:
        raise DoctorInputError(f"{path}: cannot read as {suffix[1:]} ({str(err).splitlines()[0]})") from None
    raise DoctorInputError(f"{path}: unknown table format {suffix!r}; expected .parquet, .jsonl, .json or .csv")


def as_list(cell: Any) -> list | None:
    """A list cell from any of the formats: a list/array, a JSON list in text, or "1 2 3" / "1,2,3"."""
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return None
    if isinstance(cell, (list, tuple)):
        return list(cell)
    if isinstance(cell, np.ndarray):
        return cell.tolist()
    if isinstance(cell, str):
        text = cell.strip()
        if text.startswith("["):
            try:
                return list(json.loads(text))
            except ValueError:
                text = text.strip("[]")
        parts = [p for p in re.split(r"[,;|\s]+", text) if p]
        return [_number(p) for p in parts]
    return None


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip("'\"")


def scalar(cell: Any) -> Any:
    """Numpy scalars as plain Python values (so 5 == np.int64(5) lookups work in dicts and lists)."""
    return cell.item() if isinstance(cell, np.generic) else cell


def find_column(frame: pd.DataFrame, names: Iterable[str]) -> str | None:
    """The first column whose name matches one of names, ignoring case."""
    lower = {str(c).lower(): str(c) for c in frame.columns}
    for name in names:
        if name.lower() in lower:
            return lower[name.lower()]
    return None


# ---------------------------------------------------------------- metrics


_METRIC = re.compile(r"(?:^|[_./\s-])(recall|hit_?rate|hr|hits?|precision|prec|ndcg|mrr|map)"
                     r"\s*(?:@|_at_|_|-|@k=)?\s*(\d+)$", re.IGNORECASE)
_FAMILY = {"hitrate": "hit", "hit_rate": "hit", "hr": "hit", "hits": "hit", "prec": "precision"}


def parse_metric(name: str) -> tuple[str, int] | None:
    """("recall", 20) from "eval_recall@20", "test_Recall_20", "NDCG@10", "recall_at_20"; None otherwise."""
    m = _METRIC.search("_" + name.strip())
    if not m:
        return None
    family = m.group(1).lower()
    return _FAMILY.get(family, family), int(m.group(2))


def metrics_in(obj: Any, source: str, flagged: set[str] = frozenset()) -> list[ReportedMetric]:
    """Every metric-like key in a (nested) JSON object, once per name."""
    found: dict[str, ReportedMetric] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    parsed = parse_metric(str(key))
                    if parsed and str(key) not in found:
                        found[str(key)] = ReportedMetric(str(key), parsed[0], parsed[1], source, str(key) in flagged)
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(obj)
    return list(found.values())


# ---------------------------------------------------------------- capacity


def parameter_count(arch: dict) -> int | None:
    """Backbone parameters of a decoder-only transformer from its config.json (embeddings, attention,
    gated MLP, norms; a tied head counted once). An estimate within a few percent for Llama/Qwen-style models."""
    try:
        h, layers, vocab = int(arch["hidden_size"]), int(arch["num_hidden_layers"]), int(arch["vocab_size"])
    except (KeyError, TypeError, ValueError):
        return None
    heads = int(arch.get("num_attention_heads") or 1)
    kv = int(arch.get("num_key_value_heads") or heads)
    head_dim = int(arch.get("head_dim") or h // heads)
    inter = int(arch.get("intermediate_size") or 4 * h)
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2  # q, o; k, v
    mlp = 3 * h * inter  # gate, up, down
    per_layer = attn + mlp + 2 * h
    head = 0 if arch.get("tie_word_embeddings", False) else vocab * h
    return vocab * h + layers * per_layer + h + head


_SIZE_IN_NAME = re.compile(r"(\d+(?:\.\d+)?)\s*([bBmM])(?![a-zA-Z])")


def parameters_from_name(name: str) -> int | None:
    """1.7e9 from "Qwen3-1.7B", 1.35e8 from "SmolLM2-135M-Instruct"; None when the name gives no size."""
    m = _SIZE_IN_NAME.search(name.rsplit("/", 1)[-1])
    if not m:
        return None
    scale = 1e9 if m.group(2).lower() == "b" else 1e6
    return int(float(m.group(1)) * scale)
