"""The three row formats and their validation.

A source adapter yields `Record`s (a raw row with where it came from) or `Reject`s (a row it
could not even read, e.g. an invalid JSON line). `validate` turns a record into a clean row or
raises a `DataError` that names the file, the row number and the field.

Rows may also arrive in TRL's conversational form: `prompt` a list of `{role, content}` messages
(system / user / assistant, ending with a user turn) and each response a list holding one
assistant message. The prompt becomes the HH-RLHF transcript
"Human: ...\n\nAssistant: ...\n\nHuman: ...\n\nAssistant:" (a system message as "System: ..."),
the response " " + its content, so prompt + response is the transcript and every stage reads
text; with a chat template the transcript is rendered back into those messages
(`modeling.prompt_messages`).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

from perl_core.errors import DataError

VIEWS: dict[str, tuple[str, ...]] = {
    "pairwise": ("prompt", "chosen", "rejected"),
    "pointwise": ("prompt", "response", "label"),
    "sft": ("prompt", "response"),
}
TEXT_FIELDS = {"prompt", "chosen", "rejected", "response"}
TRANSCRIPT_ROLES = {"system": "System", "user": "Human", "assistant": "Assistant"}
SPLITS = ("train", "validation", "test")
# Lone surrogates: what `errors="surrogateescape"` makes of bytes that are not UTF-8 (U+DC80-U+DCFF),
# or a JSON \ud800 escape missing its pair. Neither can be written back out as UTF-8.
SURROGATE = re.compile("[\ud800-\udfff]")
UTF8_HINT = "save the file as UTF-8"


def decode_json(text: str) -> Any:
    """`json.loads(text)`, every failure a ValueError that says why in words: a syntax error with its
    place, a document nested too deeply for the decoder (RecursionError), an integer over Python's
    digit limit, ... Each reader turns it into the one row's (or file's) reject, never a traceback."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = f"line {err.lineno}, column {err.colno}" if "\n" in text.strip() else f"column {err.colno}"
        raise ValueError(f"{err.msg} at {where}") from None
    except RecursionError:
        raise ValueError("nested too deeply to decode (arrays or objects inside each other past Python's "
                         "recursion limit)") from None
    except (ValueError, TypeError, MemoryError) as err:
        raise ValueError(f"cannot be decoded: {type(err).__name__}: {err}") from None


def not_utf8(text: str) -> Optional[str]:
    """Why `text`, as read from a file with errors="surrogateescape", is not valid UTF-8; None when it is."""
    m = SURROGATE.search(text)
    return None if m is None else f"not UTF-8: byte 0x{ord(m.group()) - 0xDC00:02x} at character {m.start() + 1}"


def _unpaired_surrogate(text: str) -> Optional[str]:
    """After parsing (the reader already rejected bad bytes), a surrogate came from a JSON escape."""
    m = SURROGATE.search(text)
    if m is None:
        return None
    return f"not valid Unicode: unpaired surrogate U+{ord(m.group()):04X} at character {m.start() + 1} (a broken \\u escape?)"


def printable(value: Any) -> Any:
    """`value` with every lone surrogate replaced by U+FFFD, so a reject can be written out as UTF-8."""
    if isinstance(value, str):
        return SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {printable(k): printable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [printable(v) for v in value]
    return value


@dataclass
class Record:
    view: str
    row: dict[str, Any]
    file: str
    index: int  # 1-based row number within `file`


@dataclass
class Reject:
    file: str
    index: Optional[int]
    reason: str
    field: Optional[str] = None
    view: Optional[str] = None
    raw: Any = None

    @classmethod
    def from_error(cls, err: DataError, view: Optional[str] = None, raw: Any = None) -> "Reject":
        return cls(file=err.file or "", index=err.row, reason=err.reason, field=err.field, view=view, raw=raw)

    def as_error(self) -> DataError:
        return DataError(self.reason, file=self.file or None, row=self.index, field=self.field)

    def to_json(self) -> dict:
        raw = self.raw if isinstance(self.raw, (str, dict, type(None))) else str(self.raw)
        return {"file": self.file, "row": self.index, "field": self.field, "view": self.view,
                "reason": self.reason, "raw": printable(raw)}


Item = Union[Record, Reject]


def _label(value: Any) -> int:
    """Thumbs up/down as 0/1. CSV gives strings, JSON may give bools or floats (Taskmaster: 1.0)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"label must be 0 or 1 (thumbs down/up), got the text {value!r}") from None
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)) and value in (0, 1):
        return int(value)
    raise ValueError(f"label must be 0 or 1 (thumbs down/up), got {value!r}")


def _messages(value: list, what: str) -> list[tuple[str, str]]:
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in TRANSCRIPT_ROLES:
            raise ValueError(f"{what}: message {i} must be {{role, content}} with role one of "
                             f"{sorted(TRANSCRIPT_ROLES)} and text content, got {m!r:.80}")
        out.append((m["role"], m["content"].strip()))
    if not out:
        raise ValueError(f"{what}: an empty message list")
    return out


def conversation_text(name: str, value: list) -> str:
    """A TRL conversational field as our text: the prompt as an HH transcript ending with the
    assistant cue, a response (one assistant message) as " " + its content."""
    messages = _messages(value, "conversational " + name)
    if name == "prompt":
        if messages[-1][0] == "assistant":
            raise ValueError("conversational prompt: its last message is the assistant's; the prompt ends with "
                             "the user's turn and the response is the assistant's reply")
        turns = [f"{TRANSCRIPT_ROLES[role]}: {content}" for role, content in messages]
        return "\n\n".join(turns + ["Assistant:"])
    if len(messages) != 1 or messages[0][0] != "assistant":
        raise ValueError(f"conversational {name}: expected one assistant message, got roles "
                         f"{[role for role, _ in messages]}")
    return " " + messages[0][1]


def validate(record: Record) -> dict[str, Any]:
    """A clean row of `record.view`, or a `DataError` naming file, row and field."""
    view, raw = record.view, record.row
    where = dict(file=record.file, row=record.index)
    if view not in VIEWS:
        raise DataError(f"unknown view {view!r}; expected one of {sorted(VIEWS)}", **where)
    if not isinstance(raw, dict):
        raise DataError(f"expected an object with fields {list(VIEWS[view])}, got {type(raw).__name__}", **where)
    clean: dict[str, Any] = {}
    for name in VIEWS[view]:
        if name not in raw or raw[name] is None:
            present = ", ".join(sorted(map(str, raw))) or "none"
            raise DataError(f"missing field (a {view} row needs {', '.join(VIEWS[view])}; this row has {present};"
                            f" map other column names with data.column_map)", field=name, **where)
        value = raw[name]
        if name == "label":
            try:
                clean[name] = _label(value)
            except ValueError as err:
                raise DataError(str(err), field=name, **where) from None
            continue
        if isinstance(value, list):
            try:
                value = conversation_text(name, value)
            except ValueError as err:
                raise DataError(str(err), field=name, **where) from None
        if not isinstance(value, str):
            raise DataError(f"expected text, got {type(value).__name__} {value!r:.60} (or TRL's conversational "
                            "form: a list of {role, content} messages)", field=name, **where)
        if not value.strip():
            raise DataError("empty text", field=name, **where)
        if bad := _unpaired_surrogate(value):
            raise DataError(bad, field=name, **where)
        clean[name] = value
    if view == "pairwise" and clean["chosen"] == clean["rejected"]:
        raise DataError("chosen and rejected are the same text (a preference needs two different replies)",
                        field="rejected", **where)
    for key, value in raw.items():  # extra scalar columns (id, source, gold, ...) ride along
        if key in clean or (isinstance(value, float) and not math.isfinite(value)):
            continue
        if isinstance(value, str) and (bad := _unpaired_surrogate(value)):
            raise DataError(bad, field=str(key), **where)
        if isinstance(value, (str, int, float, bool)):
            clean[key] = value
    return clean


def check_view(view: str, setting: str = "data.format") -> str:
    if view not in VIEWS:
        raise DataError(f"{setting} must be one of {sorted(VIEWS)}, got {view!r}")
    return view


@dataclass
class Collected:
    """Rows that passed validation, per view, and the rejects (with `on_error: skip`)."""

    rows: dict[str, list[dict]] = field(default_factory=dict)
    rejects: list[Reject] = field(default_factory=list)
    read: dict[str, int] = field(default_factory=dict)


def collect(items: Iterator[Item], on_error: str) -> Collected:
    """Validate every item; the first bad one raises unless `on_error == "skip"`."""
    out = Collected()
    for item in items:
        if isinstance(item, Record):
            out.read[item.view] = out.read.get(item.view, 0) + 1
            try:
                out.rows.setdefault(item.view, []).append(validate(item))
                continue
            except DataError as err:
                item = Reject.from_error(err, view=item.view, raw=item.row)
        elif item.view and item.index is not None:  # a row the reader could not parse still counts as read
            out.read[item.view] = out.read.get(item.view, 0) + 1
        if on_error != "skip":
            raise item.as_error()
        out.rejects.append(item)
    return out
