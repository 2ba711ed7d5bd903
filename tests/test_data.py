"""Data stage: title rules, k-core, re-indexing, leave-one-out, sources, errors, atomic writes."""

from __future__ import annotations

import io
import json
import urllib.error
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from rerank_dist.config import DataConfig
from rerank_dist.data import (
    DataError,
    history_and_target,
    load_dataset,
    prefix_len_for,
    prepare_data,
    train_prefix_lens,
)
from rerank_dist.data import sources
from rerank_dist.data.preprocess import clean_title, k_core, preprocess


def quiet(_msg: str) -> None:
    pass


def write_local(root: Path, ratings: list[tuple], movies: list[tuple] | str) -> Path:
    """ratings: (userId, movieId, timestamp); movies: (movieId, title) rows or raw CSV text."""
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(ratings, columns=["userId", "movieId", "timestamp"]).assign(rating=4.0).to_csv(
        root / "ratings.csv", index=False)
    if isinstance(movies, str):
        (root / "movies.csv").write_text(movies, encoding="utf-8")
    else:
        pd.DataFrame(movies, columns=["movieId", "title"]).assign(genres="Drama").to_csv(
            root / "movies.csv", index=False)
    return root


def local_cfg(root: Path, min_count: int = 1) -> DataConfig:
    return DataConfig(source="local", raw_dir=str(root), min_count=min_count)


def dense_block(users: range, movies: range, t0: int = 0) -> list[tuple]:
    return [(u, m, t0 + k) for u in users for k, m in enumerate(movies)]


# ---------------------------------------------------------------- titles


@pytest.mark.parametrize("raw, expected", [
    ("American President, The (1995)", "The American President (1995)"),
    ("City of Lost Children, The (Cité des enfants perdus, La) (1995)", "The City of Lost Children (1995)"),
    ("Awfully Big Adventure, An (1995)", "An Awfully Big Adventure (1995)"),
    ("Man Escaped, A (Un  condamné à mort s'est échappé) (1956)", "A Man Escaped (1956)"),
    ("Léon: The Professional (a.k.a. The Professional) (Léon) (1994)", "Léon: The Professional (1994)"),
    ("Good, the Bad and the Ugly, The (Buono, il brutto, il cattivo, Il) (1966)",
     "The Good, the Bad and the Ugly (1966)"),
    ("Toy Story (1995)", "Toy Story (1995)"),
    ("Runaway Brain (1995) ", "Runaway Brain (1995)"),  # trailing space in movies.csv
    ("Blind Side, The  (2009)", "The Blind Side (2009)"),
    ("Babylon 5", "Babylon 5"),  # no year: nothing to re-append
    ("Death Note: Desu nôto (2006–2007)", "Death Note: Desu nôto"),  # a year range is not " (YYYY)"
    ("(500) Days of Summer (2009)", "(500) Days of Summer (2009)"),  # a leading parenthetical is the name
    ("Nested (a (b)) Title, The (2001)", "The Nested Title (2001)"),
    ("Line\nbreak,\tThe (2000)", "The Line break (2000)"),
    ("Misérables, Les (1995)", "Misérables, Les (1995)"),  # only The / A / An move
    ("(Untitled) (2003)", "(Untitled) (2003)"),  # only a parenthetical: keep it rather than lose the item
    ("   ", ""),
    ("(1999)", ""),
])
def test_clean_title(raw, expected):
    assert clean_title(raw) == expected


def test_titles_with_newlines_are_counted_and_empty_titles_dropped(tmp_path):
    movies = 'movieId,title,genres\n1,"Two\nLines (2000)",Drama\n2,Plain (2001),Drama\n3,"",Drama\n4,Four (2004),Drama\n'
    root = write_local(tmp_path / "raw", dense_block(range(1, 4), range(1, 5)), movies)
    meta = prepare_data(local_cfg(root), tmp_path / "data", tmp_path / "cache", log=quiet)
    assert meta["fixups"]["whitespace_fixed"] == 1
    assert meta["fixups"]["empty_titles"] == 1
    assert meta["fixups"]["untitled_item_interactions"] == 3
    ds = load_dataset(tmp_path / "data")
    assert ds.titles == {1: "Two Lines (2000)", 2: "Plain (2001)", 3: "Four (2004)"}


# ---------------------------------------------------------------- filtering and ordering


def test_k_core_iterates_until_stable():
    # Users 4 and 5 with movies 100/101 form the 2-core. Dropping movie 1 (1 rating) and user 3 leaves
    # user 1 and movie 3 with a single interaction, which in turn leaves user 2 and movie 2 with one:
    # a single pass would keep users 1-2 and movies 2-3.
    rows = [(1, 1, 0), (1, 2, 1), (2, 2, 0), (2, 3, 1), (3, 3, 0)] + dense_block(range(4, 6), range(100, 102))
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    core = k_core(frame, 2)
    assert sorted(core["user"].unique()) == [4, 5]
    assert sorted(core["item"].unique()) == [100, 101]
    assert len(core) == 4


def test_reindex_by_original_ids_and_ties_broken_by_item():
    ratings = pd.DataFrame(
        [(30, 7, 5), (30, 3, 5), (30, 5, 1),  # 3 and 7 share a timestamp: ordered by item id
         (10, 5, 9), (10, 7, 2), (10, 3, 2)],
        columns=["user", "item", "timestamp"])
    movies = pd.DataFrame({"item": [7, 5, 3], "title": ["Seven", "Five", "Three"]})
    out = preprocess(ratings, movies, min_count=1)
    assert out.items.to_dict("list") == {"item_id": [1, 2, 3], "title": ["Three", "Five", "Seven"],
                                         "source_id": [3, 5, 7]}
    assert out.sequences.to_pydict() == {"user_id": [1, 2], "source_user_id": [10, 30],
                                         "items": [[1, 3, 2], [2, 1, 3]]}


def test_unknown_movies_are_counted_and_reported(tmp_path):
    rows = dense_block(range(1, 4), range(1, 4)) + [(1, 999, 50), (2, 999, 51), (2, 998, 52)]
    root = write_local(tmp_path / "raw", rows, [(1, "A (2001)"), (2, "B (2002)"), (3, "C (2003)")])
    lines: list[str] = []
    meta = prepare_data(local_cfg(root), tmp_path / "data", tmp_path / "cache", log=lines.append)
    assert meta["fixups"]["unknown_item_interactions"] == 3
    assert meta["fixups"]["unknown_item_ids"] == 2
    assert meta["num_interactions"] == 9
    assert any("3 interactions named items absent from the titles" in line for line in lines)


def test_users_too_short_for_leave_one_out(tmp_path):
    rows = dense_block(range(1, 3), range(1, 4)) + [(3, 1, 0), (3, 2, 1)]
    root = write_local(tmp_path / "raw", rows, [(1, "A"), (2, "B"), (3, "C")])
    with pytest.raises(DataError, match=r"1 users have fewer than 3 interactions .*data.min_count=2"):
        prepare_data(local_cfg(root, min_count=2), tmp_path / "data", tmp_path / "cache", log=quiet)


def test_empty_after_filtering(tmp_path):
    root = write_local(tmp_path / "raw", dense_block(range(1, 3), range(1, 3)), [(1, "A"), (2, "B")])
    with pytest.raises(DataError, match=r"ratings.csv: no interactions left after the 5-core filter"):
        prepare_data(local_cfg(root, min_count=5), tmp_path / "data", tmp_path / "cache", log=quiet)


# ---------------------------------------------------------------- leave-one-out


def test_prefix_convention():
    assert prefix_len_for(10, "test") == 9
    assert prefix_len_for(10, "val") == 8
    assert prefix_len_for(10, "train") == 7
    assert prefix_len_for(10, "train", j=2) == 5
    assert train_prefix_lens(5, 10) == [2, 1]
    seq = [11, 12, 13, 14, 15]
    assert history_and_target(seq, prefix_len_for(5, "test")) == ([11, 12, 13, 14], 15)
    assert history_and_target(seq, prefix_len_for(5, "val")) == ([11, 12, 13], 14)
    assert history_and_target(seq, prefix_len_for(5, "train")) == ([11, 12], 13)
    with pytest.raises(ValueError, match="history would be empty"):
        prefix_len_for(3, "train")
    with pytest.raises(ValueError, match="j: expected 0 for val"):
        prefix_len_for(10, "val", j=1)
    with pytest.raises(ValueError, match="split"):
        prefix_len_for(10, "dev")


def _retriever_run(tmp_path: Path, train_candidates: str) -> list[str]:
    """Overrides for a prepare + retrieve run on local data where every item belongs to one user only."""
    # 8 users x 7 items, no item shared: an item id seen in training names one user's one position.
    rows = [(u, 100 * u + k, k) for u in range(1, 9) for k in range(7)]
    root = write_local(tmp_path / "raw", rows, [(m, f"Movie {m} (2000)") for _, m, _ in rows])
    return [f"run_dir={tmp_path / 'run'}", "data.source=local", f"data.raw_dir={root}", "data.min_count=1",
            f"model.cache_dir={tmp_path / 'cache'}", "retriever.embed_dim=16", "retriever.num_blocks=1",
            "retriever.max_len=16", "retriever.batch_size=8", "retriever.max_epochs=1", "retriever.max_minutes=0",
            "retriever.top_k=5", "retriever.train_prefixes_per_user=2",
            f"retriever.train_candidates={train_candidates}"]


@pytest.mark.parametrize("train_candidates", ["same", "held_out"])
def test_retriever_never_sees_val_or_test_targets(tmp_path, monkeypatch, train_candidates):
    """The retrieve stage as the pipeline runs it (pipeline.retrieve -> run_retriever_stage ->
    train_retriever): the item ids in the batches its loss sees are exactly seq[:-2] of every user, never
    a validation or test target; with train_candidates=held_out the second retriever, which makes the
    training candidates, sees only seq[:-(2 + train_prefixes_per_user)]."""
    from rerank_dist import pipeline
    from rerank_dist.settings import load_config
    from rerank_dist.retrieval import stage as stage_mod
    from rerank_dist.retrieval import train as train_mod

    trainings: list[dict] = []  # one per train_retriever call, filled by the spies below
    candidate_sources: dict[str, object] = {}
    real_train, real_batch = stage_mod.train_retriever, train_mod.window_batch
    real_evaluate, real_candidates = train_mod.evaluate, stage_mod.generate_candidates

    def spy_train(*args, **kwargs):
        trainings.append({"inputs": set(), "labels": set(), "val_histories": set(), "val_targets": set()})
        model, summary = real_train(*args, **kwargs)
        trainings[-1]["model"] = model
        return model, summary

    def spy_batch(windows, max_len):
        tokens, labels = real_batch(windows, max_len)  # what next_item_loss receives
        trainings[-1]["inputs"].update(tokens[tokens > 0].tolist())
        trainings[-1]["labels"].update(labels[labels > 0].tolist())
        return tokens, labels

    def spy_evaluate(model, histories, targets, max_len):
        trainings[-1]["val_histories"].update(i for h in histories for i in h)
        trainings[-1]["val_targets"].update(targets)
        return real_evaluate(model, histories, targets, max_len)

    def spy_candidates(model, sequences, split, *args, **kwargs):
        candidate_sources[split] = model
        return real_candidates(model, sequences, split, *args, **kwargs)

    monkeypatch.setattr(stage_mod, "train_retriever", spy_train)
    monkeypatch.setattr(train_mod, "window_batch", spy_batch)
    monkeypatch.setattr(train_mod, "evaluate", spy_evaluate)
    monkeypatch.setattr(stage_mod, "generate_candidates", spy_candidates)

    cfg = load_config(None, _retriever_run(tmp_path, train_candidates))
    pipeline.prepare(cfg, log=quiet)
    pipeline.retrieve(cfg, log=quiet)
    sequences = load_dataset(tmp_path / "run" / "data").sequences
    assert len(sequences) == 8 and all(len(s) == 7 for s in sequences.values())
    assert len({i for s in sequences.values() for i in s}) == 56  # no item shared between users

    def items(cut: int) -> set[int]:
        return {i for s in sequences.values() for i in s[:-cut]}

    val_targets = {s[-2] for s in sequences.values()}
    test_targets = {s[-1] for s in sequences.values()}
    # Precondition: the stage trained through the spied code path, once per retriever.
    assert len(trainings) == (2 if train_candidates == "held_out" else 1)
    main = trainings[0]
    assert main["labels"] == items(2)  # every training item is learned as a label, and nothing else is
    assert main["inputs"] <= items(2)
    assert not (main["labels"] | main["inputs"]) & (val_targets | test_targets)
    # Early stopping looks at the validation target from seq[:-2]; the test target stays unseen.
    assert main["val_targets"] == val_targets and main["val_histories"] <= items(2)
    assert candidate_sources["val"] is main["model"] and candidate_sources["test"] is main["model"]
    if train_candidates == "same":
        assert candidate_sources["train"] is main["model"]
        return
    held = trainings[1]
    held_back = items(2) - items(4)  # the targets of the 2 training prefixes per user
    assert len(held_back) == 16 and held["labels"] == items(4) and held["inputs"] <= items(4)
    assert not (held["labels"] | held["inputs"]) & (held_back | val_targets | test_targets)
    assert candidate_sources["train"] is held["model"]  # the training candidates come from the one that never saw them


# ---------------------------------------------------------------- the bundled dataset


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundled")
    meta = prepare_data(DataConfig(), root / "data", root / "cache", log=quiet)
    return meta, load_dataset(root / "data"), root / "data"


def test_bundled_matches_llamarec_statistics(bundled):
    meta, ds, _ = bundled
    assert (meta["num_users"], meta["num_items"], meta["num_interactions"]) == (610, 3650, 90274)
    assert f"{meta['mean_length']:.2f}" == "147.99"
    assert ds.num_users == 610 and ds.num_items == 3650
    assert sum(map(len, ds.sequences.values())) == 90274
    assert sorted(ds.titles) == list(range(1, 3651))
    assert min(map(len, ds.sequences.values())) >= 5


def test_bundled_meta_records_provenance_and_fixups(bundled):
    meta, ds, data_dir = bundled
    src = meta["source"]
    assert src["source"] == "bundled" and src["official_release"] is True
    assert src["sha256"] == sources.OFFICIAL_SHA256
    assert meta["fixups"]["unknown_item_interactions"] == 0
    assert meta["fixups"]["whitespace_fixed"] == 15
    assert json.loads((data_dir / "meta.json").read_text()) == meta
    items = pd.read_parquet(data_dir / "items.parquet")
    assert "The American President (1995)" == items.loc[items["source_id"] == 11, "title"].item()
    seqs = pd.read_parquet(data_dir / "sequences.parquet")
    assert list(seqs.columns) == ["user_id", "source_user_id", "items"]
    assert seqs["source_user_id"].tolist() == list(range(1, 611))  # every raw user survives the 5-core


def test_bundled_readme_ships_beside_the_archive():
    assert "Usage License" in sources.bundled_file(sources.BUNDLED_README).read_text(encoding="utf-8")


# ---------------------------------------------------------------- errors


def test_missing_local_file(tmp_path):
    root = write_local(tmp_path / "raw", [(1, 1, 0)], [(1, "A")])
    (root / "movies.csv").unlink()
    with pytest.raises(DataError, match=r"movies.csv: file not found"):
        prepare_data(local_cfg(root), tmp_path / "data", tmp_path / "cache", log=quiet)


def test_missing_column_names_file_and_expected_columns(tmp_path):
    root = tmp_path / "raw"
    write_local(root, [(1, 1, 0)], [(1, "A")])
    (root / "ratings.csv").write_text("userId,movieId,rating\n1,1,4.0\n")
    with pytest.raises(DataError) as err:
        prepare_data(local_cfg(root), tmp_path / "data", tmp_path / "cache", log=quiet)
    msg = str(err.value)
    assert "ratings.csv" in msg and "missing column(s) timestamp" in msg and "userId, movieId, timestamp" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("content, pattern", [
    ("userId,movieId,timestamp\n1,1,0\n1,x,5\n", r"column movieId, line 3: expected an integer, got 'x'"),
    ("", r"not a readable CSV"),
    (b"userId,movieId,timestamp\n1,\xff,0\n", r"not UTF-8"),
])
def test_unreadable_ratings(tmp_path, content, pattern):
    root = write_local(tmp_path / "raw", [(1, 1, 0)], [(1, "A")])
    path = root / "ratings.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=pattern):
        prepare_data(local_cfg(root), tmp_path / "data", tmp_path / "cache", log=quiet)


def test_load_without_prepare(tmp_path):
    with pytest.raises(DataError, match=r"meta.json: not found"):
        load_dataset(tmp_path)


def test_failed_write_leaves_the_previous_data_untouched(tmp_path, monkeypatch):
    root = write_local(tmp_path / "raw", dense_block(range(1, 4), range(1, 4)), [(1, "A"), (2, "B"), (3, "C")])
    data_dir = tmp_path / "data"
    prepare_data(local_cfg(root), data_dir, tmp_path / "cache", log=quiet)  # an earlier, complete run
    before = {p.name: p.read_bytes() for p in data_dir.iterdir()}
    half_files: list[Path] = []

    def crash(self, path, **kw):
        Path(path).write_bytes(b"PAR1 half a file")
        half_files.append(Path(path))
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", crash)
    with pytest.raises(OSError, match="disk full"):
        prepare_data(local_cfg(root, min_count=2), data_dir, tmp_path / "cache", log=quiet)
    assert half_files, "the crash must happen while a file is being written"
    assert not any(p.exists() for p in half_files)  # no half file ...
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # ... no temp directory ...
    assert {p.name: p.read_bytes() for p in data_dir.iterdir()} == before  # ... and the old set intact
    assert load_dataset(data_dir).meta["min_count"] == 1


def test_prepare_refuses_a_data_directory_holding_other_files(tmp_path):
    """The data directory is replaced as a whole: files the stage did not write there are not deleted."""
    data_dir = write_local(tmp_path / "data", dense_block(range(1, 4), range(1, 4)), [(1, "A"), (2, "B"), (3, "C")])
    with pytest.raises(DataError, match=r"data: holds movies.csv, ratings.csv, which the data stage did not write"):
        prepare_data(local_cfg(data_dir), data_dir, tmp_path / "cache", log=quiet)
    assert sorted(p.name for p in data_dir.iterdir()) == ["movies.csv", "ratings.csv"]


# ---------------------------------------------------------------- download


def _bundled_zip() -> bytes:
    return sources.bundled_file(sources.BUNDLED_ARCHIVE).read_bytes()


def _corrupted_zip() -> bytes:
    """The bundled archive with one rating changed."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(_bundled_zip())) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("ratings.csv"):
                data = data.replace(b"1,1,4.0,964982703", b"1,1,5.0,964982703", 1)
            dst.writestr(name, data)
    return out.getvalue()


def fake_fetch(payload: bytes, calls: list[str]):
    def fetch(url: str, dest: Path, log=None) -> None:
        calls.append(url)
        Path(dest).write_bytes(payload)
    return fetch


def test_download_verifies_and_caches(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(sources, "fetch_url", fake_fetch(_bundled_zip(), calls))
    cfg = DataConfig(source="download", min_count=5)
    raw = sources.load_raw(cfg, tmp_path / "cache")
    assert calls == [sources.OFFICIAL_URL]
    assert raw.provenance["source"] == "download" and raw.provenance["official_release"]
    assert raw.provenance["urls"] == {"ml-latest-small.zip": sources.OFFICIAL_URL}
    extracted = tmp_path / "cache" / "data" / "ml-latest-small"
    assert sorted(p.name for p in extracted.iterdir()) == ["movies.csv", "ratings.csv"]
    assert raw.interactions.num_rows == 100836 and raw.titles.num_rows == 9742
    sources.load_raw(cfg, tmp_path / "cache")
    assert len(calls) == 1  # second run reads the verified copy


def test_download_with_wrong_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "fetch_url", fake_fetch(_corrupted_zip(), []))
    cfg = DataConfig(source="download", download_dir=str(tmp_path / "dl"))
    with pytest.raises(DataError) as err:
        sources.load_raw(cfg, tmp_path / "cache")
    msg = str(err.value)
    assert "ratings.csv: SHA-256 mismatch" in msg
    assert f"expected {sources.OFFICIAL_SHA256['ratings.csv']}" in msg and "got " in msg
    assert "\n" not in msg
    assert list((tmp_path / "dl").iterdir()) == []  # nothing kept: the next run downloads again


def test_tampered_cached_copy_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "fetch_url", fake_fetch(_bundled_zip(), []))
    cfg = DataConfig(source="download", download_dir=str(tmp_path / "dl"))
    sources.load_raw(cfg, tmp_path / "cache")
    movies = tmp_path / "dl" / "ml-latest-small" / "movies.csv"
    movies.write_bytes(movies.read_bytes().replace(b"Toy Story", b"Toy Storm"))
    with pytest.raises(DataError, match=r"movies.csv: SHA-256 mismatch, expected 2cae9e.* \(delete "):
        sources.load_raw(cfg, tmp_path / "cache")


def test_download_failure_leaves_no_archive_but_keeps_the_partial_file(tmp_path, monkeypatch):
    def offline(url: str, dest: Path, log=None) -> None:
        Path(dest).write_bytes(b"partial")
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(sources, "fetch_url", offline)
    cfg = DataConfig(source="download", download_dir=str(tmp_path / "dl"))
    with pytest.raises(DataError, match=r"download failed \(no route to host\); 7 bytes kept in .*run again to resume"):
        sources.load_raw(cfg, tmp_path / "cache")
    # No archive a later run would trust; the bytes so far stay, for the next run to resume from.
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["ml-latest-small.zip.part"]


def test_downloaded_file_that_is_not_a_zip(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "fetch_url", fake_fetch(b"<html>rate limited</html>", []))
    cfg = DataConfig(source="download", download_dir=str(tmp_path / "dl"))
    with pytest.raises(DataError, match=r"ml-latest-small.zip: not a readable zip archive"):
        sources.load_raw(cfg, tmp_path / "cache")
    assert list((tmp_path / "dl").iterdir()) == []
