"""Downloads against a local HTTP server in a thread (never the real sites): progress, resume of an
interrupted transfer (HTTP Range, If-Range), servers that cannot resume, checksums, and the named
datasets fetched end to end from fixture bytes."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rerank_dist.config import DataConfig
from rerank_dist.data import DataError, catalog, download, load_dataset, prepare_data
from tests.test_datasets import amazon_metadata, amazon_ratings, ml1m_zip

PAYLOAD = random.Random(0).randbytes(3_000_000)


class FileServer:
    """Serves ``files`` by path, with Range/If-Range support that can be switched off, and drops the
    connection after ``cuts[path][k]`` bytes of the k-th response for that path."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.etags: dict[str, str] = {}
        self.cuts: dict[str, list[int]] = {}
        self.honor_range = True
        self.requests: list[dict[str, str | None]] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                server.requests.append({"path": self.path, "range": self.headers.get("Range"),
                                        "if_range": self.headers.get("If-Range")})
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                etag = server.etags.get(self.path, '"v1"')
                start, wanted = 0, self.headers.get("Range")
                if_range = self.headers.get("If-Range")
                if wanted and server.honor_range and if_range in (None, etag):
                    start = int(re.match(r"bytes=(\d+)-", wanted).group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.send_header("ETag", etag)
                self.end_headers()
                cuts = server.cuts.get(self.path)
                payload = body[start:start + cuts.pop(0)] if cuts else body[start:]
                self.wfile.write(payload)
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        return Handler


@pytest.fixture
def server():
    srv = FileServer()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(download, "RETRY_DELAYS_S", (0.0, 0.0, 0.0))
    monkeypatch.setattr(download, "PROGRESS_EVERY_S", 0.0)


def test_interrupted_transfer_resumes_where_it_stopped(tmp_path, server):
    server.files["/x.bin"] = PAYLOAD
    server.cuts["/x.bin"] = [1_000_000]
    lines: list[str] = []
    dest = tmp_path / "x.bin"
    download.download_file(server.url("/x.bin"), dest, hashlib.sha256(PAYLOAD).hexdigest(), lines.append)
    assert dest.read_bytes() == PAYLOAD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]  # no .part, no sidecar
    first, second = server.requests
    assert first["range"] is None
    assert second["range"] == "bytes=1000000-" and second["if_range"] == '"v1"'  # only the missing bytes
    assert any("connection closed after 1,000,000 of 3,000,000 bytes; resuming" in line for line in lines)
    assert any(re.search(r"download: x.bin: \d+% \(\d\.\d MB of 3.0 MB", line) for line in lines)
    assert lines[-1].startswith("download: x.bin: 3.0 MB complete")


def test_a_failed_run_keeps_its_bytes_and_the_next_run_resumes(tmp_path, server, monkeypatch):
    monkeypatch.setattr(download, "RETRY_DELAYS_S", ())  # no retry: the run fails
    server.files["/x.bin"] = PAYLOAD
    server.cuts["/x.bin"] = [1_200_000]
    dest = tmp_path / "x.bin"
    with pytest.raises(DataError) as err:
        download.download_file(server.url("/x.bin"), dest, None, lambda _m: None)
    message = str(err.value)
    assert "download failed (connection closed after 1,200,000 of 3,000,000 bytes); 1,200,000 bytes kept in" in message
    assert "run again to resume" in message and "\n" not in message
    assert not dest.exists() and download.part_path(dest).stat().st_size == 1_200_000
    download.download_file(server.url("/x.bin"), dest, None, lambda _m: None)  # the next run
    assert dest.read_bytes() == PAYLOAD and server.requests[-1]["range"] == "bytes=1200000-"


def test_a_server_that_cannot_resume_gets_a_fresh_start(tmp_path, server):
    server.honor_range = False
    server.files["/x.bin"] = PAYLOAD
    server.cuts["/x.bin"] = [700_000]
    lines: list[str] = []
    download.download_file(server.url("/x.bin"), tmp_path / "x.bin", None, lines.append)
    assert (tmp_path / "x.bin").read_bytes() == PAYLOAD  # not the first 700,000 bytes twice
    assert any("the server sent the whole file (no resume, or it changed); starting over" in line for line in lines)


def test_a_file_that_changed_meanwhile_is_never_spliced(tmp_path, server, monkeypatch):
    monkeypatch.setattr(download, "RETRY_DELAYS_S", ())
    server.files["/x.bin"] = PAYLOAD
    server.cuts["/x.bin"] = [500_000]
    with pytest.raises(DataError):
        download.download_file(server.url("/x.bin"), tmp_path / "x.bin", None, lambda _m: None)
    newer = PAYLOAD[::-1]
    server.files["/x.bin"], server.etags["/x.bin"] = newer, '"v2"'
    download.download_file(server.url("/x.bin"), tmp_path / "x.bin", None, lambda _m: None)
    assert server.requests[-1]["if_range"] == '"v1"'  # asked for the rest of v1; got all of v2
    assert (tmp_path / "x.bin").read_bytes() == newer


def test_a_partial_file_of_another_url_is_not_continued(tmp_path, server):
    server.files["/x.bin"] = PAYLOAD
    part = download.part_path(tmp_path / "x.bin")
    part.write_bytes(b"left over from something else")
    download.download_file(server.url("/x.bin"), tmp_path / "x.bin", None, lambda _m: None)
    assert (tmp_path / "x.bin").read_bytes() == PAYLOAD and server.requests[0]["range"] is None


def test_a_complete_partial_file_is_not_fetched_again(tmp_path, server):
    server.files["/x.bin"] = PAYLOAD
    part = download.part_path(tmp_path / "x.bin")
    part.write_bytes(PAYLOAD)
    part.with_name(part.name + ".json").write_text(json.dumps({"url": server.url("/x.bin"), "etag": '"v1"'}))
    download.download_file(server.url("/x.bin"), tmp_path / "x.bin", None, lambda _m: None)
    assert (tmp_path / "x.bin").read_bytes() == PAYLOAD
    assert len(server.requests) == 1 and server.requests[0]["range"] == "bytes=3000000-"  # answered 416


def test_not_found_is_not_retried(tmp_path, server):
    with pytest.raises(DataError, match=r"/missing.bin: download failed \(HTTP 404 Not Found\); nothing was kept"):
        download.download_file(server.url("/missing.bin"), tmp_path / "m.bin", None, lambda _m: None)
    assert len(server.requests) == 1


def test_checksum_mismatch_keeps_nothing(tmp_path, server):
    server.files["/x.bin"] = PAYLOAD
    with pytest.raises(DataError, match=r"x.bin: SHA-256 mismatch, expected 0{64}, got [0-9a-f]{64} \(nothing was kept"):
        download.download_file(server.url("/x.bin"), tmp_path / "x.bin", "0" * 64, lambda _m: None)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the named datasets, end to end


def serve_dataset(monkeypatch, server: FileServer, name: str, files: dict[str, bytes],
                  pins: dict[str, str | None] | None = None) -> None:
    """Point a catalog entry's downloads at the local server holding ``files``."""
    spec = catalog.CATALOG[name]
    downloads = []
    for remote in spec.downloads:
        server.files[f"/{name}/{remote.name}"] = files[remote.name]
        pin = (pins or {}).get(remote.name, remote.sha256 and hashlib.sha256(files[remote.name]).hexdigest())
        downloads.append(dataclasses.replace(remote, url=server.url(f"/{name}/{remote.name}"), sha256=pin))
    monkeypatch.setitem(catalog.CATALOG, name, dataclasses.replace(spec, downloads=tuple(downloads)))


def test_ml1m_download_is_checked_kept_and_reused(tmp_path, server, monkeypatch):
    serve_dataset(monkeypatch, server, "ml-1m", {"ml-1m.zip": ml1m_zip()})
    server.cuts["/ml-1m/ml-1m.zip"] = [1000]  # and the first transfer breaks off
    cfg = DataConfig(source="download", dataset="ml-1m", download_dir=str(tmp_path / "dl"))
    lines: list[str] = []
    meta = prepare_data(cfg, tmp_path / "data", tmp_path / "cache", log=lines.append)
    assert (meta["num_users"], meta["num_items"], meta["num_interactions"]) == (6, 5, 30)
    assert load_dataset(tmp_path / "data").titles[1] == "The Matrix (1999)"
    assert meta["source"]["official_release"] is True and meta["source"]["pinned"] == "release archive"
    assert [r["range"] for r in server.requests] == [None, "bytes=1000-"]
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["ml-1m.zip"]
    assert any("SHA-256 pinned" in line for line in lines)
    prepare_data(cfg, tmp_path / "data2", tmp_path / "cache", log=lambda _m: None)
    assert len(server.requests) == 2  # the verified archive is read again, not fetched


def test_ml1m_download_with_another_checksum_is_refused(tmp_path, server, monkeypatch):
    serve_dataset(monkeypatch, server, "ml-1m", {"ml-1m.zip": ml1m_zip()}, pins={"ml-1m.zip": "ab" * 32})
    cfg = DataConfig(source="download", dataset="ml-1m", download_dir=str(tmp_path / "dl"))
    with pytest.raises(DataError, match=r"ml-1m.zip: SHA-256 mismatch, expected (ab){32}"):
        prepare_data(cfg, tmp_path / "data", tmp_path / "cache", log=lambda _m: None)
    assert list((tmp_path / "dl").iterdir()) == []


def test_amazon_download_fetches_both_files(tmp_path, server, monkeypatch):
    serve_dataset(monkeypatch, server, "beauty", {
        "ratings_Beauty.csv": amazon_ratings().encode(),
        "meta_Beauty.json.gz": gzip.compress(amazon_metadata(python_literals=True))})
    cfg = DataConfig(source="download", dataset="beauty", download_dir=str(tmp_path / "dl"))
    lines: list[str] = []
    meta = prepare_data(cfg, tmp_path / "data", tmp_path / "cache", log=lines.append)
    assert (meta["num_users"], meta["num_items"]) == (6, 5)
    assert sorted(p.name for p in (tmp_path / "dl" / "beauty").iterdir()) == ["meta_Beauty.json.gz",
                                                                              "ratings_Beauty.csv"]
    assert meta["source"]["official_release"] is None and set(meta["source"]["urls"]) == {
        "ratings_Beauty.csv", "meta_Beauty.json.gz"}
    assert any("no published checksum: not pinned" in line for line in lines)


def test_amazon_download_refuses_an_error_page(tmp_path, server, monkeypatch):
    serve_dataset(monkeypatch, server, "games", {
        "ratings_Video_Games.csv": amazon_ratings().encode(),
        "meta_Video_Games.json.gz": b"<html><body>Too many requests</body></html>"})
    cfg = DataConfig(source="download", dataset="games", download_dir=str(tmp_path / "dl"))
    with pytest.raises(DataError, match=r"meta_Video_Games.json.gz: not a gzip file .*nothing was kept"):
        prepare_data(cfg, tmp_path / "data", tmp_path / "cache", log=lambda _m: None)
    assert sorted(p.name for p in (tmp_path / "dl" / "games").iterdir()) == ["ratings_Video_Games.csv"]


def test_which_checksums_are_pinned():
    """Pinned only where a published value could be checked (see catalog.py); the rest say so."""
    c = catalog.CATALOG
    assert c["ml-latest-small"].member_sha256["ratings.csv"].startswith("0b0e333b")
    assert c["ml-100k"].downloads[0].sha256 == "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229"
    assert c["ml-1m"].downloads[0].sha256 == "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20"
    assert all(r.sha256 is None for name in ("beauty", "games") for r in c[name].downloads)
