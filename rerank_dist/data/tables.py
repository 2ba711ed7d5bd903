"""Reading raw tables with pyarrow, and saying exactly where a bad one goes wrong.

The fast path hands a whole file to pyarrow's multi-threaded CSV reader (or its Parquet reader)
with the column types fixed in advance. Only when that fails, or a vectorised check finds a bad
value, is the file walked line by line with Python's ``csv`` module, to name the line, the column
and what was expected: a slow path that a well-formed file never takes.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from rerank_dist.data.errors import DataError
from rerank_dist.io import sha256_file  # hashlib.file_digest needs 3.11; 3.10 is the floor

# Values longer than this are cut in messages, so an error stays one readable line.
_SHOWN_CHARS = 60
_INTEGER = re.compile(r"[+-]?\d+")
# For pyarrow (RE2): how numbers are written in text files.
_INTEGER_TEXT = r"^[+-]?\d+$"
_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
# An integer id as a number would print it: not "07" or "+7", which are other ids than "7".
_PLAIN_INTEGER = r"^(0|-?[1-9]\d*)$"
PARQUET_SUFFIXES = (".parquet", ".pq")

Where = Callable[[int], str]  # record index -> "line 12" / "row 12"


@dataclass(frozen=True)
class RawFile:
    """A raw file, on disk or in memory (an archive member), and the name messages give it."""

    origin: str
    path: Path | None = None
    data: bytes | None = None

    @property
    def name(self) -> str:
        return Path(self.origin.rsplit(":", 1)[-1]).name if self.data is not None else Path(self.origin).name

    def arrow_source(self) -> pa.NativeFile | str:
        # A path lets pyarrow map the file and undo .gz/.bz2 compression itself.
        return pa.BufferReader(self.data) if self.data is not None else str(self.path)

    def open_binary(self) -> BinaryIO:
        if self.data is not None:
            return io.BytesIO(self.data)
        assert self.path is not None
        return gzip.open(self.path, "rb") if self.path.suffix == ".gz" else open(self.path, "rb")

    def sha256(self) -> str:
        if self.data is not None:
            return hashlib.sha256(self.data).hexdigest()
        assert self.path is not None
        return sha256_file(self.path)


@dataclass(frozen=True)
class CsvLayout:
    """How a delimited file is written."""

    delimiter: str = ","
    quoted: bool = True  # '"' quotes fields (which may then hold newlines)
    header: bool = True
    column_names: tuple[str, ...] = ()  # when there is no header line
    encoding: str = "utf-8"
    shown_delimiter: str = ""  # how messages name the delimiter, if the bytes were rewritten

    def describe_delimiter(self) -> str:
        return self.shown_delimiter or {"\t": "tabs", ",": "commas"}.get(self.delimiter, repr(self.delimiter))


def show(value: object) -> str:
    """A value for a one-line message: text quoted, other values as Python writes them, long ones cut."""
    if value is None:
        return "nothing"
    text = value if isinstance(value, str) else repr(value)
    text = text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."
    return repr(text) if isinstance(value, str) else text


# ---------------------------------------------------------------- CSV


def read_header(raw: RawFile, layout: CsvLayout) -> list[str]:
    """The column names: the first record of a file with a header line, else the layout's names."""
    if not layout.header:
        return list(layout.column_names)
    for _line, fields in records(raw, layout):
        return fields
    raise DataError(f"{raw.origin}: not a readable CSV (empty file)")


# How each kind of column is read. Ids are dictionary-encoded while parsing: each row holds an int32
# code and each distinct id is stored once, so ten million rows never become ten million strings.
_ARROW_TYPES = {"int": pa.int64(), "str": pa.string(), "id": pa.dictionary(pa.int32(), pa.string()),
                "time": pa.int64()}


def read_csv(raw: RawFile, layout: CsvLayout, columns: dict[str, str]) -> pa.Table:
    """The named columns of a delimited file. ``columns`` maps a name to a kind: "int" (int64),
    "str", "id" (dictionary-encoded text; see ``ids``) or "time" (int64 when every value is an
    integer, else text for ``times`` to parse).

    Raises DataError naming the file and, where it can be found, the line and column at fault.
    """
    header = read_header(raw, layout)
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{raw.origin}: missing column(s) {', '.join(missing)}; expected columns "
                        f"{', '.join(columns)} (found {', '.join(header) or 'none'})")
    try:
        return _arrow_csv(raw, layout, columns, time_as_text=False)
    except (pa.ArrowInvalid, pa.ArrowKeyError, UnicodeDecodeError) as e:
        error: Exception = e
    if "time" in columns.values():  # times that are not all integers: read them as text
        try:
            return _arrow_csv(raw, layout, columns, time_as_text=True)
        except (pa.ArrowInvalid, pa.ArrowKeyError, UnicodeDecodeError) as e:
            error = e
    raise diagnose(raw, layout, columns, error) from None


def _arrow_csv(raw: RawFile, layout: CsvLayout, columns: dict[str, str], time_as_text: bool) -> pa.Table:
    read_options = pcsv.ReadOptions(
        encoding="utf8" if _is_utf8(layout.encoding) else layout.encoding,
        column_names=None if layout.header else list(layout.column_names), block_size=16 << 20)
    parse_options = pcsv.ParseOptions(delimiter=layout.delimiter, quote_char='"' if layout.quoted else False,
                                      newlines_in_values=layout.quoted, ignore_empty_lines=True)
    types = {c: pa.string() if kind == "time" and time_as_text else _ARROW_TYPES[kind] for c, kind in columns.items()}
    convert_options = pcsv.ConvertOptions(column_types=types, include_columns=list(columns), null_values=[],
                                          strings_can_be_null=False, quoted_strings_can_be_null=False)
    table = pcsv.read_csv(raw.arrow_source(), read_options=read_options, parse_options=parse_options,
                          convert_options=convert_options)
    # Each block of the file has its own dictionary; one shared dictionary per column from here on.
    return table.unify_dictionaries().combine_chunks()


def records(raw: RawFile, layout: CsvLayout) -> Iterator[tuple[int, list[str]]]:
    """(first line number, fields) of every non-empty record, header included, as pyarrow reads them."""
    lines = _decoded_lines(raw, layout.encoding)
    if layout.quoted:
        reader = csv.reader(lines, delimiter=layout.delimiter, quotechar='"')
        before = 0
        for fields in reader:
            start, before = before + 1, reader.line_num
            if fields and fields != [""]:
                yield start, fields
        return
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r\n")
        if line:
            yield number, line.split(layout.delimiter)


def _decoded_lines(raw: RawFile, encoding: str) -> Iterator[str]:
    shown = "UTF-8" if _is_utf8(encoding) else encoding
    with raw.open_binary() as f:
        for number, line in enumerate(f, start=1):
            if number == 1 and line.startswith(b"\xef\xbb\xbf") and _is_utf8(encoding):
                line = line[3:]  # a byte-order mark, which pyarrow skips too
            try:
                yield line.decode(encoding)
            except UnicodeDecodeError as e:
                raise DataError(f"{raw.origin}: line {number}: not {shown} text (byte {e.start + 1} of the "
                                f"line is {line[e.start:e.start + 1]!r})") from None


def _is_utf8(encoding: str) -> bool:
    return encoding.lower().replace("-", "").replace("_", "") == "utf8"


def diagnose(raw: RawFile, layout: CsvLayout, columns: dict[str, str], error: Exception) -> DataError:
    """Find the first record pyarrow could not read and say what is wrong with it."""
    names: list[str] | None = None if layout.header else list(layout.column_names)
    for line, fields in records(raw, layout):
        if names is None:
            names = fields
            continue
        if len(fields) != len(names):
            return DataError(f"{raw.origin}: line {line}: expected {len(names)} fields separated by "
                             f"{layout.describe_delimiter()} ({', '.join(names)}), got {len(fields)}")
        for column, kind in columns.items():
            value = fields[names.index(column)]
            if kind == "int" and not _INTEGER.fullmatch(value):  # "time" and the rest: checked after reading
                return DataError(f"{raw.origin}: column {column}, line {line}: expected an integer, got {show(value)}")
    if names is None:
        return DataError(f"{raw.origin}: not a readable CSV (empty file)")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return DataError(f"{raw.origin}: not a readable CSV ({first})")


def csv_where(raw: RawFile, layout: CsvLayout) -> Where:
    """Record index (header excluded) -> "line N", found by walking the file (used on errors only)."""
    def where(index: int) -> str:
        skipped = 1 if layout.header else 0
        for k, (line, _fields) in enumerate(records(raw, layout)):
            if k == index + skipped:
                return f"line {line}"
        return f"record {index + 1}"
    return where


# ---------------------------------------------------------------- Parquet


def read_parquet_columns(raw: RawFile, columns: Sequence[str]) -> pa.Table:
    try:
        schema = pq.read_schema(raw.arrow_source())
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise DataError(f"{raw.origin}: missing column(s) {', '.join(missing)}; expected columns "
                            f"{', '.join(columns)} (found {', '.join(schema.names) or 'none'})")
        return pq.read_table(raw.arrow_source(), columns=list(dict.fromkeys(columns))).combine_chunks()
    except (pa.ArrowInvalid, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{raw.origin}: not a readable Parquet file ({first})") from None


def parquet_where(index: int) -> str:
    return f"row {index + 1}"


def is_parquet(path: Path) -> bool:
    return path.suffix.lower() in PARQUET_SUFFIXES


# ---------------------------------------------------------------- columns


def first_true(mask: pa.Array | pa.ChunkedArray) -> int | None:
    index = pc.index(mask, pa.scalar(True)).as_py()
    return None if index < 0 else index


def ids(values: pa.Array | pa.ChunkedArray, origin: str, column: str, where: Where, word: str = "column") -> pa.Array:
    """An id column as int64, or as text ids dictionary-encoded (int32 codes into distinct strings);
    refuses missing and blank ids and other types."""
    values = _one_array(values)
    if pa.types.is_dictionary(values.type) and not _is_text(values.type.value_type):
        values = values.dictionary_decode()
    if _is_text(values.type):
        values = pc.dictionary_encode(values.cast(pa.string()))
    if pa.types.is_integer(values.type):
        values = values.cast(pa.int64())
    elif not pa.types.is_dictionary(values.type):
        raise DataError(f"{origin}: {word} {column}: expected integer or text ids, got {values.type}")
    bad = first_true(values.is_null())
    if bad is not None:
        raise DataError(f"{origin}: {word} {column}, {where(bad)}: expected an id, got nothing")
    if pa.types.is_dictionary(values.type):
        values = pa.DictionaryArray.from_arrays(values.indices.cast(pa.int32()), values.dictionary.cast(pa.string()))
        blank = np.flatnonzero(pc.match_substring_regex(values.dictionary, r"^\s*$").to_numpy(zero_copy_only=False))
        if blank.size:
            row = first_true(pc.is_in(values.indices, value_set=pa.array(blank, type=pa.int32())))
            if row is not None:
                raise DataError(f"{origin}: {word} {column}, {where(row)}: expected an id, "
                                f"got {show(values.dictionary[int(blank[0])].as_py())}")
    return values


def unify_ids(*columns: pa.Array) -> list[pa.Array]:
    """Id columns that must compare with each other as one type: int64 when every value of every
    column is an integer written plainly ("7", not "07" or "+7"), so ids order as numbers; else text.
    Only the distinct values are inspected, and a dictionary-encoded column stays so (its values
    converted), so that preprocessing can use its codes as they are."""
    if all(pa.types.is_integer(c.type) for c in columns):
        return [c.cast(pa.int64()) for c in columns]
    columns = tuple(pc.dictionary_encode(c.cast(pa.string())) if _is_text(c.type) else c for c in columns)
    texts = [c for c in columns if pa.types.is_dictionary(c.type)]
    if all(pc.all(pc.match_substring_regex(c.dictionary, _PLAIN_INTEGER)).as_py() is not False for c in texts):
        try:
            return [c.cast(pa.int64()) if pa.types.is_integer(c.type)
                    else pa.DictionaryArray.from_arrays(c.indices, pc.cast(c.dictionary, pa.int64())) for c in columns]
        except pa.ArrowInvalid:  # beyond int64: text after all
            pass
    return [c if pa.types.is_dictionary(c.type) else pc.dictionary_encode(c.cast(pa.string())) for c in columns]


def encode(keys: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Integer codes (0..k-1) for ``keys`` and the k distinct keys: a dictionary column's own codes,
    with values no row uses left out."""
    keys = _one_array(keys)
    if not pa.types.is_dictionary(keys.type):
        keys = pc.dictionary_encode(keys)
    # int32 codes (pyarrow's own indices, no copy): half the memory of int64 over millions of rows.
    codes = keys.indices.cast(pa.int32()).to_numpy(zero_copy_only=False)
    distinct = keys.dictionary
    used = np.bincount(codes, minlength=len(distinct)) > 0
    if not used.all():
        kept = np.flatnonzero(used)
        remap = np.full(len(distinct), -1, dtype=np.int32)
        remap[kept] = np.arange(len(kept), dtype=np.int32)
        codes, distinct = remap[codes], distinct.take(pa.array(kept))
    return codes, distinct


def _is_text(tp: pa.DataType) -> bool:
    return pa.types.is_string(tp) or pa.types.is_large_string(tp)


def times(values: pa.Array | pa.ChunkedArray, origin: str, column: str, where: Where,
          word: str = "column") -> pa.Array:
    """Interaction times as int64 or float64 (only their order matters): numbers as written,
    date-times as nanoseconds since 1970 (UTC when no zone is given)."""
    values = _decoded(values)
    expected = "a number or a date-time"
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        values = values.cast(pa.string())
        values = _parse_times(values, origin, column, where, word)
    if pa.types.is_timestamp(values.type) or pa.types.is_date(values.type):
        values = values.cast(pa.timestamp("ns")) if pa.types.is_date(values.type) else values
        values = values.cast(pa.int64())
    elif pa.types.is_integer(values.type):
        values = values.cast(pa.int64())
    elif pa.types.is_floating(values.type):
        values = values.cast(pa.float64())
        bad = first_true(pc.is_nan(values))
        if bad is not None:
            raise DataError(f"{origin}: {word} {column}, {where(bad)}: expected {expected}, got nan")
    else:
        raise DataError(f"{origin}: {word} {column}: expected {expected}, got values of type {values.type}")
    bad = first_true(values.is_null())
    if bad is not None:
        raise DataError(f"{origin}: {word} {column}, {where(bad)}: expected {expected}, got nothing")
    return values


def _parse_times(values: pa.Array, origin: str, column: str, where: Where, word: str) -> pa.Array:
    try:  # the usual case, whole seconds (or ms), costs one cast
        return pc.cast(values, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    stripped = pc.utf8_trim_whitespace(values)
    numeric = pc.match_substring_regex(stripped, _NUMBER)
    if pc.all(numeric).as_py() is not False:  # numbers (an empty column has none to check)
        integral = pc.all(pc.match_substring_regex(stripped, _INTEGER_TEXT)).as_py() is not False
        return pc.cast(stripped, pa.int64() if integral else pa.float64())
    bad = first_true(pc.invert(numeric))
    if pc.any(numeric).as_py():  # mostly numbers: the odd one out is the error, not the numbers
        raise DataError(f"{origin}: {word} {column}, {where(bad)}: expected a number like the other values, "
                        f"got {show(values[bad].as_py())}")
    series = pd.Series(stripped.to_numpy(zero_copy_only=False), dtype=object)
    # ISO 8601 parses in C; other spellings ("03/01/2020 10:00") one by one, so only where needed.
    stamps = pd.to_datetime(series, errors="coerce", utc=True, format="ISO8601").dt.as_unit("ns")
    unparsed = stamps.isna()
    if unparsed.any():
        stamps[unparsed] = pd.to_datetime(series[unparsed], errors="coerce", utc=True,
                                          format="mixed").dt.as_unit("ns")
    bad = np.flatnonzero(stamps.isna().to_numpy())
    if bad.size:
        index = int(bad[0])
        raise DataError(f"{origin}: {word} {column}, {where(index)}: expected a number or a date-time, "
                        f"got {show(values[index].as_py())}")
    return pa.array(stamps.array.asi8, type=pa.int64())


def text(values: pa.Array | pa.ChunkedArray, origin: str, column: str, word: str = "column") -> pa.Array:
    """A title column as strings; a missing value is an empty title (counted and dropped later)."""
    values = _decoded(values)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        if pa.types.is_null(values.type):
            return pa.array([""] * len(values), type=pa.string())
        raise DataError(f"{origin}: {word} {column}: expected text, got values of type {values.type}")
    return values.cast(pa.string()).fill_null("")


def _one_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.unify_dictionaries().combine_chunks() if pa.types.is_dictionary(values.type) \
            else values.combine_chunks()
    return values


def _decoded(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    values = _one_array(values)
    return values.dictionary_decode() if pa.types.is_dictionary(values.type) else values
