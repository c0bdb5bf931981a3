"""Local files: JSONL, JSON (an array of objects), CSV or Parquet, with a column mapping.

`data.path` is a file or a folder (every supported file in it, sorted by name). `data.format`
says which view the rows are (pairwise | pointwise | sft); when unset it is inferred from the
(mapped) columns of the first row. `data.column_map` renames source columns to ours, e.g.
`{"question": "prompt", "answer": "response", "thumbs_up": "label"}`.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import zlib
from pathlib import Path
from typing import Any, Iterator, Optional

from perl_core.config import DataConfig
from perl_core.data.schema import Item, Record, Reject, UTF8_HINT, check_view, decode_json, not_utf8
from perl_core.errors import DataError, UserError

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")


def files_of(path_text: Optional[str], what: str = "data.path") -> list[Path]:
    if not path_text:
        raise UserError(f"{what} is required for this source (a file or a folder of {', '.join(SUFFIXES)} files)")
    path = Path(path_text).expanduser()
    if not path.exists():
        raise UserError(f"{what}: {path} does not exist")
    if path.is_file():
        return [path]
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
    if not found:
        raise UserError(f"{what}: no {', '.join(SUFFIXES)} files in {path}")
    return found


def _open_text(path: Path):
    # utf-8-sig: spreadsheet programs start a CSV with a byte-order mark, which is not part of the
    # first column's name. surrogateescape: a byte that is not UTF-8 becomes a marker that
    # `not_utf8` finds, so it rejects its own row instead of ending the whole read.
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="surrogateescape")
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")


# what a truncated or corrupt .gz raises part-way (EOFError: the stream ends before its end marker)
_GZIP_ERRORS = (EOFError, OSError, zlib.error)


def decode_utf8(data: bytes, file: str) -> str:
    """A whole file's bytes as text (without a byte-order mark), or a DataError naming the first bad byte's line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise DataError(f"not UTF-8: byte 0x{data[err.start]:02x} on line {line} ({UTF8_HINT})", file=file) from None


def load_json(path: Path) -> Any:
    """The one JSON document in `path`, or a DataError naming the file, the line and what is wrong."""
    text = decode_utf8(path.read_bytes(), str(path))
    if not text.strip():
        raise DataError("empty file: no rows", file=str(path))
    try:
        return decode_json(text)
    except ValueError as err:
        raise DataError(f"invalid JSON: {err}", file=str(path)) from None


def read_jsonl(path: Path) -> Iterator[tuple[int, Any] | Reject]:
    """(line number, object) per non-blank line of a JSONL file (.gz too); a Reject for a line or a file
    that cannot be read."""
    name, n, line_no = str(path), 0, 0
    try:
        with _open_text(path) as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                n += 1
                if bad := not_utf8(line):
                    yield Reject(file=name, index=line_no, reason=f"{bad} ({UTF8_HINT})", raw=line.rstrip("\n")[:500])
                    continue
                try:
                    value = decode_json(line)
                except ValueError as err:
                    yield Reject(file=name, index=line_no, reason=f"invalid JSON line: {err}", raw=line.rstrip("\n")[:500])
                    continue
                yield line_no, value
    except _GZIP_ERRORS as err:
        if not path.name.endswith(".gz"):
            raise
        what = "not a gzip file" if isinstance(err, gzip.BadGzipFile) and not line_no else \
            f"truncated or corrupt gzip file after line {line_no}; the rest cannot be read"
        yield Reject(file=name, index=None, reason=f"{what} ({type(err).__name__}: {err})")
        return
    if n == 0:
        yield Reject(file=name, index=None, reason="empty file: no rows")


def _csv(path: Path) -> Iterator[tuple[int, Any] | Reject]:
    name, n = str(path), 0
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames or []
        except csv.Error as err:
            yield Reject(file=name, index=None, reason=f"unreadable CSV header (line 1): {err}")
            return
        if bad := not_utf8(",".join(header)):
            yield Reject(file=name, index=None, reason=f"header: {bad} of line 1 ({UTF8_HINT})")
            return
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as err:  # e.g. a NUL byte, or a field over the csv module's size limit
                n += 1
                yield Reject(file=name, index=n, reason=f"unreadable CSV row: {err}")
                continue
            n += 1
            row = {k: v for k, v in row.items() if k is not None}
            bad_field = next((k for k, v in row.items() if isinstance(v, str) and not_utf8(v)), None)
            if bad_field is not None:
                yield Reject(file=name, index=n, field=bad_field, raw=row,
                             reason=f"{not_utf8(row[bad_field])} of line {reader.line_num} ({UTF8_HINT})")
                continue
            yield n, row
    if n == 0:
        yield Reject(file=name, index=None, reason="empty file: no rows (a CSV needs a header and rows)")


def read_objects(path: Path) -> Iterator[tuple[int, Any] | Reject]:
    """(row number, object) for every row of a file; a Reject for rows (or files) that cannot be read."""
    name = str(path)
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        yield from read_jsonl(path)
    elif path.suffix == ".json":
        try:
            data = load_json(path)
        except DataError as err:
            yield Reject.from_error(err)
            return
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"data": [...]} / {"rows": [...]}
        if not isinstance(data, list):
            yield Reject(file=name, index=None, reason=f"expected a JSON array of objects, got {type(data).__name__}")
            return
        if not data:
            yield Reject(file=name, index=None, reason="empty file: the JSON array has no rows")
        yield from enumerate(data, start=1)
    elif path.suffix == ".csv":
        yield from _csv(path)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as err:
            yield Reject(file=name, index=None, reason=f"not a readable Parquet file: {err}")
            return
        if not rows:
            yield Reject(file=name, index=None, reason="empty file: no rows")
        yield from enumerate(rows, start=1)
    else:
        raise UserError(f"{path}: unsupported file type; expected one of {', '.join(SUFFIXES)}")


def apply_column_map(row: Any, column_map: dict[str, str]) -> Any:
    if not isinstance(row, dict) or not column_map:
        return row
    return {column_map.get(k, k): v for k, v in row.items()}


def infer_view(row: Any, file: str, index: int) -> str:
    keys = set(row) if isinstance(row, dict) else set()
    if {"chosen", "rejected"} <= keys:
        return "pairwise"
    if "label" in keys:
        return "pointwise"
    if "response" in keys:
        return "sft"
    raise DataError(f"cannot tell the format from the columns {sorted(keys)}: set data.format (pairwise | pointwise | sft)"
                    f" and data.column_map (source column -> prompt/chosen/rejected/response/label)", file=file, row=index)


def read(data_cfg: DataConfig) -> Iterator[Item]:
    view = check_view(data_cfg.format) if data_cfg.format else None
    for path in files_of(data_cfg.path):
        for item in read_objects(path):
            if isinstance(item, Reject):
                item.view = view
                yield item
                continue
            index, raw = item
            row = apply_column_map(raw, data_cfg.column_map)
            if view is None:
                view = infer_view(row, str(path), index)
            yield Record(view=view, row=row, file=str(path), index=index)


def source_files(path_text: Optional[str]) -> dict[str, str]:
    """{relative file name: sha256} of the source files, for the card (no absolute paths)."""
    files = files_of(path_text)
    root = Path(path_text).expanduser()
    base = root if root.is_dir() else root.parent
    return {p.relative_to(base).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def describe(data_cfg: DataConfig) -> dict:
    return {"type": "local", "format": data_cfg.format, "column_map": dict(sorted(data_cfg.column_map.items())),
            "files": source_files(data_cfg.path)}
