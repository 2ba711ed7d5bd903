"""LlamaRec preprocessing of MovieLens: clean titles, filter, k-core, re-index, order.

Every rating is an implicit interaction (the rating value is ignored). Steps, in order:

1. clean titles (``clean_title``); movies whose title is unusable (empty) are dropped;
2. drop ratings naming movies absent from movies.csv or dropped in step 1 (counted, never silent);
3. iterative k-core: users and items with fewer than ``min_count`` interactions are removed until
   none is left (the result is the unique maximal k-core, whatever the removal order);
4. re-index users and items from 1 in the order of their original ids;
5. order each user's items by (timestamp, item id).

Every fix-up is counted in ``Processed.stats`` so that ``meta.json`` says what was changed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from rerank_dist.data import DataError
from rerank_dist.data.splits import MIN_SEQ_LEN

_WHITESPACE = re.compile(r"\s+")
_YEAR = re.compile(r"\s*\((\d{4})\)$")
# A parenthetical after some text, innermost first. One at the very start is part of the name:
# "(500) Days of Summer" keeps it.
_PARENTHETICAL = re.compile(r"(?<!^)\s*\([^()]*\)")
_TRAILING_ARTICLE = re.compile(r"^(.+), (The|A|An)$")


@dataclass
class Processed:
    items: pd.DataFrame  # item_id (1..n), title, source_id
    sequences: pd.DataFrame  # user_id (1..m), source_user_id, items (item ids in time order)
    stats: dict[str, Any]


def collapse_whitespace(text: str) -> str:
    """Newlines, tabs and runs of spaces become one space; ends are trimmed."""
    return _WHITESPACE.sub(" ", text).strip()


def clean_title(raw: str) -> str:
    """MovieLens title -> LlamaRec display title; "" when nothing usable is left.

    "City of Lost Children, The (Cité des enfants perdus, La) (1995)" -> "The City of Lost Children (1995)":
    cut the year, drop other parentheticals, move a trailing ", The/A/An" to the front, re-append the year.
    """
    text = collapse_whitespace(raw)
    match = _YEAR.search(text)
    year = match.group(1) if match else None
    if match:
        text = text[: match.start()]
    base = _drop_parentheticals(text) or text  # a title that is only a parenthetical keeps it
    base = _TRAILING_ARTICLE.sub(r"\2 \1", base)
    if not base:
        return ""
    return f"{base} ({year})" if year else base


def _drop_parentheticals(text: str) -> str:
    while True:  # nested "(a (b))" needs one pass per level
        shorter = _PARENTHETICAL.sub("", text)
        if shorter == text:
            return collapse_whitespace(text)
        text = shorter


def preprocess(ratings: pd.DataFrame, movies: pd.DataFrame, min_count: int = 5,
               ratings_name: str = "ratings.csv") -> Processed:
    """ratings (userId, movieId, timestamp) + movies (movieId, title) -> re-indexed items and sequences."""
    stats: dict[str, Any] = {
        "raw_ratings": len(ratings),
        "raw_users": int(ratings["userId"].nunique()),
        "raw_movies": len(movies),
    }
    titles = _clean_movies(movies, stats)
    ratings = _drop_unknown_movies(ratings, movies, titles, stats)
    stats["duplicate_ratings"] = int(ratings.duplicated(["userId", "movieId"]).sum())
    core = k_core(ratings, min_count)
    stats["kcore_removed_ratings"] = len(ratings) - len(core)
    if core.empty:
        raise DataError(f"{ratings_name}: no interactions left after the {min_count}-core filter "
                        f"(data.min_count={min_count}); lower data.min_count or use a larger dataset")
    items, interactions = densify(core, titles)
    sequences = build_sequences(interactions)
    _check_lengths(sequences, min_count, ratings_name)
    stats.update(_summary(items, sequences))
    return Processed(items=items, sequences=sequences, stats=stats)


def _clean_movies(movies: pd.DataFrame, stats: dict[str, Any]) -> pd.Series:
    """movieId -> cleaned title, for movies with a usable title (first row wins for a repeated id)."""
    stats["duplicate_movie_ids"] = int(movies["movieId"].duplicated().sum())
    movies = movies.drop_duplicates("movieId")
    raw = movies["title"].astype(str)
    stats["whitespace_fixed"] = int((raw.map(collapse_whitespace) != raw).sum())
    cleaned = pd.Series(raw.map(clean_title).to_numpy(), index=movies["movieId"].to_numpy())
    usable = cleaned != ""
    stats["empty_titles"] = int((~usable).sum())
    return cleaned[usable]


def _drop_unknown_movies(ratings: pd.DataFrame, movies: pd.DataFrame, titles: pd.Series,
                         stats: dict[str, Any]) -> pd.DataFrame:
    unknown = ~ratings["movieId"].isin(movies["movieId"])
    stats["unknown_movie_ratings"] = int(unknown.sum())
    stats["unknown_movie_ids"] = int(ratings.loc[unknown, "movieId"].nunique())
    untitled = ~unknown & ~ratings["movieId"].isin(titles.index)
    stats["untitled_movie_ratings"] = int(untitled.sum())
    return ratings[~unknown & ~untitled]


def k_core(ratings: pd.DataFrame, min_count: int) -> pd.DataFrame:
    """Repeatedly drop users and items with fewer than ``min_count`` interactions until stable."""
    while True:
        user_counts = ratings.groupby("userId")["userId"].transform("size")
        item_counts = ratings.groupby("movieId")["movieId"].transform("size")
        keep = (user_counts >= min_count) & (item_counts >= min_count)
        if keep.all():
            return ratings
        ratings = ratings[keep]


def densify(core: pd.DataFrame, titles: pd.Series) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Ids 1..n in the order of the original ids (deterministic, unlike iterating a set)."""
    user_ids = np.sort(core["userId"].unique())
    item_ids = np.sort(core["movieId"].unique())
    interactions = pd.DataFrame({
        "user_id": np.searchsorted(user_ids, core["userId"].to_numpy()) + 1,
        "source_user_id": core["userId"].to_numpy(),
        "item_id": np.searchsorted(item_ids, core["movieId"].to_numpy()) + 1,
        "timestamp": core["timestamp"].to_numpy(),
    })
    items = pd.DataFrame({
        "item_id": np.arange(1, len(item_ids) + 1, dtype=np.int64),
        "title": titles.loc[item_ids].to_numpy(),
        "source_id": item_ids.astype(np.int64),
    })
    return items, interactions


def build_sequences(interactions: pd.DataFrame) -> pd.DataFrame:
    """One row per user: item ids ordered by (timestamp, item id); ties broken by the item id."""
    ordered = interactions.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    users = ordered.drop_duplicates("user_id")
    boundaries = np.flatnonzero(np.diff(ordered["user_id"].to_numpy())) + 1
    per_user = np.split(ordered["item_id"].to_numpy(dtype=np.int64), boundaries)
    return pd.DataFrame({
        "user_id": users["user_id"].to_numpy(dtype=np.int64),
        "source_user_id": users["source_user_id"].to_numpy(dtype=np.int64),
        "items": [seq.tolist() for seq in per_user],
    })


def _check_lengths(sequences: pd.DataFrame, min_count: int, ratings_name: str) -> None:
    short = int((sequences["items"].map(len) < MIN_SEQ_LEN).sum())
    if short:
        raise DataError(f"{ratings_name}: {short} users have fewer than {MIN_SEQ_LEN} interactions after "
                        f"filtering (data.min_count={min_count}); leave-one-out needs train, validation and "
                        f"test items, so set data.min_count >= {MIN_SEQ_LEN}")


def _summary(items: pd.DataFrame, sequences: pd.DataFrame) -> dict[str, Any]:
    lengths = sequences["items"].map(len)
    return {
        "num_users": len(sequences),
        "num_items": len(items),
        "num_interactions": int(lengths.sum()),
        "mean_length": round(float(lengths.mean()), 4),
        "min_length": int(lengths.min()),
        "max_length": int(lengths.max()),
        # Distinct movies can share a display title (remakes, re-listed films); their ids stay distinct.
        "duplicate_titles": int(items["title"].duplicated(keep=False).sum()),
    }
