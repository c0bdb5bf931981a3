"""Hugging Face Hub datasets by name, through `datasets.load_dataset`.

`data.path` is a hub name (`Anthropic/hh-rlhf`, `stanfordnlp/SHP`, `openai/summarize_from_feedback`)
or a local folder/file `load_dataset` understands (a mirror of one of them, or any JSON/CSV/Parquet
folder). `data.hub_config` is the dataset config (`comparisons` for summarize_from_feedback),
`data.hub_split` the split to read (default `train`; our own train/validation/test split follows).

Known datasets are recognised by the last part of the name and converted to our views:

* `hh-rlhf`: transcripts split into shared prompt + final replies (`perl_core.data.hh_rlhf`);
* `SHP`: `history` -> prompt, the preferred of `human_ref_A`/`human_ref_B` (`labels` = 1 when A) -> chosen;
* `summarize_from_feedback` (comparisons): the Reddit post -> prompt ending in "TL;DR:",
  `summaries[choice]` -> chosen, the other -> rejected.

Anything else goes through `data.column_map` + `data.format`, like local files.
With no network (`HF_HUB_OFFLINE=1`), only local folders and the local HF cache are reachable.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

from perl_core.config import DataConfig
from perl_core.data.hh_rlhf import split_transcripts
from perl_core.data.local import apply_column_map, infer_view
from perl_core.data.schema import Item, Record, Reject, check_view
from perl_core.errors import DataError, UserError


def _need(row: Any, names: tuple[str, ...], file: str, index: int) -> None:
    if not isinstance(row, dict):
        raise DataError(f"expected an object, got {type(row).__name__}", file=file, row=index)
    for name in names:
        if row.get(name) is None:
            raise DataError(f"missing field (this dataset's rows need {', '.join(names)})", file=file, row=index, field=name)


def shp_row(row: dict, file: str, index: int) -> dict:
    """stanfordnlp/SHP: `labels` is 1 when `human_ref_A` is preferred to `human_ref_B`."""
    _need(row, ("history", "human_ref_A", "human_ref_B", "labels"), file, index)
    if row["labels"] not in (0, 1):
        raise DataError(f"labels must be 0 or 1, got {row['labels']!r}", file=file, row=index, field="labels")
    a, b = row["human_ref_A"], row["human_ref_B"]
    chosen, rejected = (a, b) if row["labels"] == 1 else (b, a)
    return {"id": row.get("post_id"), "prompt": f"Human: {row['history']}\n\nAssistant:",
            "chosen": " " + str(chosen).strip(), "rejected": " " + str(rejected).strip()}


def summarize_row(row: dict, file: str, index: int) -> dict:
    """openai/summarize_from_feedback `comparisons`: two summaries of one post, `choice` the preferred."""
    _need(row, ("info", "summaries", "choice"), file, index)
    info, summaries, choice = row["info"], row["summaries"], row["choice"]
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise DataError("expected a list of two summaries", file=file, row=index, field="summaries")
    if choice not in (0, 1):
        raise DataError(f"choice must be 0 or 1, got {choice!r}", file=file, row=index, field="choice")
    if not isinstance(info, dict) or not (info.get("post") or info.get("article")):
        raise DataError("info needs a 'post' (or 'article') text", file=file, row=index, field="info")
    subreddit = f"SUBREDDIT: r/{info['subreddit']}\n" if info.get("subreddit") else ""
    title = f"TITLE: {info['title']}\n" if info.get("title") else ""
    body = info.get("post") or info.get("article")
    prompt = f"{subreddit}{title}POST: {body}\n\nTL;DR:"
    text = [" " + str(s.get("text", "") if isinstance(s, dict) else s).strip() for s in summaries]
    return {"id": info.get("id"), "prompt": prompt, "chosen": text[choice], "rejected": text[1 - choice]}


def hh_row(row: dict, file: str, index: int) -> dict:
    return split_transcripts(row, file, index)


# last part of the dataset name (lower case) -> (view, converter)
KNOWN: dict[str, tuple[str, Callable[[dict, str, int], dict]]] = {
    "hh-rlhf": ("pairwise", hh_row),
    "shp": ("pairwise", shp_row),
    "summarize_from_feedback": ("pairwise", summarize_row),
}


def known_converter(name: str):
    return KNOWN.get(Path(name.rstrip("/")).name.lower())


def load_hub_rows(data_cfg: DataConfig):
    if not data_cfg.path:
        raise UserError("the hub source needs --path (data.path): a dataset name such as Anthropic/hh-rlhf, or a local folder")
    import datasets

    split = data_cfg.hub_split or "train"
    try:
        return datasets.load_dataset(data_cfg.path, name=data_cfg.hub_config, split=split)
    except Exception as err:  # datasets raises many types (offline, missing config, bad split)
        raise UserError(f"data.path={data_cfg.path!r} (config {data_cfg.hub_config!r}, split {split!r}): "
                        f"datasets.load_dataset failed: {type(err).__name__}: {err}") from None


def read(data_cfg: DataConfig) -> Iterator[Item]:
    dataset = load_hub_rows(data_cfg)
    file = f"{data_cfg.path}:{data_cfg.hub_split or 'train'}"
    known = known_converter(data_cfg.path)
    view = check_view(data_cfg.format) if data_cfg.format else (known[0] if known else None)
    for index, raw in enumerate(dataset, start=1):
        row = apply_column_map(raw, data_cfg.column_map)
        if known and not data_cfg.column_map:
            try:
                row = known[1](row, file, index)
            except DataError as err:
                yield Reject.from_error(err, view=view, raw=str(raw)[:500])
                continue
        elif view is None:
            view = infer_view(row, file, index)
        yield Record(view=view, row=row, file=file, index=index)


def describe(data_cfg: DataConfig) -> dict:
    path = data_cfg.path or ""
    shown = Path(path).name if Path(path).exists() else path  # never an absolute local path in the card
    return {"type": "hub", "dataset": shown, "config": data_cfg.hub_config, "split": data_cfg.hub_split or "train",
            "format": data_cfg.format, "column_map": dict(sorted(data_cfg.column_map.items()))}
