"""Parsers from each file format to the two canonical tables preprocessing reads.

* interactions: ``user``, ``item`` (int64 ids, or text ids when any id is not a plain integer;
  either may come dictionary-encoded) and ``timestamp`` (int64 or float64; only its order is used);
* titles: ``item`` (the same id type) and ``title`` (as written; cleaned later by the title rule).

Formats: MovieLens ml-latest-small CSVs, ml-100k ``u.data``/``u.item``, ml-1m ``ratings.dat``/
``movies.dat``, Amazon 2014 ratings CSV + metadata JSON lines (2014: Python literals; 2018: JSON),
RecBole atomic files, and any CSV/TSV/Parquet with a column map. Every problem is a DataError
naming the file, and the line (or row) and column where there is one.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rerank_dist.config import ColumnsConfig
from rerank_dist.data.errors import DataError
from rerank_dist.data.tables import (
    CsvLayout,
    RawFile,
    Where,
    csv_where,
    encode,
    ids,
    is_parquet,
    parquet_where,
    read_csv,
    read_header,
    read_parquet_columns,
    show,
    text,
    times,
    unify_ids,
)


@dataclass
class Tables:
    interactions: pa.Table  # user, item, timestamp
    titles: pa.Table  # item, title
    stats: dict[str, int] = field(default_factory=dict)  # what the parser itself resolved, for meta.json


def _tables(users: pa.Array, items: pa.Array, stamps: pa.Array, title_items: pa.Array, titles: pa.Array,
            stats: dict[str, int] | None = None) -> Tables:
    (users,) = unify_ids(users)
    items, title_items = unify_ids(items, title_items)
    return Tables(interactions=pa.table({"user": users, "item": items, "timestamp": stamps}),
                  titles=pa.table({"item": title_items, "title": titles}), stats=stats or {})


# ---------------------------------------------------------------- MovieLens


MOVIELENS_CSV = CsvLayout()


def read_movielens_csv(ratings: RawFile, movies: RawFile) -> Tables:
    """ml-latest-small (and the other "latest" releases): ratings.csv + movies.csv."""
    r = read_csv(ratings, MOVIELENS_CSV, {"userId": "int", "movieId": "int", "timestamp": "int"})
    m = read_csv(movies, MOVIELENS_CSV, {"movieId": "int", "title": "str"})
    return _tables(r["userId"].combine_chunks(), r["movieId"].combine_chunks(), r["timestamp"].combine_chunks(),
                   m["movieId"].combine_chunks(), m["title"].combine_chunks())


ML100K_GENRES = ("unknown", "action", "adventure", "animation", "childrens", "comedy", "crime", "documentary",
                 "drama", "fantasy", "film_noir", "horror", "musical", "mystery", "romance", "sci_fi",
                 "thriller", "war", "western")
U_DATA = CsvLayout(delimiter="\t", quoted=False, header=False, encoding="latin-1",
                   column_names=("user_id", "item_id", "rating", "timestamp"))
U_ITEM = CsvLayout(delimiter="|", quoted=False, header=False, encoding="latin-1",
                   column_names=("movie_id", "movie_title", "release_date", "video_release_date", "imdb_url",
                                 *(f"genre_{g}" for g in ML100K_GENRES)))


def read_ml100k(u_data: RawFile, u_item: RawFile) -> Tables:
    """ml-100k: u.data (user, item, rating, time; tabs) + u.item (24 fields separated by '|', Latin-1)."""
    r = read_csv(u_data, U_DATA, {"user_id": "int", "item_id": "int", "timestamp": "int"})
    m = read_csv(u_item, U_ITEM, {"movie_id": "int", "movie_title": "str"})
    return _tables(r["user_id"].combine_chunks(), r["item_id"].combine_chunks(), r["timestamp"].combine_chunks(),
                   m["movie_id"].combine_chunks(), m["movie_title"].combine_chunks())


RATINGS_DAT = CsvLayout(delimiter="\t", quoted=False, header=False, encoding="latin-1", shown_delimiter="'::'",
                        column_names=("UserID", "MovieID", "Rating", "Timestamp"))


def read_ml1m(ratings_dat: RawFile, movies_dat: RawFile) -> Tables:
    """ml-1m: ratings.dat and movies.dat, fields separated by '::', Latin-1."""
    # pyarrow splits on one character: '::' becomes a tab, which the numeric ratings never contain.
    data = ratings_dat.data if ratings_dat.data is not None else ratings_dat.open_binary().read()
    ratings = RawFile(ratings_dat.origin, data=data.replace(b"::", b"\t"))
    r = read_csv(ratings, RATINGS_DAT, {"UserID": "int", "MovieID": "int", "Timestamp": "int"})
    movie_ids, titles = _read_movies_dat(movies_dat)
    return _tables(r["UserID"].combine_chunks(), r["MovieID"].combine_chunks(), r["Timestamp"].combine_chunks(),
                   movie_ids, titles)


def _read_movies_dat(raw: RawFile) -> tuple[pa.Array, pa.Array]:
    """MovieID::Title::Genres per line. A title may itself hold '::' in principle, so the id is what
    precedes the first separator and the genres what follows the last."""
    movie_ids: list[int] = []
    titles: list[str] = []
    with raw.open_binary() as f:
        for number, line in enumerate(f, start=1):
            row = line.decode("latin-1").rstrip("\r\n")
            if not row:
                continue
            parts = row.split("::")
            if len(parts) < 3:
                raise DataError(f"{raw.origin}: line {number}: expected 3 fields separated by '::' "
                                f"(MovieID, Title, Genres), got {len(parts)}")
            if not parts[0].strip().lstrip("+-").isdigit():
                raise DataError(f"{raw.origin}: column MovieID, line {number}: expected an integer, got {show(parts[0])}")
            movie_ids.append(int(parts[0]))
            titles.append("::".join(parts[1:-1]))
    return pa.array(movie_ids, type=pa.int64()), pa.array(titles, type=pa.string())


# ---------------------------------------------------------------- Amazon


AMAZON_RATINGS = CsvLayout(delimiter=",", quoted=False, header=False,
                           column_names=("user", "item", "rating", "timestamp"))


def read_amazon(ratings_csv: RawFile, metadata: RawFile) -> Tables:
    """Amazon 2014 ``ratings_<Category>.csv`` (user, item, rating, time; no header) + product metadata."""
    r = read_csv(ratings_csv, AMAZON_RATINGS, {"user": "id", "item": "id", "timestamp": "int"})
    where = csv_where(ratings_csv, AMAZON_RATINGS)
    users = ids(r["user"], ratings_csv.origin, "user", where)
    items = ids(r["item"], ratings_csv.origin, "item", where)
    asins, titles, stats = read_amazon_metadata(metadata)
    return _tables(users, items, r["timestamp"].combine_chunks(), asins, titles, stats)


def read_amazon_metadata(raw: RawFile) -> tuple[pa.Array, pa.Array, dict[str, int]]:
    """asin -> title from metadata lines: JSON (2018) or Python literals (2014), never ``eval``.

    As LlamaRec reads it (a dict filled line by line): ids are stripped, a later line for the same
    asin replaces an earlier one, except that a line without a title never replaces a title.
    A 2014 line costs ``ast.literal_eval`` ~150 us (about 40 s for Beauty's 259K lines), a 2018
    JSON line a few: a one-off per prepared dataset.
    """
    titles: dict[str, str] = {}
    lines = 0
    with raw.open_binary() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            lines += 1
            record = _metadata_record(line, raw.origin, number)
            asin = record.get("asin")
            if not isinstance(asin, str) or not asin.strip():
                raise DataError(f"{raw.origin}: line {number}, field asin: expected a product id, got {show(asin)}")
            title = record.get("title")
            if title is None:
                title = ""
            if not isinstance(title, str):
                raise DataError(f"{raw.origin}: line {number}, field title: expected text, got {show(title)}")
            asin = asin.strip()
            if title.strip() or asin not in titles:
                titles[asin] = title
    stats = {"metadata_lines": lines, "duplicate_metadata_ids": lines - len(titles)}
    return pa.array(list(titles), type=pa.string()), pa.array(list(titles.values()), type=pa.string()), stats


def _metadata_record(line: bytes, origin: str, number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError:
        try:
            # The 2014 files are Python reprs ({'asin': '...', ...}); literal_eval reads literals only.
            record = ast.literal_eval(line.decode("utf-8").strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError, UnicodeDecodeError) as e:
            raise DataError(f"{origin}: line {number}: neither a JSON object nor a Python literal "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(record, dict):
        raise DataError(f"{origin}: line {number}: expected an object with asin and title, got {type(record).__name__}")
    return record


# ---------------------------------------------------------------- RecBole atomic files


RECBOLE = CsvLayout(delimiter="\t", quoted=False, header=True)
_RECBOLE_TYPES = {"token", "token_seq", "float", "float_seq"}
# The field names RecBole's own atomic files use, by role: tried in order when data.columns leaves the
# role at its default and that name is not in the file (its MovieLens .item files say movie_title,
# its Amazon ones title), so RecBole's datasets read without naming any column.
RECBOLE_FIELDS = {"user": ("user_id",), "item": ("item_id",), "titles_item": ("item_id",),
                  "timestamp": ("timestamp",), "title": ("title", "movie_title")}


def read_recbole(inter: RawFile, item: RawFile | None, columns: ColumnsConfig) -> Tables:
    """``.inter`` (user, item, time fields) and ``.item`` (item, title fields): tab-separated, each
    header field written ``name:type`` (user_id:token, item_id:token, timestamp:float, title:token_seq).
    A role left at its default column name is also looked up under RecBole's names (RECBOLE_FIELDS)."""
    fields = _recbole_header(inter)
    wanted = {"user": ("token",), "item": ("token",)}
    if columns.timestamp:
        wanted["timestamp"] = ("float",)
    if item is None:
        wanted["title"] = ("token", "token_seq")
    names = {role: _recbole_field(inter, fields, _recbole_names(columns, role), role, kinds)
             for role, kinds in wanted.items()}
    kinds = {"user": "id", "item": "id", "timestamp": "time", "title": "str"}
    table = read_csv(inter, RECBOLE, {header: kinds[role] for role, header in names.items()})
    where = csv_where(inter, RECBOLE)

    def column(role: str) -> pa.Array:
        return table[names[role]].combine_chunks()

    users = ids(column("user"), inter.origin, _plain(names["user"]), where, "field")
    items = ids(column("item"), inter.origin, _plain(names["item"]), where, "field")
    stamps = (times(column("timestamp"), inter.origin, _plain(names["timestamp"]), where, "field")
              if columns.timestamp else _row_order(len(table)))
    if item is None:
        title_items, titles, stats = titles_from_interactions(items, text(column("title"), inter.origin, "title"))
        return _tables(users, items, stamps, title_items, titles, stats)
    item_fields = _recbole_header(item)
    item_name = _recbole_field(item, item_fields, _recbole_names(columns, "titles_item"), "titles_item", ("token",))
    title_name = _recbole_field(item, item_fields, _recbole_names(columns, "title"), "title", ("token", "token_seq"))
    t = read_csv(item, RECBOLE, {item_name: "id", title_name: "str"})
    item_where = csv_where(item, RECBOLE)
    title_items = ids(t[item_name], item.origin, _plain(item_name), item_where, "field")
    return _tables(users, items, stamps, title_items, text(t[title_name], item.origin, _plain(title_name), "field"))


def _recbole_header(raw: RawFile) -> dict[str, tuple[str, str]]:
    """field name -> (header text, type)."""
    fields: dict[str, tuple[str, str]] = {}
    for header in read_header(raw, RECBOLE):
        name, sep, kind = header.partition(":")
        if not sep or kind not in _RECBOLE_TYPES:
            raise DataError(f"{raw.origin}: line 1, field {show(header)}: expected name:type with a type of "
                            f"{', '.join(sorted(_RECBOLE_TYPES))} (e.g. user_id:token)")
        fields[name] = (header, kind)
    return fields


def _recbole_names(columns: ColumnsConfig, role: str) -> tuple[str, ...]:
    """The field names to look for, in order: the configured one, then (only when the configuration
    left the role at its default) RecBole's conventional names; a name the user chose is never replaced."""
    if role == "titles_item":
        configured = columns.titles_item or columns.item
        is_default = not columns.titles_item and columns.item == ColumnsConfig().item
    else:
        configured = getattr(columns, role)
        is_default = configured == getattr(ColumnsConfig(), role)
    conventional = RECBOLE_FIELDS[role] if is_default else ()
    return tuple(dict.fromkeys((configured, *conventional)))


def _recbole_field(raw: RawFile, fields: dict[str, tuple[str, str]], names: tuple[str, ...], role: str,
                   kinds: tuple[str, ...]) -> str:
    name = next((n for n in names if n in fields), None)
    if name is None:
        found = ", ".join(h for h, _ in fields.values())
        looked = " or ".join(names) + (" (RecBole's conventional names)" if len(names) > 1 else "")
        raise DataError(f"{raw.origin}: no field {looked} (found {found}); set data.columns.{role} to the field "
                        f"that holds the {role.replace('titles_', '')}")
    header, kind = fields[name]
    if kind not in kinds:
        raise DataError(f"{raw.origin}: field {name} is declared {header}; expected "
                        f"{' or '.join(f'{name}:{k}' for k in kinds)}")
    return header


def _plain(header: str) -> str:
    return header.partition(":")[0]


# ---------------------------------------------------------------- any CSV / TSV / Parquet


def table_layout(raw: RawFile, separator: str) -> CsvLayout:
    if separator in ("\\t", "tab"):
        separator = "\t"
    if not separator:
        suffixes = [s.lower() for s in (raw.path.suffixes if raw.path is not None else [])]
        separator = "\t" if ".tsv" in suffixes or ".tab" in suffixes else ","
    return CsvLayout(delimiter=separator)


def read_table(inter: RawFile, titles_file: RawFile | None, columns: ColumnsConfig, separator: str = "") -> Tables:
    """Interactions (and optionally titles) from CSV/TSV (optionally .gz) or Parquet, by column name."""
    wanted = {"user": columns.user, "item": columns.item}
    if columns.timestamp:
        wanted["timestamp"] = columns.timestamp
    if titles_file is None:
        wanted["title"] = columns.title
    kinds = {"user": "id", "item": "id", "timestamp": "time", "title": "str"}
    table, where = _read_any(inter, {name: kinds[role] for role, name in wanted.items()}, separator)
    users = ids(table[columns.user], inter.origin, columns.user, where)
    items = ids(table[columns.item], inter.origin, columns.item, where)
    stamps = (times(table[columns.timestamp], inter.origin, columns.timestamp, where)
              if columns.timestamp else _row_order(len(table)))
    if titles_file is None:
        title_items, titles, stats = titles_from_interactions(items, text(table[columns.title], inter.origin,
                                                                          columns.title))
        return _tables(users, items, stamps, title_items, titles, stats)
    item_column = columns.titles_item or columns.item
    t, t_where = _read_any(titles_file, {item_column: "id", columns.title: "str"}, separator)
    title_items = ids(t[item_column], titles_file.origin, item_column, t_where)
    return _tables(users, items, stamps, title_items, text(t[columns.title], titles_file.origin, columns.title))


def _read_any(raw: RawFile, kinds: dict[str, str], separator: str) -> tuple[pa.Table, Where]:
    if raw.path is not None and is_parquet(raw.path):
        return read_parquet_columns(raw, list(kinds)), parquet_where
    layout = table_layout(raw, separator)
    return read_csv(raw, layout, kinds), csv_where(raw, layout)


def titles_from_interactions(items: pa.Array, titles: pa.Array) -> tuple[pa.Array, pa.Array, dict[str, int]]:
    """One title per item from a title column of the interactions: its first non-empty one.
    Items whose rows disagree on the title are counted (``conflicting_titles``)."""
    codes, distinct = encode(items)
    blank = pc.match_substring_regex(titles, r"^\s*$")
    table = pa.table({"code": codes, "title": pc.if_else(blank, pa.scalar(None, pa.string()), titles)})
    grouped = table.group_by("code", use_threads=False).aggregate(
        [("title", "first", pc.ScalarAggregateOptions(skip_nulls=True)), ("title", "count_distinct")])
    conflicting = int(pc.sum(pc.greater(grouped["title_count_distinct"], 1)).as_py() or 0)
    return (distinct.take(grouped["code"].combine_chunks()), grouped["title_first"].combine_chunks().fill_null(""),
            {"conflicting_titles": conflicting})


def _row_order(n: int) -> pa.Array:
    return pa.array(np.arange(n, dtype=np.int64))
