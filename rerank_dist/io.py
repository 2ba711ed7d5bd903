"""Atomic file writes: a killed run never leaves a half-written file that a later stage trusts.

Everything is written to a temporary name in the destination directory and renamed into place
(``os.replace`` is atomic on POSIX within one filesystem). The one exception is an append-only
JSON Lines log (``append_jsonl``), whose last line a kill can cut: ``read_jsonl`` is its one reader.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, NamedTuple


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_png(fig: Any, path: str | Path) -> None:
    """Save a matplotlib figure as a PNG atomically, then close it (figures are kept until closed)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    import matplotlib.pyplot as plt  # matplotlib is imported by whoever made the figure

    plt.close(fig)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success rename it to ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o666 & ~_umask())  # mkstemp makes it private; the result should be as readable as open()'s
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside ``path``; on success it replaces ``path`` as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result should be as readable as mkdir's
    try:
        yield tmp
        publish_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_dir(tmp: str | Path, path: str | Path) -> None:
    """Put the finished directory tmp in place of path (replacing any old one) by renames only."""
    tmp, path = Path(tmp), Path(path)
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_parquet(path: str | Path, frame: "Any") -> None:
    """Write a pandas DataFrame as Parquet, atomically."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line and flush it: a log is append-only, so a crash loses at most the last line."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


class JsonlError(ValueError):
    """A JSON Lines file damaged before its last line (which only a kill can cut)."""


class JsonlRecords(NamedTuple):
    records: list[dict[str, Any]]
    cut_line: int  # 1-based number of a last line left unfinished by a killed writer (dropped); 0 if none


def read_jsonl(path: str | Path) -> JsonlRecords:
    """Every line of a JSON Lines file as a dict (blank lines skipped).

    A writer killed during ``append_jsonl`` leaves an unfinished last line: it is dropped, and its
    number returned for the caller to report. Any earlier line that is not a JSON object cannot come
    from a kill, so it raises JsonlError naming the file and the line rather than being skipped.
    """
    # Bytes, split by hand: a cut can fall inside a multibyte character, which read_text would refuse.
    lines = [(n, raw) for n, raw in enumerate(Path(path).read_bytes().split(b"\n"), start=1) if raw.strip()]
    records: list[dict[str, Any]] = []
    for i, (number, raw) in enumerate(lines):
        try:
            record = json.loads(raw)
            problem = "" if isinstance(record, dict) else f"got a JSON {type(record).__name__}"
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError alike
            problem = str(err).splitlines()[0] if str(err) else type(err).__name__
        if not problem:
            records.append(record)
        elif i == len(lines) - 1:
            return JsonlRecords(records, number)
        else:
            shown = raw[:60].decode("utf-8", "replace")
            raise JsonlError(f"{path}: line {number}: expected a JSON object, got {shown!r} ({problem}); only the "
                             f"last line can be cut by a killed run, so the file is damaged: repair or remove that line")
    return JsonlRecords(records, 0)


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (hashlib.file_digest needs Python 3.11; 3.10 is supported)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
