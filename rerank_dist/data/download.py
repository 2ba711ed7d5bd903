"""HTTP downloads that resume: progress lines, retries, and a file that appears only once verified.

``fetch_url`` brings a partial file (``<name>.part``) up to the whole resource: it asks for the
missing bytes with an HTTP ``Range`` request, and with ``If-Range`` naming the version it started
from, so a resource that changed meanwhile is fetched again from the start rather than spliced.
A dropped connection is retried (with resume) a few times; a run that still fails keeps the partial
file, and the next run continues from it. ``download_file`` then checks the SHA-256 where one is
pinned (and whatever else the caller verifies) before renaming the file into place.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from rerank_dist.data.errors import DataError
from rerank_dist.io import sha256_file  # hashlib.file_digest needs 3.11; 3.10 is the floor

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0
PROGRESS_EVERY_S = 5.0
# Waits before the 2nd, 3rd and 4th attempt after a dropped connection.
RETRY_DELAYS_S = (2.0, 10.0, 30.0)
USER_AGENT = "rerank-dist (dataset download)"

Log = Callable[[str], Any]


class IncompleteDownload(OSError):
    """The server ended the response before the announced length."""


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _state_path(part: Path) -> Path:
    """Sidecar recording which URL and version the partial file holds the start of."""
    return part.with_name(part.name + ".json")


def fetch_url(url: str, dest: str | Path, log: Log | None = None) -> None:
    """Make ``dest`` hold the whole of ``url``, resuming from what it already holds.

    Retries dropped connections and server errors (with resume) RETRY_DELAYS_S times; raises the
    last error (an OSError or urllib.error.URLError) if they all fail, keeping ``dest`` for a later run.
    """
    dest = Path(dest)
    log = log or (lambda _msg: None)
    attempts = len(RETRY_DELAYS_S) + 1
    for attempt in range(1, attempts + 1):
        try:
            _fetch_once(url, dest, log)
            return
        except Exception as e:  # noqa: BLE001 - sorted into retryable or not just below
            if not _retryable(e) or attempt == attempts:
                raise
            delay = RETRY_DELAYS_S[attempt - 1]
            have = dest.stat().st_size if dest.exists() else 0
            log(f"download: {dest.name.removesuffix('.part')}: {describe_error(e)}; resuming from byte {have:,} "
                f"in {delay:g} s (attempt {attempt + 1} of {attempts})")
            time.sleep(delay)


def _retryable(e: BaseException) -> bool:
    if isinstance(e, urllib.error.HTTPError):
        return e.code >= 500 or e.code == 429
    if isinstance(e, urllib.error.URLError) and isinstance(e.reason, socket.gaierror):
        return False  # the name does not resolve: offline, or a wrong host; waiting will not help
    return isinstance(e, (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError,
                          IncompleteDownload))


def describe_error(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    if isinstance(e, http.client.IncompleteRead):
        return "connection closed early"
    return str(e) or type(e).__name__


def _fetch_once(url: str, dest: Path, log: Log) -> None:
    state_file = _state_path(dest)
    state = _read_state(state_file)
    have = dest.stat().st_size if dest.exists() else 0
    if have and state.get("url") != url:  # bytes of another URL (or of unknown origin): start over
        have = 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
        validator = state.get("etag") or state.get("last_modified")
        if validator:
            headers["If-Range"] = validator
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing after byte `have`: complete already, unless the file shrank
            total = _range_total(e.headers.get("Content-Range", ""))
            if total == have:
                return
            dest.unlink()
            state_file.unlink(missing_ok=True)
        raise
    with response:
        total = _open_for(response, url, dest, have, state_file, log)
        start = dest.stat().st_size
        progress = _Progress(dest.name.removesuffix(".part"), start, total, log)
        with open(dest, "ab") as out:
            while True:
                try:
                    chunk = response.read(CHUNK_BYTES)
                except http.client.IncompleteRead as e:
                    out.write(e.partial)  # keep what did arrive: the next attempt resumes after it
                    raise IncompleteDownload(_closed_after(out.tell(), total)) from None
                if not chunk:
                    break
                out.write(chunk)
                progress.update(len(chunk))
            got = out.tell()
    if total is not None and got < total:
        raise IncompleteDownload(_closed_after(got, total))
    progress.finish()


def _closed_after(got: int, total: int | None) -> str:
    return f"connection closed after {got:,}" + (f" of {total:,} bytes" if total is not None else " bytes")


def _open_for(response: Any, url: str, dest: Path, have: int, state_file: Path, log: Log) -> int | None:
    """Prepare ``dest`` for the body of ``response``; returns the resource's total size if known."""
    length = response.headers.get("Content-Length")
    if have and response.status == 206:
        start = _range_start(response.headers.get("Content-Range", ""))
        if start == have:
            total = _range_total(response.headers.get("Content-Range", ""))
            return total if total is not None else (have + int(length) if length else None)
        log(f"download: {url}: the server answered another range; starting over")
    elif have:
        log(f"download: {url}: the server sent the whole file (no resume, or it changed); starting over")
    # A fresh start: empty the file and record which version of the resource it holds.
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(b"")
    _write_state(state_file, {"url": url, "etag": response.headers.get("ETag"),
                              "last_modified": response.headers.get("Last-Modified")})
    if response.status == 206:  # a range nobody asked for from zero; read only what it announces
        return _range_total(response.headers.get("Content-Range", ""))
    return int(length) if length and length.isdigit() else None


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")


def _range_start(header: str) -> int | None:
    match = _CONTENT_RANGE.match(header.strip())
    return int(match.group(1)) if match else None


def _range_total(header: str) -> int | None:
    header = header.strip()
    match = _CONTENT_RANGE.match(header)
    if match:
        return int(match.group(3)) if match.group(3) != "*" else None
    match = _UNSATISFIED_RANGE.match(header)
    return int(match.group(1)) if match else None


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_state(path: Path, state: dict[str, Any]) -> None:
    path.write_text(json.dumps(state))


class _Progress:
    """A progress line every PROGRESS_EVERY_S seconds, and one at the end."""

    def __init__(self, name: str, start: int, total: int | None, log: Log) -> None:
        self.name, self.done, self.total, self.log = name, start, total, log
        self.started = self.last = time.monotonic()
        self.start = start
        if start:
            log(f"download: {name}: resuming at {_mb(start)}" + (f" of {_mb(total)}" if total else ""))

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            rate = (self.done - self.start) / max(now - self.started, 1e-9)
            share = f"{self.done / self.total:.0%} " if self.total else ""
            of = f" of {_mb(self.total)}" if self.total else ""
            self.log(f"download: {self.name}: {share}({_mb(self.done)}{of}, {rate / 1e6:.1f} MB/s)")

    def finish(self) -> None:
        seconds = time.monotonic() - self.started
        self.log(f"download: {self.name}: {_mb(self.done)} complete ({seconds:.0f} s)")


def _mb(n: int | None) -> str:
    return f"{(n or 0) / 1e6:.1f} MB"


def download_file(url: str, dest: Path, sha256: str | None, log: Log,
                  fetch: Callable[..., None] = fetch_url,
                  verify: Callable[[Path], None] | None = None, offline_hint: str = "") -> None:
    """Fetch ``url`` to ``dest`` through ``<dest>.part``; ``dest`` appears only once it verifies.

    ``verify(path)`` may raise DataError for checks beyond the checksum. A failed transfer keeps the
    partial file (the next run resumes it); a file that fails a check is deleted.
    """
    part = part_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        fetch(url, part, log=log)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        kept = part.stat().st_size if part.exists() else 0
        resume = f"{kept:,} bytes kept in {part}, run again to resume" if kept else "nothing was kept"
        raise DataError(f"{url}: download failed ({describe_error(e)}); {resume}{offline_hint}") from None
    try:
        if sha256 is not None:
            actual = sha256_file(part)
            if actual != sha256:
                raise DataError(f"{url}: SHA-256 mismatch, expected {sha256}, got {actual} "
                                f"(nothing was kept; run again to download it afresh){offline_hint}")
        if verify is not None:
            verify(part)
    except BaseException:
        part.unlink(missing_ok=True)
        _state_path(part).unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    _state_path(part).unlink(missing_ok=True)
