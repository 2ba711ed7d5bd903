"""Every input format, from fixtures written here: the same data in each format parses to the same
canonical tables and prepares to the same sequences; LlamaRec's title rules and its order (untitled
items dropped, then the iterative 5-core) hold in each; malformed files fail with one line naming
the file, the line (or row) and the column."""

from __future__ import annotations

import gzip
import io
import json
import re
import zipfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rerank_dist import pipeline
from rerank_dist.config import ColumnsConfig, ConfigError, DataConfig, describe_fields
from rerank_dist.settings import load_config
from rerank_dist.data import DataError, load_dataset, prepare_data
from rerank_dist.data import sources
from rerank_dist.data.preprocess import clean_titles


def quiet(_msg: str) -> None:
    pass


# ---------------------------------------------------------------- one small dataset, in every format
#
# Users 1-6 each see items 101-105 (one each). Item 106 is seen by users 1-4 only, so the 5-core
# removes it. Item 107 has no usable title but is seen by users 3-7: titles are dropped *before* the
# 5-core (LlamaRec), which leaves user 7 with 4 interactions, so the 5-core removes user 7 too; had
# the 5-core come first, 107 (5 interactions) and user 7 (5 items) would both have stayed. Item 999
# is not in the titles table at all. User 2 sees 101 and 102 at the same time: ties go by item id.

TITLES = {101: "Matrix, The (1999)", 102: "Alien (1979)", 103: "Heat (1995)", 104: "Fargo (1996)",
          105: "Misérables, Les (1995)", 106: "Big (1988)", 107: "   "}


def interactions() -> list[tuple[int, int, int]]:
    rows = []
    for user in range(1, 7):
        for k, item in enumerate(range(101, 106)):
            rows.append((user, item, 1000 * user + (0 if user == 2 and item in (101, 102) else 10 * k)))
    rows += [(user, 106, 1000 * user + 99) for user in range(1, 5)]
    rows += [(user, 107, 1000 * user + 98) for user in range(3, 8)]
    rows += [(7, item, 7000 + k) for k, item in enumerate(range(101, 105))]
    rows += [(1, 999, 1500)]
    # Written out of time order: the order comes from the timestamps.
    return sorted(rows, key=lambda r: (-r[2], r[0]))


EXPECTED_USERS = 6
EXPECTED_SEQUENCE = {1: [1, 2, 3, 4, 5], 2: [1, 2, 3, 4, 5]}  # user 2: tie at one time, item order
MOVIELENS_TITLES = ["The Matrix (1999)", "Alien (1979)", "Heat (1995)", "Fargo (1996)", "Misérables, Les (1995)"]
PLAIN_TITLES = [TITLES[i] for i in range(101, 106)]


def write_ml_latest_small(root: Path) -> DataConfig:
    root.mkdir(parents=True)
    pd.DataFrame(interactions(), columns=["userId", "movieId", "timestamp"]).assign(rating=4.0)[
        ["userId", "movieId", "rating", "timestamp"]].to_csv(root / "ratings.csv", index=False)
    pd.DataFrame({"movieId": list(TITLES), "title": list(TITLES.values()), "genres": "Drama"}).to_csv(
        root / "movies.csv", index=False)
    return DataConfig(source="local", dataset="ml-latest-small", raw_dir=str(root))


def write_ml100k(root: Path) -> DataConfig:
    folder = root / "ml-100k"  # as the release archive unpacks
    folder.mkdir(parents=True)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t3\t{t}\n" for u, i, t in interactions()))
    genres = "|".join(["0"] * 19)
    (folder / "u.item").write_bytes("".join(
        f"{i}|{title}|01-Jan-1995||http://us.imdb.com/M/title-exact?x|{genres}\n" for i, title in TITLES.items()
    ).encode("latin-1"))
    return DataConfig(source="local", dataset="ml-100k", raw_dir=str(root))


def ml1m_files() -> dict[str, bytes]:
    return {
        "ratings.dat": "".join(f"{u}::{i}::3::{t}\n" for u, i, t in interactions()).encode("latin-1"),
        "movies.dat": "".join(f"{i}::{title}::Drama|Comedy\n" for i, title in TITLES.items()).encode("latin-1"),
    }


def write_ml1m(root: Path) -> DataConfig:
    root.mkdir(parents=True)
    for name, data in ml1m_files().items():
        (root / name).write_bytes(data)
    return DataConfig(source="local", dataset="ml-1m", raw_dir=str(root))


def ml1m_zip() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in ml1m_files().items():
            zf.writestr(f"ml-1m/{name}", data)
        zf.writestr("ml-1m/README", "MovieLens 1M")
    return out.getvalue()


def write_ml1m_archive(root: Path) -> DataConfig:
    root.mkdir(parents=True)
    (root / "ml-1m.zip").write_bytes(ml1m_zip())
    return DataConfig(source="local", dataset="ml-1m", raw_dir=str(root))


def amazon_metadata(python_literals: bool) -> bytes:
    lines = []
    for item, title in TITLES.items():
        record = {"asin": str(item), "title": title, "related": {"also_bought": ["B0001"]}, "price": 9.5,
                  "categories": [["Beauty", "Skin Care"]]}
        lines.append(repr(record) if python_literals else json.dumps(record))
    lines.append(repr({"asin": "555", "categories": [["Beauty"]]}) if python_literals else
                 json.dumps({"asin": "555", "categories": [["Beauty"]]}))  # no title at all
    return ("\n".join(lines) + "\n").encode()


def amazon_ratings() -> str:
    return "".join(f"{u},{i},5.0,{t}\n" for u, i, t in interactions())


def write_beauty(root: Path) -> DataConfig:
    """The 2014 layout: metadata as Python literals, gzipped."""
    root.mkdir(parents=True)
    (root / "ratings_Beauty.csv").write_text(amazon_ratings())
    (root / "meta_Beauty.json.gz").write_bytes(gzip.compress(amazon_metadata(python_literals=True)))
    return DataConfig(source="local", dataset="beauty", raw_dir=str(root))


def write_games(root: Path) -> DataConfig:
    """LlamaRec's Games: 2014 ratings, 2018 metadata (strict JSON lines), here uncompressed."""
    root.mkdir(parents=True)
    (root / "ratings_Video_Games.csv").write_text(amazon_ratings())
    (root / "meta_Video_Games.json").write_bytes(amazon_metadata(python_literals=False))
    return DataConfig(source="local", dataset="games", raw_dir=str(root))


def write_recbole(root: Path) -> DataConfig:
    root.mkdir(parents=True)
    (root / "mine.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
        f"{u}\t{i}\t4.0\t{t}.0\n" for u, i, t in interactions()))
    (root / "mine.item").write_text("item_id:token\ttitle:token_seq\tprice:float\n" + "".join(
        f"{i}\t{title}\t9.5\n" for i, title in TITLES.items()))
    return DataConfig(source="local", dataset="custom", format="recbole", raw_dir=str(root))


def write_recbole_movielens(root: Path) -> DataConfig:
    """RecBole's MovieLens atomic files (ml-1m.item): the title field is movie_title, and no column is configured."""
    root.mkdir(parents=True)
    (root / "ml-1m.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
        f"{u}\t{i}\t4.0\t{t}\n" for u, i, t in interactions()))
    (root / "ml-1m.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tgenre:token_seq\n"
                                     + "".join(f"{i}\t{title}\t1999\tDrama\n" for i, title in TITLES.items()))
    return DataConfig(source="local", dataset="custom", format="recbole", raw_dir=str(root))


def write_table_csv(root: Path) -> DataConfig:
    """Interactions and a separate titles table, with other column names and ISO date-times."""
    root.mkdir(parents=True)
    frame = pd.DataFrame(interactions(), columns=["visitor", "product", "t"])
    frame["t"] = pd.to_datetime(frame["t"], unit="s").dt.strftime("%Y-%m-%dT%H:%M:%S")
    frame.to_csv(root / "events.csv", index=False)
    pd.DataFrame({"sku": list(TITLES), "name": list(TITLES.values())}).to_csv(root / "catalog.csv", index=False)
    return DataConfig(source="local", dataset="custom", format="table", raw_dir=str(root),
                      interactions_file="events.csv", titles_file="catalog.csv",
                      columns=ColumnsConfig(user="visitor", item="product", timestamp="t", title="name",
                                            titles_item="sku"))


def write_table_parquet(root: Path) -> DataConfig:
    """One Parquet file whose rows carry the title too (no titles table)."""
    root.mkdir(parents=True)
    frame = pd.DataFrame(interactions(), columns=["user_id", "item_id", "timestamp"])
    frame["title"] = frame["item_id"].map(TITLES).fillna("")
    frame.to_parquet(root / "log.parquet", index=False)
    return DataConfig(source="local", dataset="custom", format="table", raw_dir=str(root),
                      interactions_file="log.parquet")


def write_table_tsv(root: Path) -> DataConfig:
    """A gzipped TSV with the title column and epoch-second floats."""
    root.mkdir(parents=True)
    lines = ["user_id\titem_id\ttimestamp\ttitle"] + [f"{u}\t{i}\t{t}.5\t{TITLES.get(i, '')}" for u, i, t in interactions()]
    (root / "log.tsv.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    return DataConfig(source="local", dataset="custom", format="table", raw_dir=str(root),
                      interactions_file="log.tsv.gz")


FORMATS = {
    "ml-latest-small": (write_ml_latest_small, MOVIELENS_TITLES),
    "ml-100k": (write_ml100k, MOVIELENS_TITLES),
    "ml-1m": (write_ml1m, MOVIELENS_TITLES),
    "ml-1m-archive": (write_ml1m_archive, MOVIELENS_TITLES),
    "beauty-2014-literals": (write_beauty, PLAIN_TITLES),
    "games-2018-json": (write_games, PLAIN_TITLES),
    "recbole": (write_recbole, PLAIN_TITLES),
    "recbole-movielens": (write_recbole_movielens, PLAIN_TITLES),
    "table-csv": (write_table_csv, PLAIN_TITLES),
    "table-parquet": (write_table_parquet, PLAIN_TITLES),
    "table-tsv-gz": (write_table_tsv, PLAIN_TITLES),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_parses_to_the_same_canonical_tables(tmp_path, fmt):
    write, _ = FORMATS[fmt]
    raw = sources.load_raw(write(tmp_path / "raw"), tmp_path / "cache")
    assert raw.interactions.column_names == ["user", "item", "timestamp"]
    assert raw.titles.column_names == ["item", "title"]
    for column in (raw.interactions["user"], raw.interactions["item"], raw.titles["item"]):  # ids as numbers
        assert pa.types.is_integer(getattr(column.type, "value_type", column.type))
    got = sorted(zip(*(raw.interactions[c].to_pylist() for c in ("user", "item"))))
    assert got == sorted((u, i) for u, i, _ in interactions())
    if fmt == "table-csv":  # ISO date-times: nanoseconds since 1970
        assert sorted(raw.interactions["timestamp"].to_pylist()) == sorted(t * 10**9 for *_, t in interactions())
    else:
        offset = 0.5 if fmt == "table-tsv-gz" else 0
        assert sorted(raw.interactions["timestamp"].to_pylist()) == sorted(t + offset for *_, t in interactions())
    titles = dict(zip(raw.titles["item"].to_pylist(), raw.titles["title"].to_pylist()))
    if fmt in ("table-parquet", "table-tsv-gz"):  # titles from the interactions: items that occur, 999 untitled
        assert titles == {**{i: TITLES[i] for i in range(101, 107)}, 107: "", 999: ""}
    elif fmt.startswith(("beauty", "games")):  # the metadata line without a title counts as untitled
        assert titles == {**TITLES, 555: ""}
    else:
        assert titles == TITLES


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_prepares_with_llamarec_title_rules_and_5_core_order(tmp_path, fmt):
    write, expected_titles = FORMATS[fmt]
    cfg = write(tmp_path / "raw")
    meta = prepare_data(cfg, tmp_path / "data", tmp_path / "cache", log=quiet)
    ds = load_dataset(tmp_path / "data")
    # 107 untitled -> dropped first; then 106 (4 users) and user 7 (4 items) fall to the 5-core.
    assert (meta["num_users"], meta["num_items"], meta["num_interactions"]) == (EXPECTED_USERS, 5, 30)
    assert [ds.titles[i] for i in range(1, 6)] == expected_titles
    assert all(ds.sequences[u] == EXPECTED_SEQUENCE.get(u, [1, 2, 3, 4, 5]) for u in ds.sequences)
    assert pd.read_parquet(tmp_path / "data" / "items.parquet")["source_id"].tolist() == [101, 102, 103, 104, 105]
    fx = meta["fixups"]
    titles_in_log = fmt in ("table-parquet", "table-tsv-gz")  # 999 is then a known item without a title
    assert fx["empty_titles"] == (2 if fmt.startswith(("beauty", "games")) or titles_in_log else 1)
    assert fx["untitled_item_interactions"] == (6 if titles_in_log else 5)  # item 107's (and 999's)
    assert fx["unknown_item_interactions"] == (0 if titles_in_log else 1)  # item 999's
    assert fx["kcore_removed_interactions"] == 4 + 4  # item 106's, then user 7's remaining four
    assert meta["raw"]["raw_interactions"] == len(interactions())
    assert meta["title_rule"] == ("movielens" if fmt.startswith("ml-") else "plain")


def test_titles_dropped_before_the_5_core_not_after(tmp_path):
    """The same data with item 107 titled keeps user 7 and item 107: the order is what removed them."""
    cfg = write_ml1m(tmp_path / "raw")
    movies = Path(cfg.raw_dir) / "movies.dat"
    movies.write_bytes(movies.read_bytes().replace(b"107::   ::", b"107::Se7en (1995)::"))
    meta = prepare_data(cfg, tmp_path / "data", tmp_path / "cache", log=quiet)
    assert (meta["num_users"], meta["num_items"]) == (7, 6)


def test_amazon_ids_stay_text_and_repeated_metadata_follows_llamarec(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    users = [f"A{u:03d}XZ" for u in range(6)]
    asins = ["0205616461", "B000052YJM", "B00004TMFE", "0912777688", "B00KOZ0LSQ"]
    (root / "ratings_Beauty.csv").write_text(
        "".join(f"{u},{a},5.0,{1300000000 + 10 * k + j}\n" for j, u in enumerate(users) for k, a in enumerate(asins)))
    meta_lines = [repr({"asin": a, "title": f"  Product\n {k}  "}) for k, a in enumerate(asins)]
    # A repeat with a new title replaces the old one; a repeat without one never removes a title.
    meta_lines += [repr({"asin": asins[0], "title": "Renamed"}), repr({"asin": asins[1]})]
    (root / "meta_Beauty.json.gz").write_bytes(gzip.compress("\n".join(meta_lines).encode()))
    meta = prepare_data(DataConfig(source="local", dataset="beauty", raw_dir=str(root)), tmp_path / "data",
                        tmp_path / "cache", log=quiet)
    items = pd.read_parquet(tmp_path / "data" / "items.parquet")
    assert items["source_id"].tolist() == sorted(asins)  # text ids: "0205616461" is not the number 205616461
    titles = dict(zip(items["source_id"], items["title"]))
    assert titles["0205616461"] == "Renamed" and titles["B000052YJM"] == "Product 1"  # whitespace collapsed
    assert meta["fixups"]["duplicate_metadata_ids"] == 2 and meta["fixups"]["whitespace_fixed"] == 4
    seqs = pd.read_parquet(tmp_path / "data" / "sequences.parquet")
    assert seqs["source_user_id"].tolist() == users
    assert meta["source"]["official_release"] is None and meta["source"]["pinned"] == "not pinned"


def test_amazon_metadata_is_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    root = tmp_path / "raw"
    root.mkdir()
    (root / "ratings_Beauty.csv").write_text("U1,B1,5.0,1\n")
    (root / "meta_Beauty.json.gz").write_bytes(gzip.compress(
        f"{{'asin': 'B1', 'title': 'ok'}}\n__import__('pathlib').Path({str(marker)!r}).touch()\n".encode()))
    with pytest.raises(DataError, match=r"meta_Beauty.json.gz: line 2: neither a JSON object nor a Python literal"):
        prepare_data(DataConfig(source="local", dataset="beauty", raw_dir=str(root)), tmp_path / "data",
                     tmp_path / "cache", log=quiet)
    assert not marker.exists()


def test_plain_rule_is_vectorised_and_matches_python_whitespace():
    raw = pa.array(["  a\t b\n", "x\u00a0\u00a0y", "", " \u2003 ", "ok"])
    cleaned, fixed = clean_titles(raw, "plain")
    assert cleaned.to_pylist() == ["a b", "x y", "", "", "ok"] and fixed == 3


@pytest.mark.parametrize("title_field", ["title", "movie_title"])
def test_recbole_title_field_in_the_inter_file_and_row_order_as_time(tmp_path, title_field):
    """No .item file: the .inter's title field (RecBole's MovieLens files call it movie_title, found
    without configuration); data.columns.timestamp='' uses the file's order."""
    root = tmp_path / "raw"
    root.mkdir()
    rows = [(u, i) for u in (1, 2, 3) for i in (30, 10, 20)]
    (root / "x.inter").write_text(f"user_id:token\titem_id:token\t{title_field}:token_seq\n"
                                  + "".join(f"{u}\t{i}\tItem {i}\n" for u, i in rows))
    cfg = DataConfig(source="local", dataset="custom", format="recbole", raw_dir=str(root), min_count=3,
                     columns=ColumnsConfig(timestamp=""))
    assert cfg.columns.title == ColumnsConfig().title == "title"  # precondition: the default column name
    prepare_data(cfg, tmp_path / "data", tmp_path / "cache", log=quiet)
    ds = load_dataset(tmp_path / "data")
    assert ds.titles == {1: "Item 10", 2: "Item 20", 3: "Item 30"}
    assert ds.sequences[1] == [3, 1, 2]  # file order 30, 10, 20


def test_recbole_a_configured_title_field_is_not_replaced_by_a_conventional_one(tmp_path):
    """data.columns.title set by the user and absent: an error naming it, not a quiet switch to movie_title."""
    cfg = write_recbole_movielens(tmp_path / "raw")
    cfg.columns = ColumnsConfig(title="name")
    _fails(cfg, tmp_path, r"ml-1m.item: no field name \(found item_id:token, movie_title:token_seq, "
                          r"release_year:token, genre:token_seq\); set data.columns.title")


def test_table_csv_with_a_byte_order_mark(tmp_path):
    cfg = write_table_csv(tmp_path / "raw")
    events = Path(cfg.raw_dir) / "events.csv"
    events.write_bytes(b"\xef\xbb\xbf" + events.read_bytes())  # as spreadsheet programs save "UTF-8 CSV"
    assert prepare_data(cfg, tmp_path / "data", tmp_path / "cache", log=quiet)["num_users"] == EXPECTED_USERS


def test_table_titles_in_the_interactions_count_conflicts(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    rows = [(u, i, u * 10 + i) for u in (1, 2, 3) for i in (1, 2, 3)]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    frame["title"] = frame["item_id"].map({1: "One", 2: "Two", 3: "Three"})
    frame.loc[(frame["user_id"] == 1) & (frame["item_id"] == 1), "title"] = ""  # a blank: not a conflict
    frame.loc[(frame["user_id"] == 3) & (frame["item_id"] == 2), "title"] = "Deux"
    frame.to_csv(root / "log.csv", index=False)
    cfg = DataConfig(source="local", dataset="custom", format="table", raw_dir=str(root), interactions_file="log.csv",
                     min_count=3)
    meta = prepare_data(cfg, tmp_path / "data", tmp_path / "cache", log=quiet)
    assert load_dataset(tmp_path / "data").titles == {1: "One", 2: "Two", 3: "Three"}  # first non-empty
    assert meta["fixups"]["conflicting_titles"] == 1


def test_local_table_changes_redo_prepare(tmp_path):
    """The pipeline's fingerprint covers the files a table (or RecBole) source reads."""
    cfg_data = write_table_csv(tmp_path / "raw")
    overrides = [f"run_dir={tmp_path / 'run'}", "data.source=local", "data.dataset=custom", "data.format=table",
                 f"data.raw_dir={cfg_data.raw_dir}", "data.interactions_file=events.csv",
                 "data.titles_file=catalog.csv", "data.columns.user=visitor", "data.columns.item=product",
                 "data.columns.timestamp=t", "data.columns.title=name", "data.columns.titles_item=sku"]
    cfg = load_config(None, overrides)
    lines: list[str] = []
    pipeline.prepare(cfg, log=lines.append)
    pipeline.prepare(cfg, log=lines.append)
    assert "[prepare] up to date" in lines[-1]
    catalog = Path(cfg_data.raw_dir) / "catalog.csv"
    catalog.write_text(catalog.read_text().replace("Alien (1979)", "Aliens (1986)"))
    pipeline.prepare(cfg, log=lines.append)
    assert "up to date" not in lines[-1]
    assert load_dataset(tmp_path / "run" / "data").titles[2] == "Aliens (1986)"


def test_prepare_prints_statistics_next_to_llamarec_table_2(tmp_path):
    lines: list[str] = []
    prepare_data(DataConfig(), tmp_path / "data", tmp_path / "cache", log=lines.append)
    assert "data:                   this run    LlamaRec" in lines
    assert "data: users                  610         610" in lines
    assert "data: mean length         147.99      147.99" in lines
    assert any("defaults for ml-latest-small: title rule movielens" in line and "retriever.max_len 200" in line
               for line in lines)
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["dataset_defaults"] == {"title_rule": "movielens", "retriever.max_len": 200, "retriever.batch_size": 16}
    assert meta["llamarec_table2"]["users"] == 610


def test_amazon_prints_its_table_2_row(tmp_path):
    lines: list[str] = []
    prepare_data(write_beauty(tmp_path / "raw"), tmp_path / "data", tmp_path / "cache", log=lines.append)
    assert "data: users                    6      22,332" in lines
    assert "data: interactions            30        198K" in lines
    assert any("retriever.max_len 50, retriever.batch_size 64" in line for line in lines)
    assert any("checksums not pinned" in line for line in lines)


# ---------------------------------------------------------------- malformed files: one line each


def _fails(cfg: DataConfig, tmp_path: Path, pattern: str) -> str:
    with pytest.raises(DataError) as err:
        prepare_data(cfg, tmp_path / "data", tmp_path / "cache", log=quiet)
    message = str(err.value)
    assert "\n" not in message, message
    assert re.search(pattern, message), message
    assert not (tmp_path / "data").exists()  # nothing half-written
    return message


def _edit(path: Path, old: bytes, new: bytes, count: int = 1) -> None:
    data = path.read_bytes()
    assert old in data, (path, old)
    path.write_bytes(data.replace(old, new, count))


def test_ml_latest_small_bad_value_names_line_and_column(tmp_path):
    cfg = write_ml_latest_small(tmp_path / "raw")
    ratings = Path(cfg.raw_dir) / "ratings.csv"
    lines = ratings.read_text().splitlines()
    lines[4] = lines[4].replace(lines[4].split(",")[1], "x1", 1)
    ratings.write_text("\n".join(lines) + "\n")
    _fails(cfg, tmp_path, r"ratings.csv: column movieId, line 5: expected an integer, got 'x1'")


def test_ml_latest_small_line_numbers_count_quoted_newlines(tmp_path):
    cfg = write_ml_latest_small(tmp_path / "raw")
    movies = Path(cfg.raw_dir) / "movies.csv"
    movies.write_text('movieId,title,genres\n101,"Two\nLines (2000)",Drama\n10x,Alien (1979),Horror\n')
    _fails(cfg, tmp_path, r"movies.csv: column movieId, line 4: expected an integer, got '10x'")


@pytest.mark.parametrize("member, old, new, pattern", [
    ("u.data", b"\t103\t", b"\t1o3\t", r"u.data: column item_id, line \d+: expected an integer, got '1o3'"),
    ("u.data", b"\t3\t", b"\t", r"u.data: line \d+: expected 4 fields separated by tabs \(user_id, item_id, rating, "
                                r"timestamp\), got 3"),
    ("u.item", b"104|", b"one-o-four|", r"u.item: column movie_id, line 4: expected an integer, got 'one-o-four'"),
])
def test_ml100k_malformed(tmp_path, member, old, new, pattern):
    cfg = write_ml100k(tmp_path / "raw")
    _edit(Path(cfg.raw_dir) / "ml-100k" / member, old, new)
    _fails(cfg, tmp_path, pattern)


@pytest.mark.parametrize("member, old, new, pattern", [
    ("ratings.dat", b"::105::", b"::10S::", r"ratings.dat: column MovieID, line \d+: expected an integer, got '10S'"),
    ("ratings.dat", b"::3::", b"::3", r"ratings.dat: line \d+: expected 4 fields separated by '::'"),
    ("movies.dat", b"103::Heat (1995)::Drama|Comedy", b"103::Heat (1995)",
     r"movies.dat: line 3: expected 3 fields separated by '::' \(MovieID, Title, Genres\), got 2"),
    ("movies.dat", b"104::", b"x104::", r"movies.dat: column MovieID, line 4: expected an integer, got 'x104'"),
])
def test_ml1m_malformed(tmp_path, member, old, new, pattern):
    cfg = write_ml1m(tmp_path / "raw")
    _edit(Path(cfg.raw_dir) / member, old, new)
    _fails(cfg, tmp_path, pattern)


def test_ml1m_archive_without_a_member(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("ml-1m/ratings.dat", ml1m_files()["ratings.dat"])
    (root / "ml-1m.zip").write_bytes(out.getvalue())
    _fails(DataConfig(source="local", dataset="ml-1m", raw_dir=str(root)), tmp_path,
           r"ml-1m.zip: archive lacks movies.dat \(expected ratings.dat and movies.dat\)")


def test_local_named_dataset_missing_files(tmp_path):
    (tmp_path / "raw").mkdir()
    _fails(DataConfig(source="local", dataset="games", raw_dir=str(tmp_path / "raw")), tmp_path,
           r"ratings_Video_Games.csv: file not found \(data.source=local with data.dataset=games reads "
           r"ratings_Video_Games.csv and meta_Video_Games.json.gz from data.raw_dir\)")


@pytest.mark.parametrize("which, content, pattern", [
    ("ratings", "U1,101,5.0,100\nU2,102,5.0,soon\n", r"ratings_Beauty.csv: column timestamp, line 2: expected an integer, got 'soon'"),
    ("ratings", "U1,101,5.0,100\nU2,102,100\n", r"ratings_Beauty.csv: line 2: expected 4 fields separated by commas"),
    ("ratings", "U1,101,5.0,100\n,102,5.0,100\n", r"ratings_Beauty.csv: column user, line 2: expected an id, got ''"),
    ("meta", "{'asin': '101', 'title': 'A'}\n{'asin': '102', 'title': 'B'\n",
     r"meta_Beauty.json.gz: line 2: neither a JSON object nor a Python literal \(SyntaxError"),
    ("meta", "{'asin': '101', 'title': 'A'}\n\n{'title': 'B'}\n", r"meta_Beauty.json.gz: line 3, field asin: expected a product id, got nothing"),
    ("meta", "{'asin': '101', 'title': ['A']}\n", r"meta_Beauty.json.gz: line 1, field title: expected text, got \['A'\]$"),
    ("meta", "['101', 'A']\n", r"meta_Beauty.json.gz: line 1: expected an object with asin and title, got list"),
])
def test_amazon_malformed(tmp_path, which, content, pattern):
    cfg = write_beauty(tmp_path / "raw")
    if which == "ratings":
        (Path(cfg.raw_dir) / "ratings_Beauty.csv").write_text(content)
    else:
        (Path(cfg.raw_dir) / "meta_Beauty.json.gz").write_bytes(gzip.compress(content.encode()))
    _fails(cfg, tmp_path, pattern)


@pytest.mark.parametrize("member, old, new, pattern", [
    ("mine.inter", b"user_id:token", b"user_id", r"mine.inter: line 1, field 'user_id': expected name:type"),
    ("mine.inter", b"timestamp:float", b"timestamp:token",
     r"mine.inter: field timestamp is declared timestamp:token; expected timestamp:float"),
    ("mine.inter", b"timestamp:float", b"time:float",
     r"mine.inter: no field timestamp \(found user_id:token, item_id:token, rating:float, time:float\); "
     r"set data.columns.timestamp"),
    ("mine.inter", b"\t4.0\t7098", b"\t4.0\tnoon", r"mine.inter: field timestamp, line 2: expected a number like the "
                                                       r"other values, got 'noon.0'"),
    ("mine.inter", b"\t4.0\t", b"\t", r"mine.inter: line 2: expected 4 fields separated by tabs"),
    ("mine.item", b"title:token_seq", b"name:token_seq", r"mine.item: no field title or movie_title \(RecBole's "
     r"conventional names\) \(found item_id:token, name:token_seq, price:float\); set data.columns.title"),
])
def test_recbole_malformed(tmp_path, member, old, new, pattern):
    cfg = write_recbole(tmp_path / "raw")
    _edit(Path(cfg.raw_dir) / member, old, new)
    _fails(cfg, tmp_path, pattern)


def test_recbole_needs_exactly_one_inter_file(tmp_path):
    cfg = write_recbole(tmp_path / "raw")
    (Path(cfg.raw_dir) / "other.inter").write_text("user_id:token\titem_id:token\n")
    _fails(cfg, tmp_path, r"raw: expected one .inter file, found mine.inter, other.inter; set data.interactions_file")


def test_table_malformed_csv(tmp_path):
    cfg = write_table_csv(tmp_path / "raw")
    events = Path(cfg.raw_dir) / "events.csv"
    lines = events.read_text().splitlines()
    lines[3] = "," + lines[3].split(",", 1)[1]  # no visitor on line 4
    events.write_text("\n".join(lines) + "\n")
    _fails(cfg, tmp_path, r"events.csv: column visitor, line 4: expected an id, got ''")
    lines[3] = "5,101,yesterday"
    events.write_text("\n".join(lines) + "\n")
    _fails(cfg, tmp_path, r"events.csv: column t, line 4: expected a number or a date-time, got 'yesterday'")
    lines[3] = "5,101"
    events.write_text("\n".join(lines) + "\n")
    _fails(cfg, tmp_path, r"events.csv: line 4: expected 3 fields separated by commas \(visitor, product, t\), got 2")


def test_table_missing_column_and_file(tmp_path):
    cfg = write_table_csv(tmp_path / "raw")
    cfg.columns.user = "user"
    _fails(cfg, tmp_path, r"events.csv: missing column\(s\) user; expected columns user, product, t "
                          r"\(found visitor, product, t\)")
    cfg.columns.user = "visitor"
    cfg.titles_file = "nope.csv"
    _fails(cfg, tmp_path, r"nope.csv: file not found \(data.titles_file\)")


def test_table_malformed_parquet(tmp_path):
    cfg = write_table_parquet(tmp_path / "raw")
    path = Path(cfg.raw_dir) / "log.parquet"
    table = pq.read_table(path)
    users = table["user_id"].to_pylist()
    users[2] = None
    pq.write_table(table.set_column(0, "user_id", pa.array(users, pa.int64())), path)
    _fails(cfg, tmp_path, r"log.parquet: column user_id, row 3: expected an id, got nothing")
    pq.write_table(table.set_column(2, "timestamp", pa.array([1.5] * len(table))).set_column(
        0, "user_id", pa.array([0.5] * len(table))), path)
    _fails(cfg, tmp_path, r"log.parquet: column user_id: expected integer or text ids, got double")
    path.write_bytes(b"PAR1 not really")
    _fails(cfg, tmp_path, r"log.parquet: not a readable Parquet file")


def test_items_that_match_no_titles_say_so(tmp_path):
    cfg = write_table_csv(tmp_path / "raw")
    catalog = Path(cfg.raw_dir) / "catalog.csv"
    catalog.write_text("sku,name\nX1,Something\n")
    _fails(cfg, tmp_path, r"events.csv: none of its \d+ interactions names an item with a usable title in "
                          r".*catalog.csv \(\d+ name unknown items, 0 untitled ones\); check that the item ids match")


# ---------------------------------------------------------------- configuration


def test_dataset_defaults_fill_only_the_fields_a_run_leaves_unset(tmp_path):
    amazon = ["data.dataset=beauty", "data.source=download"]
    assert (load_config().retriever.max_len, load_config().retriever.batch_size) == (200, 16)
    cfg = load_config(None, amazon)
    assert (cfg.retriever.max_len, cfg.retriever.batch_size) == (50, 64)  # LlamaRec's Amazon settings
    cfg = load_config(None, amazon + ["retriever.max_len=200"])
    assert (cfg.retriever.max_len, cfg.retriever.batch_size) == (200, 64)
    yaml_file = tmp_path / "games.yaml"
    yaml_file.write_text("data:\n  dataset: games\n  source: download\nretriever:\n  batch_size: 8\n")
    cfg = load_config(yaml_file)
    assert (cfg.retriever.max_len, cfg.retriever.batch_size) == (50, 8)
    # A recorded run keeps its values (explicit or not) unless the command changes the dataset.
    recorded = load_config(None, amazon + ["retriever.max_len=120"])
    assert load_config(None, ["train.lr=1e-4"], base=recorded).retriever.max_len == 120
    assert load_config(None, ["data.dataset=ml-1m"], base=recorded).retriever.max_len == 200


def test_validation_reports_every_data_problem_before_anything_loads():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.dataset=custom", "data.source=bundled", "data.title_rule=fancy",
                           "data.csv_separator=;;", "data.interactions_file=x.csv", "data.columns.item="])
    lines = str(err.value).splitlines()
    assert any(line.startswith("data.title_rule: expected one of ['auto', 'movielens', 'plain']") for line in lines)
    assert "data.source: only ml-latest-small is bundled; use download or local for data.dataset=custom" in lines
    assert "data.format: data.dataset=custom has no release files; set recbole or table" in lines
    assert any(line.startswith("data.csv_separator: expected one character") for line in lines)
    assert "data.interactions_file: only read with data.format=recbole or table, not native" in lines
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.dataset=custom", "data.format=table", "data.source=download",
                           "data.columns.item="])
    lines = str(err.value).splitlines()
    assert lines == ["data.source: data.format=table reads your own files; set data.source=local",
                     "data.interactions_file: required when data.format=table (a CSV, TSV or Parquet file)",
                     "data.columns.item: expected a column name, got ''"]
    with pytest.raises(ConfigError, match="data.dataset: expected one of .*'beauty', 'custom', 'games', 'ml-100k'"):
        load_config(None, ["data.dataset=netflix"])


def test_every_data_field_is_typed_and_documented():
    lines = [line for line in describe_fields() if line.startswith("data.")]
    assert "data.columns.user (str, default 'user_id'): column (RecBole: field) holding the user id" in lines
    assert any(line.startswith("data.title_rule (str, default 'auto'): auto (the dataset's") for line in lines)
    assert any(line.startswith("retriever.max_len (int, default 200): longest input sequence; unset")
               for line in describe_fields())
