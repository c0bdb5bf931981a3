"""The data card: what is in a prepared dataset, as JSON (machines) and Markdown (people).

Byte-deterministic on purpose (sorted keys, rounded floats, no timestamps, no absolute paths):
the embedded default must regenerate to the md5 committed in data.dvc.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from perl_core.data.schema import SPLITS
from perl_core.errors import DataError

CARD_JSON, CARD_MD = "card.json", "card.md"


def content_hash(dataset_dir: Path) -> str:
    """sha256 over every split file of the dataset (relative path + bytes), in sorted order."""
    h = hashlib.sha256()
    for path in sorted(Path(dataset_dir).glob("*/*.jsonl")):
        h.update(path.relative_to(dataset_dir).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731 - nearest-rank percentile
    return {"min": s[0], "p50": pick(0.5), "p95": pick(0.95), "max": s[-1], "mean": round(sum(s) / len(s), 2)}


def split_summary(view: str, rows: list[dict], count_tokens: Callable[[str], int]) -> dict:
    summary: dict = {"rows": len(rows), "prompts": len({r["prompt"] for r in rows})}
    summary["prompt_tokens"] = _stats([count_tokens(r["prompt"]) for r in rows])
    responses = ["chosen", "rejected"] if view == "pairwise" else ["response"]
    summary["response_tokens"] = _stats([count_tokens(r[k]) for r in rows for k in responses])
    if view == "pointwise":
        positive = sum(r["label"] for r in rows)
        summary["label_balance"] = {"positive": positive, "negative": len(rows) - positive,
                                    "positive_fraction": round(positive / len(rows), 4) if rows else 0.0}
    return summary


def write_card(dataset_dir: Path, card: dict) -> None:
    dataset_dir = Path(dataset_dir)
    (dataset_dir / CARD_JSON).write_text(json.dumps(card, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    (dataset_dir / CARD_MD).write_text(render_markdown(card))


def read_card(dataset_dir: Path) -> dict | None:
    path = Path(dataset_dir) / CARD_JSON
    if not path.exists():
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"not a readable data card ({err}); re-run `perl-rlhf data import`", file=str(path)) from None
    if not isinstance(card, dict) or not isinstance(card.get("views"), dict):
        raise DataError("not a data card (expected an object with 'views'); re-run `perl-rlhf data import`",
                        file=str(path))
    return card


def render_markdown(card: dict) -> str:
    lines = [f"# Data card: {card['name']}", "",
             f"- source: `{card['source']['type']}`",
             f"- content hash (sha256 of the split files): `{card['content_hash']}`",
             f"- split: seed {card['settings']['seed']}, fractions {card['settings']['splits']}, "
             f"grouped by {card['settings']['group_by']} (no prompt in two splits)",
             f"- length filter: max_tokens {card['settings']['max_tokens']} counted by {card['settings']['token_counter']}",
             ""]
    for key, value in sorted(card["source"].items()):
        if key != "type":
            lines.append(f"- source.{key}: `{json.dumps(value, sort_keys=True)}`")
    lines.append("")
    for view, info in sorted(card["views"].items()):
        lines += [f"## {view}", "",
                  f"read {info['read']}, rejected {info['rejected']}, duplicates dropped {info['duplicates']}, "
                  f"too long dropped {info['too_long']}, kept {info['kept']}", "",
                  "| split | rows | prompts | prompt tokens p50/p95/max | response tokens p50/p95/max | label + / - |",
                  "| --- | ---: | ---: | --- | --- | --- |"]
        for split in SPLITS:
            s = info["splits"].get(split)
            if not s:
                continue
            pt, rt = s["prompt_tokens"] or {}, s["response_tokens"] or {}
            fmt = lambda t: f"{t.get('p50', '-')}/{t.get('p95', '-')}/{t.get('max', '-')}"  # noqa: E731
            lb = s.get("label_balance")
            labels = f"{lb['positive']} / {lb['negative']}" if lb else "-"
            lines.append(f"| {split} | {s['rows']} | {s['prompts']} | {fmt(pt)} | {fmt(rt)} | {labels} |")
        lines.append("")
    if card.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in card["notes"]] + [""]
    return "\n".join(lines)
