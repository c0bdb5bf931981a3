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
import json
from pathlib import Path
from typing import Any, Iterator, Optional

from perl_core.config import DataConfig
from perl_core.data.schema import Item, Record, Reject, check_view
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
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8", newline="")


def read_objects(path: Path) -> Iterator[tuple[int, Any] | Reject]:
    """(row number, object) for every row of a file; a Reject for rows (or files) that cannot be read."""
    name = str(path)
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        n = 0
        with _open_text(path) as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                n += 1
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError as err:
                    yield Reject(file=name, index=line_no, reason=f"invalid JSON line: {err.msg} at column {err.colno}",
                                 raw=line.rstrip("\n")[:500])
        if n == 0:
            yield Reject(file=name, index=None, reason="empty file: no rows")
    elif path.suffix == ".json":
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            yield Reject(file=name, index=None, reason="empty file: no rows")
            return
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            yield Reject(file=name, index=None, reason=f"invalid JSON: {err.msg} (line {err.lineno}, column {err.colno})")
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
        with _open_text(path) as f:
            reader = csv.DictReader(f)
            n = 0
            for n, row in enumerate(reader, start=1):
                yield n, {k: v for k, v in row.items() if k is not None}
        if n == 0:
            yield Reject(file=name, index=None, reason="empty file: no rows (a CSV needs a header and rows)")
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
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
