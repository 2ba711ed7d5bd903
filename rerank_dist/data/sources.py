"""Raw MovieLens files from one of three sources, parsed and fingerprinted.

* ``bundled``: the copy of ml-latest-small shipped inside the package (works offline);
* ``download``: the GroupLens archive, fetched once into a download directory;
* ``local``: a directory holding ``ratings.csv`` and ``movies.csv`` in the MovieLens layout.

Each file's SHA-256 is computed from the very bytes that are parsed, so the provenance recorded in
``meta.json`` always describes the data that was used. Bundled and downloaded files must match the
official 2018-09-26 release; local files are only fingerprinted (they may be a different release).
"""

from __future__ import annotations

import hashlib
import io
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from rerank_dist.config import DataConfig
from rerank_dist.data import DataError
from rerank_dist.io import atomic_dir, atomic_path

DATASET = "ml-latest-small"
OFFICIAL_URL = "https://files.grouplens.org/datasets/movielens/ml-latest-small.zip"
BUNDLED_ARCHIVE = "ml-latest-small.zip"
BUNDLED_README = "ml-latest-small-README.txt"

RATINGS = "ratings.csv"
MOVIES = "movies.csv"
RAW_FILES = (RATINGS, MOVIES)

# SHA-256 of the files in the official release generated on 2018-09-26 (610 users, 9,742 movies).
OFFICIAL_SHA256 = {
    RATINGS: "0b0e333bbf3c6c161e3119c2d28673fbb0e804c0344e33724fb1f4ca1d1d694a",
    MOVIES: "2cae9e54231a88049d21a84e9192d11130dcebdbcb532f4f95c2e2f81ee50862",
}

# Only the columns preprocessing reads are required; ``rating`` and ``genres`` are not used.
REQUIRED_COLUMNS = {
    RATINGS: ("userId", "movieId", "timestamp"),
    MOVIES: ("movieId", "title"),
}
INTEGER_COLUMNS = {RATINGS: ("userId", "movieId", "timestamp"), MOVIES: ("movieId",)}


@dataclass
class RawData:
    """Parsed raw tables plus where they came from (source, location, checksums)."""

    ratings: pd.DataFrame  # userId, movieId, timestamp (int64)
    movies: pd.DataFrame  # movieId (int64), title (str, as written in the file)
    provenance: dict[str, Any]
    origins: dict[str, str]  # file name -> where it was read from, for error messages


def load_raw(cfg: DataConfig, cache_dir: str | Path) -> RawData:
    """Read ratings and movies for ``cfg.source``; raises DataError with a one-line reason."""
    if cfg.source == "bundled":
        return _from_bundled()
    if cfg.source == "download":
        download_dir = Path(cfg.download_dir) if cfg.download_dir else Path(cache_dir) / "data"
        return _from_download(download_dir)
    if cfg.source == "local":
        return _from_local(Path(cfg.raw_dir))
    raise DataError(f"data.source: expected bundled, download or local, got {cfg.source!r}")


def local_fingerprint(raw_dir: str | Path) -> str:
    """SHA-256 over the raw files of a local source ("missing" for an absent one), so a prepared
    dataset can tell that the files it was made from have changed since."""
    digest = hashlib.sha256()
    for name in RAW_FILES:
        path = Path(raw_dir) / name
        digest.update(name.encode())
        if path.is_file():
            with path.open("rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
        else:
            digest.update(b"missing")
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_url(url: str, dest: Path) -> None:
    """Stream ``url`` into ``dest``. The single network call, so tests can replace it."""
    with urllib.request.urlopen(url, timeout=120) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out)


def bundled_file(name: str) -> Any:
    """A packaged file under ``rerank_dist/data/bundled`` (a Traversable: works from wheels too)."""
    return resources.files("rerank_dist.data").joinpath("bundled", name)


# ---------------------------------------------------------------- the three sources


def _from_bundled() -> RawData:
    archive = bundled_file(BUNDLED_ARCHIVE)
    origin = f"rerank_dist/data/bundled/{BUNDLED_ARCHIVE}"
    blobs = _members(archive.read_bytes(), origin)
    for name, data in blobs.items():
        _verify(name, data, f"{origin}:{name}", hint="the package's bundled copy is damaged; reinstall rerank_dist")
    return _parse(blobs, {n: f"{origin}:{n}" for n in blobs}, source="bundled", location=origin)


def _from_download(download_dir: Path) -> RawData:
    folder = download_dir / DATASET
    if not all((folder / n).is_file() for n in RAW_FILES):
        archive = download_dir / BUNDLED_ARCHIVE
        if not archive.is_file():
            _download(OFFICIAL_URL, archive)
        _extract(archive, folder)
    blobs = {n: (folder / n).read_bytes() for n in RAW_FILES}
    hint = f"delete {download_dir} to download it again, or use data.source=bundled"
    for name, data in blobs.items():
        _verify(name, data, str(folder / name), hint=hint)
    provenance_extra = {"url": OFFICIAL_URL}
    return _parse(blobs, {n: str(folder / n) for n in blobs}, source="download", location=str(folder),
                  extra=provenance_extra)


def _from_local(raw_dir: Path) -> RawData:
    if not raw_dir.is_dir():
        raise DataError(f"data.raw_dir: {raw_dir} is not a directory (expected one holding {RATINGS} and {MOVIES})")
    blobs = {}
    for name in RAW_FILES:
        path = raw_dir / name
        if not path.is_file():
            raise DataError(f"{path}: file not found (data.source=local needs {RATINGS} and {MOVIES} in data.raw_dir)")
        blobs[name] = path.read_bytes()
    return _parse(blobs, {n: str(raw_dir / n) for n in blobs}, source="local", location=str(raw_dir))


# ---------------------------------------------------------------- archive handling


def _download(url: str, archive: Path) -> None:
    """Fetch to a temp file beside ``archive``; rename it into place only once its CSVs verify.

    An interrupted download, an error page or a different release therefore leaves nothing behind,
    and the next run simply downloads again.
    """
    with atomic_path(archive) as tmp:
        try:
            fetch_url(url, tmp)
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", None) or e
            raise DataError(f"{url}: download failed ({reason}); use data.source=bundled to work offline") from None
        for name, data in _members(tmp.read_bytes(), url).items():
            _verify(name, data, f"{url}:{name}", hint="nothing was kept; use data.source=bundled to work offline")


def _members(archive_bytes: bytes, origin: str) -> dict[str, bytes]:
    """ratings.csv and movies.csv from a MovieLens zip (at its root or inside one folder)."""
    try:
        with zipfile.ZipFile(io.BytesIO(archive_bytes)) as zf:
            by_base = {Path(n).name: n for n in zf.namelist() if n.count("/") <= 1 and not n.endswith("/")}
            missing = [n for n in RAW_FILES if n not in by_base]
            if missing:
                raise DataError(f"{origin}: archive lacks {', '.join(missing)} (expected {RATINGS} and {MOVIES})")
            return {n: zf.read(by_base[n]) for n in RAW_FILES}
    except zipfile.BadZipFile as e:
        raise DataError(f"{origin}: not a readable zip archive ({e})") from None


def _extract(archive: Path, folder: Path) -> None:
    """Unpack the two CSVs into ``folder`` as a whole (never a folder holding only one of them)."""
    blobs = _members(archive.read_bytes(), str(archive))
    with atomic_dir(folder) as tmp:
        for name, data in blobs.items():
            (tmp / name).write_bytes(data)


def _verify(name: str, data: bytes, origin: str, hint: str) -> None:
    actual = sha256_bytes(data)
    expected = OFFICIAL_SHA256[name]
    if actual != expected:
        raise DataError(f"{origin}: SHA-256 mismatch, expected {expected}, got {actual} ({hint})")


# ---------------------------------------------------------------- parsing


def _parse(blobs: dict[str, bytes], origins: dict[str, str], source: str, location: str,
           extra: dict[str, Any] | None = None) -> RawData:
    ratings = _read_table(blobs[RATINGS], origins[RATINGS], RATINGS)
    movies = _read_table(blobs[MOVIES], origins[MOVIES], MOVIES)
    checksums = {n: sha256_bytes(b) for n, b in blobs.items()}
    provenance = {
        "source": source,
        "dataset": DATASET,
        "location": location,
        **(extra or {}),
        "sha256": checksums,
        "official_release": checksums == OFFICIAL_SHA256,
    }
    return RawData(ratings=ratings, movies=movies, provenance=provenance, origins=origins)


def _read_table(data: bytes, origin: str, kind: str) -> pd.DataFrame:
    """Parse one CSV, keep the required columns, and make the id/time columns int64."""
    required = REQUIRED_COLUMNS[kind]
    try:
        # Everything as text, empty cells as "": a blank title is counted later, never silently NaN,
        # and a film literally titled "NA" keeps its name.
        frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{origin}: not UTF-8 text (byte {e.start}); expected a MovieLens CSV") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{origin}: not a readable CSV ({first})") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{origin}: missing column(s) {', '.join(missing)}; expected columns "
                        f"{', '.join(required)} (found {', '.join(map(str, frame.columns)) or 'none'})")
    frame = frame[list(required)].copy()
    for column in INTEGER_COLUMNS[kind]:
        frame[column] = _to_int(frame[column], origin, column)
    return frame


def _to_int(values: pd.Series, origin: str, column: str) -> pd.Series:
    numbers = pd.to_numeric(values.str.strip(), errors="coerce")
    bad = numbers.isna() | (numbers != numbers.round())
    if bad.any():
        row = int(bad.to_numpy().argmax())
        # +2: one header line, and file lines count from 1.
        raise DataError(f"{origin}: column {column}, line {row + 2}: expected an integer, got {values.iloc[row]!r}")
    return numbers.astype("int64")
