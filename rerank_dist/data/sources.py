"""Where raw files come from, how they are checked, and which parser reads them.

* ``bundled``: the copy of ml-latest-small shipped inside the package (works offline);
* ``download``: a named dataset's official files (``catalog.CATALOG``), fetched once into the
  download directory with progress and resume (``download.py``), checked against their pinned
  SHA-256 where one is pinned;
* ``local``: a directory holding a named dataset's release files (or its archive), RecBole atomic
  files (``data.format=recbole``), or any CSV/TSV/Parquet read through ``data.columns``
  (``data.format=table``).

Every file's SHA-256 goes into the provenance recorded in ``meta.json``, with whether the files are
the official release (true / false where a checksum is pinned; null where none is).
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

from rerank_dist.config import DataConfig
from rerank_dist.data.errors import DataError
from rerank_dist.data.catalog import CATALOG, NamedDataset, RemoteFile
# fetch_url is looked up here at each call, so tests can stand in for the network.
from rerank_dist.data.download import download_file, fetch_url
from rerank_dist.io import sha256_file
from rerank_dist.data.formats import (
    Tables,
    read_amazon,
    read_ml1m,
    read_ml100k,
    read_movielens_csv,
    read_recbole,
    read_table,
)
from rerank_dist.data.tables import RawFile
from rerank_dist.io import atomic_dir

DATASET = "ml-latest-small"
OFFICIAL_URL = CATALOG[DATASET].downloads[0].url
BUNDLED_ARCHIVE = "ml-latest-small.zip"
BUNDLED_README = "ml-latest-small-README.txt"
RATINGS = "ratings.csv"
MOVIES = "movies.csv"
RAW_FILES = (RATINGS, MOVIES)
# SHA-256 of the CSVs of the official release generated on 2018-09-26 (610 users, 9,742 movies).
OFFICIAL_SHA256 = CATALOG[DATASET].member_sha256

READERS: dict[str, Callable[..., Tables]] = {
    "movielens_csv": read_movielens_csv,
    "ml100k": read_ml100k,
    "ml1m": read_ml1m,
    "amazon": read_amazon,
}
INTERACTIONS, TITLES = "interactions", "titles"

Log = Callable[[str], Any]


@dataclass
class RawData:
    """The canonical tables (see formats.py) plus where they came from."""

    interactions: pa.Table  # user, item, timestamp
    titles: pa.Table  # item, title
    provenance: dict[str, Any]
    origins: dict[str, str]  # INTERACTIONS / TITLES -> the file, for messages
    stats: dict[str, int] = field(default_factory=dict)  # counts the parser resolved itself


def load_raw(cfg: DataConfig, cache_dir: str | Path, log: Log = print) -> RawData:
    """Read the interactions and titles ``cfg`` names; raises DataError with a one-line reason."""
    if cfg.format == "recbole":
        return _from_recbole(cfg)
    if cfg.format == "table":
        return _from_table(cfg)
    spec = CATALOG.get(cfg.dataset)
    if spec is None:
        raise DataError(f"data.dataset: {cfg.dataset} has no release files; set data.format=recbole or table")
    if cfg.source == "bundled":
        if spec.name != DATASET:
            raise DataError(f"data.source: only {DATASET} is bundled; use download or local for {spec.name}")
        return _from_bundled()
    if cfg.source == "download":
        download_dir = Path(cfg.download_dir) if cfg.download_dir else Path(cache_dir) / "data"
        return _from_download(spec, download_dir, log)
    if cfg.source == "local":
        return _from_local(spec, Path(cfg.raw_dir))
    raise DataError(f"data.source: expected bundled, download or local, got {cfg.source!r}")


def bundled_file(name: str) -> Any:
    """A packaged file under ``rerank_dist/data/bundled`` (a Traversable: works from wheels too)."""
    return resources.files("rerank_dist.data").joinpath("bundled", name)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- fingerprint of local inputs


def local_fingerprint(cfg: DataConfig) -> str:
    """SHA-256 over the files a local source reads ("missing" for an absent one), so a prepared
    dataset can tell that the files it was made from have changed since."""
    digest = hashlib.sha256()
    for path in local_files(cfg):
        digest.update(str(path.name).encode())
        if path.is_file():
            digest.update(bytes.fromhex(sha256_file(path)))
        else:
            digest.update(b"missing")
    return digest.hexdigest()


def local_files(cfg: DataConfig) -> list[Path]:
    """The files ``load_raw`` reads for a local source (those it would look for, if absent)."""
    raw_dir = Path(cfg.raw_dir)
    if cfg.format == "table":
        return [_resolve(raw_dir, f) for f in (cfg.interactions_file, cfg.titles_file) if f]
    if cfg.format == "recbole":
        try:
            inter, item = _recbole_files(cfg)
            return [inter] + ([item] if item is not None else [])
        except DataError:  # absent or ambiguous: whatever RecBole files there are
            return sorted(p for p in raw_dir.glob("*") if p.suffix in (".inter", ".item")) if raw_dir.is_dir() else []
    spec = CATALOG.get(cfg.dataset)
    if spec is None:
        return []
    found = _local_members(spec, raw_dir)
    if found is not None:
        return list(found)
    archive = _local_archive(spec, raw_dir)
    return [archive] if archive is not None else [raw_dir / m for m in spec.members]


# ---------------------------------------------------------------- named datasets


def _from_bundled() -> RawData:
    spec = CATALOG[DATASET]
    archive = bundled_file(BUNDLED_ARCHIVE)
    origin = f"rerank_dist/data/bundled/{BUNDLED_ARCHIVE}"
    blobs = _members(archive.read_bytes(), origin, spec)
    for name, data in blobs.items():
        _verify_member(spec, name, data, f"{origin}:{name}",
                       hint="the package's bundled copy is damaged; reinstall rerank_dist")
    files = [RawFile(f"{origin}:{n}", data=blobs[n]) for n in spec.members]
    return _parse(spec, files, source="bundled", location=origin, official=True)


def _from_download(spec: NamedDataset, download_dir: Path, log: Log) -> RawData:
    if spec.archive_folder is not None:
        return _from_downloaded_archive(spec, download_dir, log)
    folder = download_dir / spec.name
    hint = "; or fetch the files yourself and use data.source=local"
    for remote in spec.downloads:
        dest = folder / remote.name
        if not dest.is_file():
            _announce(remote, log)
            download_file(remote.url, dest, remote.sha256, log, fetch=fetch_url, verify=_plausible(remote),
                          offline_hint=hint)
    files = [RawFile(str(folder / m), path=folder / m) for m in spec.members]
    for remote, raw in zip(spec.downloads, files):
        _verify_file(remote, raw, hint=f"delete {raw.path} to download it again")
    return _parse(spec, files, source="download", location=str(folder),
                  extra={"urls": {r.name: r.url for r in spec.downloads}})


def _from_downloaded_archive(spec: NamedDataset, download_dir: Path, log: Log) -> RawData:
    (remote,) = spec.downloads
    archive = download_dir / remote.name
    offline = "; use data.source=bundled to work offline" if spec.name == DATASET else \
        "; or fetch the archive yourself and use data.source=local"
    if spec.member_sha256:
        # Members pinned (ml-latest-small): they are extracted once and checked at every read.
        folder = download_dir / spec.name
        if not all((folder / n).is_file() for n in spec.members):
            if not archive.is_file():
                _announce(remote, log)
                download_file(remote.url, archive, remote.sha256, log, fetch=fetch_url,
                              verify=lambda p: _check_members(spec, p.read_bytes(), remote.url,
                                                              "nothing was kept" + offline),
                              offline_hint=offline)
            _extract(spec, archive, folder)
        hint = f"delete {download_dir} to download it again" + (", or use data.source=bundled" if spec.name == DATASET else "")
        blobs = {n: (folder / n).read_bytes() for n in spec.members}
        for name, data in blobs.items():
            _verify_member(spec, name, data, str(folder / name), hint=hint)
        files = [RawFile(str(folder / n), data=blobs[n]) for n in spec.members]
        return _parse(spec, files, source="download", location=str(folder), extra={"urls": {remote.name: remote.url}})
    # Archive pinned (ml-100k, ml-1m): kept whole, checked and read at every run.
    if not archive.is_file():
        _announce(remote, log)
        download_file(remote.url, archive, remote.sha256, log, fetch=fetch_url,
                      verify=lambda p: _check_archive(spec, p.read_bytes(), remote.url), offline_hint=offline)
    data = archive.read_bytes()
    _verify_file(remote, RawFile(str(archive), data=data), hint=f"delete {archive} to download it again")
    blobs = _members(data, str(archive), spec)
    files = [RawFile(f"{archive}:{n}", data=blobs[n]) for n in spec.members]
    return _parse(spec, files, source="download", location=str(archive),
                  extra={"urls": {remote.name: remote.url}, "archive_sha256": {remote.name: sha256_bytes(data)}})


def _from_local(spec: NamedDataset, raw_dir: Path) -> RawData:
    if not raw_dir.is_dir():
        raise DataError(f"data.raw_dir: {raw_dir} is not a directory (expected one holding "
                        f"{_expected_files(spec)})")
    found = _local_members(spec, raw_dir)
    if found is not None:
        files = [RawFile(str(p), path=p) for p in found]
        return _parse(spec, files, source="local", location=str(raw_dir))
    archive = _local_archive(spec, raw_dir)
    if archive is None:
        missing = next(raw_dir / m for m in spec.members if _find_member(spec, raw_dir, m) is None)
        raise DataError(f"{missing}: file not found (data.source=local with data.dataset={spec.name} reads "
                        f"{_expected_files(spec)} from data.raw_dir)")
    data = archive.read_bytes()
    blobs = _members(data, str(archive), spec)
    files = [RawFile(f"{archive}:{n}", data=blobs[n]) for n in spec.members]
    archive_hash = sha256_bytes(data)
    pinned = spec.downloads[0].sha256
    official = (archive_hash == pinned) if pinned else None
    return _parse(spec, files, source="local", location=str(archive), official=official,
                  extra={"archive_sha256": {archive.name: archive_hash}})


def _expected_files(spec: NamedDataset) -> str:
    text = " and ".join(spec.members)
    if spec.archive_folder is not None:
        text += f", or the release archive {spec.downloads[0].name}"
    return text


def _find_member(spec: NamedDataset, raw_dir: Path, member: str) -> Path | None:
    """A member in the directory itself, or in the folder the release archive unpacks to."""
    folders = [raw_dir] + ([raw_dir / spec.archive_folder] if spec.archive_folder else [])
    for folder in folders:
        for name in (member, *spec.local_aliases.get(member, ())):
            if (folder / name).is_file():
                return folder / name
    return None


def _local_members(spec: NamedDataset, raw_dir: Path) -> list[Path] | None:
    found = [_find_member(spec, raw_dir, m) for m in spec.members]
    return None if any(p is None for p in found) else found  # type: ignore[return-value]


def _local_archive(spec: NamedDataset, raw_dir: Path) -> Path | None:
    if spec.archive_folder is None:
        return None
    archive = raw_dir / spec.downloads[0].name
    return archive if archive.is_file() else None


# ---------------------------------------------------------------- your own files


def _from_recbole(cfg: DataConfig) -> RawData:
    inter, item = _recbole_files(cfg)
    files = {INTERACTIONS: RawFile(str(inter), path=inter)}
    if item is not None:
        files[TITLES] = RawFile(str(item), path=item)
    tables = read_recbole(files[INTERACTIONS], files.get(TITLES), cfg.columns)
    return _own_files(cfg, tables, files)


def _recbole_files(cfg: DataConfig) -> tuple[Path, Path | None]:
    raw_dir = Path(cfg.raw_dir)
    if cfg.interactions_file:
        inter = _resolve(raw_dir, cfg.interactions_file)
        if not inter.is_file():
            raise DataError(f"{inter}: file not found (data.interactions_file)")
    else:
        if not raw_dir.is_dir():
            raise DataError(f"data.raw_dir: {raw_dir} is not a directory (expected one holding RecBole atomic "
                            f"files: NAME.inter and NAME.item)")
        candidates = sorted(raw_dir.glob("*.inter"))
        if len(candidates) != 1:
            found = ", ".join(p.name for p in candidates) or "none"
            raise DataError(f"{raw_dir}: expected one .inter file, found {found}; set data.interactions_file")
        inter = candidates[0]
    if cfg.titles_file:
        item = _resolve(raw_dir, cfg.titles_file)
        if not item.is_file():
            raise DataError(f"{item}: file not found (data.titles_file)")
        return inter, item
    item = inter.with_suffix(".item")
    return inter, (item if item.is_file() else None)


def _from_table(cfg: DataConfig) -> RawData:
    raw_dir = Path(cfg.raw_dir)
    files: dict[str, RawFile] = {}
    for role, name, setting in ((INTERACTIONS, cfg.interactions_file, "data.interactions_file"),
                                (TITLES, cfg.titles_file, "data.titles_file")):
        if not name:
            continue
        path = _resolve(raw_dir, name)
        if not path.is_file():
            raise DataError(f"{path}: file not found ({setting})")
        files[role] = RawFile(str(path), path=path)
    tables = read_table(files[INTERACTIONS], files.get(TITLES), cfg.columns, cfg.csv_separator)
    return _own_files(cfg, tables, files)


def _resolve(raw_dir: Path, name: str) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else raw_dir / path


def _own_files(cfg: DataConfig, tables: Tables, files: dict[str, RawFile]) -> RawData:
    provenance = {
        "source": "local",
        "dataset": cfg.dataset,
        "format": cfg.format,
        "location": cfg.raw_dir,
        "sha256": {Path(f.origin).name: f.sha256() for f in files.values()},
        "official_release": None,
    }
    origins = {INTERACTIONS: files[INTERACTIONS].origin,
               TITLES: files[TITLES].origin if TITLES in files else files[INTERACTIONS].origin}
    return RawData(tables.interactions, tables.titles, provenance, origins, tables.stats)


# ---------------------------------------------------------------- checks and archives


def _parse(spec: NamedDataset, files: list[RawFile], source: str, location: str,
           official: bool | None = None, extra: dict[str, Any] | None = None) -> RawData:
    tables = READERS[spec.reader](*files)
    checksums = {spec.members[k]: f.sha256() for k, f in enumerate(files)}
    # The official release: members that match their pins; a downloaded archive that matched its pin
    # (a local archive is judged by the caller); unknown (None) where nothing is pinned.
    if spec.member_sha256:
        official = checksums == spec.member_sha256
    elif source == "download":
        official = True if spec.downloads[0].sha256 and spec.archive_folder else None
    provenance = {
        "source": source,
        "dataset": spec.name,
        "format": "native",
        "location": location,
        **(extra or {}),
        "sha256": checksums,
        "pinned": _pinned(spec),
        "official_release": official,
    }
    origins = {INTERACTIONS: files[0].origin, TITLES: files[1].origin}
    return RawData(tables.interactions, tables.titles, provenance, origins, tables.stats)


def _pinned(spec: NamedDataset) -> str:
    if spec.member_sha256:
        return "release files"
    if any(r.sha256 for r in spec.downloads):
        return "release archive"
    return "not pinned"


def _announce(remote: RemoteFile, log: Log) -> None:
    size = f" ({remote.size / 1e6:.1f} MB)" if remote.size else ""
    pinned = "SHA-256 pinned" if remote.sha256 else "no published checksum: not pinned"
    log(f"download: {remote.url}{size}; {pinned}")


def _plausible(remote: RemoteFile) -> Callable[[Path], None]:
    """For files without a pinned checksum: refuse what is plainly not the file (an HTML error page)."""
    def check(path: Path) -> None:
        with open(path, "rb") as f:
            head = f.read(512)
        if remote.name.endswith(".gz") and not head.startswith(b"\x1f\x8b"):
            raise DataError(f"{remote.url}: not a gzip file (starts {head[:40]!r}); nothing was kept")
        if remote.name.endswith(".csv") and (head.lstrip().startswith(b"<") or b"," not in head):
            raise DataError(f"{remote.url}: not a CSV file (starts {head[:40]!r}); nothing was kept")
    return check


def _verify_file(remote: RemoteFile, raw: RawFile, hint: str) -> None:
    if remote.sha256 is None:
        return
    actual = raw.sha256()
    if actual != remote.sha256:
        raise DataError(f"{raw.origin}: SHA-256 mismatch, expected {remote.sha256}, got {actual} ({hint})")


def _verify_member(spec: NamedDataset, name: str, data: bytes, origin: str, hint: str) -> None:
    expected = spec.member_sha256[name]
    actual = sha256_bytes(data)
    if actual != expected:
        raise DataError(f"{origin}: SHA-256 mismatch, expected {expected}, got {actual} ({hint})")


def _check_members(spec: NamedDataset, archive_bytes: bytes, origin: str, hint: str) -> None:
    for name, data in _members(archive_bytes, origin, spec).items():
        _verify_member(spec, name, data, f"{origin}:{name}", hint=hint)


def _check_archive(spec: NamedDataset, archive_bytes: bytes, origin: str) -> None:
    _members(archive_bytes, origin, spec)


def _members(archive_bytes: bytes, origin: str, spec: NamedDataset) -> dict[str, bytes]:
    """The members of a release zip (at its root or inside one folder)."""
    try:
        with zipfile.ZipFile(io.BytesIO(archive_bytes)) as zf:
            by_base = {Path(n).name: n for n in zf.namelist() if n.count("/") <= 1 and not n.endswith("/")}
            missing = [n for n in spec.members if n not in by_base]
            if missing:
                raise DataError(f"{origin}: archive lacks {', '.join(missing)} (expected {' and '.join(spec.members)})")
            return {n: zf.read(by_base[n]) for n in spec.members}
    except zipfile.BadZipFile as e:
        raise DataError(f"{origin}: not a readable zip archive ({e})") from None


def _extract(spec: NamedDataset, archive: Path, folder: Path) -> None:
    """Unpack the members into ``folder`` as a whole (never a folder holding only some of them)."""
    blobs = _members(archive.read_bytes(), str(archive), spec)
    with atomic_dir(folder) as tmp:
        for name, data in blobs.items():
            (tmp / name).write_bytes(data)
