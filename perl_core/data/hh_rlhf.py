"""Anthropic HH-RLHF transcripts -> pairwise rows.

Each row holds two whole transcripts, `chosen` and `rejected`, written as
"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: <final reply>". They share
everything up to the last "\\n\\nAssistant:"; that shared part, multi-turn history kept whole, is
the prompt, and the two final assistant turns are `chosen` and `rejected` (each starting with
the space after the colon, so prompt + response is the original transcript).

`data.path`: a file or folder of `.jsonl`/`.jsonl.gz` (the released `train.jsonl.gz`,
`test.jsonl.gz`); `perl_core.data.hub` uses the same split for `Anthropic/hh-rlhf` by name.
"""
from __future__ import annotations

from typing import Any, Iterator

from perl_core.config import DataConfig
from perl_core.data.local import apply_column_map, files_of, read_objects, source_files
from perl_core.data.schema import Item, Record, Reject
from perl_core.errors import DataError

ASSISTANT = "\n\nAssistant:"


def split_transcripts(row: Any, file: str, index: int) -> dict:
    """{prompt, chosen, rejected} from one HH-RLHF row, or a DataError naming the field."""
    if not isinstance(row, dict):
        raise DataError(f"expected an object with 'chosen' and 'rejected' transcripts, got {type(row).__name__}",
                        file=file, row=index)
    parts = {}
    for name in ("chosen", "rejected"):
        text = row.get(name)
        if not isinstance(text, str):
            raise DataError("missing field (an HH-RLHF row needs 'chosen' and 'rejected' transcripts)" if text is None
                            else f"expected a transcript string, got {type(text).__name__}", file=file, row=index, field=name)
        cut = text.rfind(ASSISTANT)
        if cut < 0:
            raise DataError("transcript has no '\\n\\nAssistant:' turn", file=file, row=index, field=name)
        parts[name] = (text[: cut + len(ASSISTANT)], text[cut + len(ASSISTANT):])
    if parts["chosen"][0] != parts["rejected"][0]:
        raise DataError("the chosen and rejected transcripts differ before their final Assistant turn "
                        "(they must share the conversation and differ only in the last reply)",
                        file=file, row=index, field="rejected")
    extra = {k: v for k, v in row.items() if k not in ("chosen", "rejected")}
    return {**extra, "prompt": parts["chosen"][0], "chosen": parts["chosen"][1], "rejected": parts["rejected"][1]}


def read(data_cfg: DataConfig) -> Iterator[Item]:
    for path in files_of(data_cfg.path):
        for item in read_objects(path):
            if isinstance(item, Reject):
                item.view = "pairwise"
                yield item
                continue
            index, raw = item
            try:
                row = split_transcripts(apply_column_map(raw, data_cfg.column_map), str(path), index)
            except DataError as err:
                yield Reject.from_error(err, view="pairwise", raw=raw)
                continue
            yield Record(view="pairwise", row=row, file=str(path), index=index)


def describe(data_cfg: DataConfig) -> dict:
    return {"type": "hh-rlhf", "files": source_files(data_cfg.path)}
