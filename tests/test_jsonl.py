"""One reader for JSON Lines logs (io.read_jsonl): a last line cut by a killed writer is dropped and
reported, a damaged line before it is an error naming the file and the line."""

from __future__ import annotations

import json

import pytest

from rerank_dist.io import JsonlError, append_jsonl, read_jsonl

RECORDS = [{"step": s, "loss": 3.0 - s / 10} for s in (1, 2, 3)]


def _complete(path):
    for r in RECORDS:
        append_jsonl(path, r)


def test_a_complete_file_reads_whole(tmp_path):
    log = tmp_path / "train_log.jsonl"
    _complete(log)
    records, cut = read_jsonl(log)
    assert records == RECORDS and not cut


@pytest.mark.parametrize("tail", [b'{"step": 4, "lo', b'{"step": 4, "note": "\xc3', b'{"step": 4}\x00\x00'])
def test_a_cut_last_line_is_dropped_and_reported(tmp_path, tail):
    log = tmp_path / "train_log.jsonl"
    _complete(log)
    with open(log, "ab") as f:
        f.write(tail)  # a writer killed in the middle of its append (the last one: a multibyte character, NULs)
    with pytest.raises(ValueError):  # precondition: the planted last line is not JSON
        json.loads(log.read_bytes().splitlines()[-1])
    records, cut = read_jsonl(log)
    assert records == RECORDS
    assert cut == 4  # the line number, for the caller's message


def test_a_damaged_line_before_the_last_is_an_error_naming_file_and_line(tmp_path):
    log = tmp_path / "train_log.jsonl"
    lines = [json.dumps(RECORDS[0]), '{"step": 2, "lo', json.dumps(RECORDS[2])]
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError):  # precondition: line 2 is not JSON, and it is not the last
        json.loads(log.read_text().splitlines()[1])
    with pytest.raises(JsonlError) as err:
        read_jsonl(log)
    message = str(err.value)
    assert str(log) in message and "line 2" in message and "\n" not in message


def test_a_line_that_is_json_but_not_an_object_is_an_error(tmp_path):
    log = tmp_path / "x.jsonl"
    log.write_text('{"step": 1}\n[1, 2]\n{"step": 3}\n')
    with pytest.raises(JsonlError, match=r"line 2.*expected a JSON object"):
        read_jsonl(log)


def test_blank_lines_are_skipped_but_counted(tmp_path):
    log = tmp_path / "x.jsonl"
    log.write_text('{"step": 1}\n\n{"step": 2}\n\n{"step":')
    records, cut = read_jsonl(log)
    assert records == [{"step": 1}, {"step": 2}] and cut == 5
