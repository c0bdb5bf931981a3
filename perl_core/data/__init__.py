"""Preference data: formats, sources, preparation, DVC versioning.

On disk: ``data/<name>/<view>/{train,validation,test}.jsonl`` plus ``card.json``/``card.md``.
Views: ``pairwise`` {prompt, chosen, rejected}, ``pointwise`` {prompt, response, label},
``sft`` {prompt, response}. The prompt ends exactly where the response begins.
"""
from __future__ import annotations

from perl_core.config import DataConfig
from perl_core.data.prepare import dataset_dir, prepare_dataset
from perl_core.data.schema import SPLITS, TEXT_FIELDS, VIEWS, decode_json, not_utf8
from perl_core.errors import DataError

__all__ = ["load_rows", "load_prompts", "load_prompt_rows", "corpus", "prepare_dataset", "VIEWS", "SPLITS"]


def _import_hint(data_cfg: DataConfig) -> str:
    if data_cfg.source == "synthetic":
        return "run `perl-rlhf data import synthetic` (or `make run`) first"
    path = f" --path {data_cfg.path}" if data_cfg.path else ""
    return f"run `perl-rlhf data import {data_cfg.source}{path}` first"


def load_rows(data_cfg: DataConfig, view: str, split: str) -> list[dict]:
    """Rows of one view and split, as written by `prepare_dataset`."""
    if view not in VIEWS:
        raise DataError(f"unknown view {view!r}; expected one of {sorted(VIEWS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    root = dataset_dir(data_cfg)
    path = root / view / f"{split}.jsonl"
    if not path.exists():
        if root.is_dir() and not (root / view).is_dir():
            have = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise DataError(f"dataset {root} has no {view} view (it has: {', '.join(have) or 'none'})")
        raise DataError(f"{path} not found: {_import_hint(data_cfg)}")
    return _read_split(path, view, data_cfg)


def _read_split(path, view: str, data_cfg: DataConfig) -> list[dict]:
    """The rows of one prepared file; a damaged file (edited by hand, cut short) names its line and field."""
    redo = f"the prepared file is damaged: re-create it with `perl-rlhf data import {data_cfg.source}`"
    rows = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = dict(file=str(path), row=line_no)
            if bad := not_utf8(line):
                raise DataError(f"{bad}; {redo}", **where)
            try:
                row = decode_json(line)
            except ValueError as err:
                raise DataError(f"invalid JSON line: {err}; {redo}", **where) from None
            if not isinstance(row, dict):
                raise DataError(f"expected an object, got {type(row).__name__}; {redo}", **where)
            for name in VIEWS[view]:
                if name not in row or (name in TEXT_FIELDS and not isinstance(row[name], str)):
                    raise DataError(f"missing or not text (a {view} row needs {', '.join(VIEWS[view])}); {redo}",
                                    field=name, **where)
            rows.append(row)
    return rows


def load_prompts(data_cfg: DataConfig, split: str) -> list[str]:
    """Unique prompts of a split across every view present (sft first), in file order (RL, evaluation)."""
    root = dataset_dir(data_cfg)
    views = [v for v in ("sft", "pairwise", "pointwise") if (root / v / f"{split}.jsonl").exists()]
    if not views:
        load_rows(data_cfg, "sft", split)  # raises the "run import first" error
    seen: dict[str, None] = {}
    for view in views:
        for row in load_rows(data_cfg, view, split):
            seen.setdefault(row["prompt"], None)
    return list(seen)


def load_prompt_rows(data_cfg: DataConfig, split: str) -> dict[str, dict]:
    """Each unique prompt of a split (as `load_prompts` lists them) with its first data row: what
    programmatic rewards (`policy.rewards`) read beside the prompt."""
    root = dataset_dir(data_cfg)
    rows: dict[str, dict] = {}
    for view in ("sft", "pairwise", "pointwise"):
        if (root / view / f"{split}.jsonl").exists():
            for row in load_rows(data_cfg, view, split):
                rows.setdefault(row["prompt"], row)
    return rows


def corpus(data_cfg: DataConfig) -> list[str]:
    """Unique train-split texts (prompts and responses, separately, as `encode_pair` tokenises them)
    for training a scratch backbone's tokenizer."""
    root = dataset_dir(data_cfg)
    views = [v for v in sorted(VIEWS) if (root / v / "train.jsonl").exists()]
    if not views:
        load_rows(data_cfg, "sft", "train")
    seen: dict[str, None] = {}
    for view in views:
        for row in load_rows(data_cfg, view, "train"):
            for key in ("prompt", "response", "chosen", "rejected"):
                if key in row:
                    seen.setdefault(row[key], None)
    return list(seen)
