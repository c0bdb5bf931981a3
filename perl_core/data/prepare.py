"""Preparation: read a source, validate, normalise, dedupe, filter by length, split, write, card, version.

`prepare_dataset(cfg)` is the one entry point (`perl-rlhf data import` and the pipeline call it).
Output: `data_dir/<name>/<view>/{train,validation,test}.jsonl` + `card.json` + `card.md`
(+ `rejects.jsonl` with `on_error: skip`). Nothing is lost silently: every row read is either
written, or counted as rejected / duplicate / too long in the card.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import re
import shutil
import unicodedata
from pathlib import Path
from typing import Callable, Optional

from perl_core.artifacts import StageResult
from perl_core.config import DATA_SOURCES, DataConfig, PerlConfig
from perl_core.data import card as cards
from perl_core.data import versioning
from perl_core.data.schema import SPLITS, VIEWS, Collected, collect
from perl_core.errors import DataError, UserError

GROUP_BY = "prompt"
Step = Callable[[str], None]


# ---------------------------------------------------------------- normalisation
_SPACES = re.compile(r"[ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")
_INVISIBLE = re.compile(r"[\u200b\u200c\u200d\u2060\ufeff]")


def normalise_text(text: str, is_prompt: bool) -> str:
    """NFC, one kind of newline, runs of spaces collapsed, no invisible characters.

    The seam between prompt and response is kept: a prompt loses trailing spaces, a response
    keeps one leading space if it had leading whitespace (" Sure!" follows "Agent:").
    """
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _SPACES.sub(" ", _INVISIBLE.sub("", text))
    text = "\n".join(line.rstrip(" ") for line in text.split("\n"))
    if is_prompt:
        return text.lstrip().rstrip(" ")
    lead = " " if text[:1].isspace() else ""
    return lead + text.strip()


def normalise_row(view: str, row: dict) -> dict:
    out = dict(row)
    for name in VIEWS[view]:
        if name != "label":
            out[name] = normalise_text(row[name], is_prompt=name == "prompt")
    return out


# ---------------------------------------------------------------- length
_PROXY = re.compile(r"\w+|[^\w\s]")
PROXY_NAME = "proxy (words + punctuation marks, + 2 for bos/eos)"


def token_counter(data_cfg: DataConfig) -> tuple[str, Callable[[str], int]]:
    """`data.tokenizer` when set (the backbone's), else a deterministic proxy that needs no tokenizer."""
    if data_cfg.tokenizer:
        from perl_core.modeling import load_tokenizer

        tok = load_tokenizer(data_cfg.tokenizer)
        return f"tokenizer {Path(data_cfg.tokenizer).name} (+ 2 for bos/eos)", \
            lambda text: len(tok(text, add_special_tokens=False)["input_ids"])
    return PROXY_NAME, lambda text: len(_PROXY.findall(text))


def row_tokens(view: str, row: dict, count: Callable[[str], int]) -> int:
    responses = [row["chosen"], row["rejected"]] if view == "pairwise" else [row["response"]]
    return count(row["prompt"]) + max(count(r) for r in responses) + 2


# ---------------------------------------------------------------- split
def _unit(seed: int, key: str) -> float:
    return int(hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()[:15], 16) / 16**15


def assign_splits(keys: list[str], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Group key -> split, from a seeded hash of the key alone: the same prompt lands in the same
    split in every view and every run, whatever else is in the data. A wanted split left empty by
    chance (tiny data) takes the group whose hash lies nearest to its interval."""
    unique = sorted(set(keys))
    u = {k: _unit(seed, k) for k in unique}
    bounds, lo = {}, 0.0
    for s in SPLITS:
        bounds[s] = (lo, lo + fractions[s])
        lo += fractions[s]
    split_of = {k: next((s for s in SPLITS if u[k] < bounds[s][1]), SPLITS[-1]) for k in unique}
    wanted = [s for s in SPLITS if fractions[s] > 0]
    if len(unique) >= len(wanted):
        for s in wanted:
            sizes = {t: sum(1 for v in split_of.values() if v == t) for t in SPLITS}
            if sizes[s]:
                continue
            centre = sum(bounds[s]) / 2
            donor = min((k for k in unique if sizes[split_of[k]] > 1), key=lambda k: (abs(u[k] - centre), k))
            split_of[donor] = s
    return split_of


# ---------------------------------------------------------------- the stage
def source_module(name: str):
    """`data.source`'s reader: the module perl_core.data.<name, - as _> with `read(DataConfig) -> Iterator[Item]`
    and `describe(DataConfig) -> dict`. Imported when used, so a reader is the data stage's code alone."""
    if name not in DATA_SOURCES:  # the config refuses it first; a DataConfig built without validation lands here
        raise UserError(f"data.source: unknown source {name!r}; choose one of {sorted(DATA_SOURCES)}")
    return importlib.import_module(f"perl_core.data.{name.replace('-', '_')}")


def dataset_dir(data_cfg: DataConfig) -> Path:
    name = data_cfg.name or data_cfg.source
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"data.name: {name!r} must be a plain folder name (letters, digits, . _ -)")
    return Path(data_cfg.data_dir) / name


def fingerprint(data_cfg: DataConfig, description: dict) -> str:
    """What the prepared files depend on (the source and the preparation settings), hashed."""
    settings = data_cfg.model_dump(mode="json", include={"seed", "splits", "max_tokens", "tokenizer", "dedupe",
                                                         "format", "column_map", "hub_split", "hub_config"})
    return hashlib.sha256(json.dumps({"settings": settings, "source": description}, sort_keys=True).encode()).hexdigest()


def up_to_date(out: Path, fp: str) -> bool:
    try:
        card = cards.read_card(out)
    except DataError:  # a damaged card is simply out of date: the dataset is rebuilt
        return False
    return bool(card) and card.get("fingerprint") == fp and cards.content_hash(out) == card.get("content_hash")


def prepare_dataset(cfg: PerlConfig, force: bool = False, on_step: Optional[Step] = None) -> StageResult:
    """Import/generate, validate, split, card and (inside the tracked `data/`) version with DVC.

    The embedded default (`synthetic`) is skipped when already present and unchanged, then
    restored with `dvc pull` if possible, else regenerated byte-identically.
    """
    d = cfg.data
    step = on_step or (lambda msg: None)
    module = source_module(d.source)
    out = dataset_dir(d)
    repo = versioning.tracking_repo(d.data_dir)
    description = module.describe(d)
    fp = fingerprint(d, description)

    def in_sync() -> bool:
        return up_to_date(out, fp) and (repo is None or versioning.data_version(repo)["matches_working_copy"])

    if d.source == "synthetic" and not force:
        if in_sync():
            step(f"{out} is up to date")
            return _result(out, cards.read_card(out), repo, skipped=True)
        if repo is not None:
            step("trying `dvc pull`")
            if versioning.pull(repo) and in_sync():
                return _result(out, cards.read_card(out), repo, skipped=True)

    step(f"reading {d.source}")
    collected = collect(module.read(d), d.on_error)
    step("validating, deduplicating, filtering and splitting")
    card = build(out, d, collected, description, fp)
    result = _result(out, card, repo)
    if repo is not None:
        step("versioning data/ with DVC (dvc add + push)")
        versioning.commit_data(repo)
    return result


def build(out: Path, d: DataConfig, collected: Collected, description: dict, fp: str) -> dict:
    """Everything after validation; writes the split files, rejects and the card. Returns the card."""
    label, count = token_counter(d)
    fractions = d.splits.model_dump()
    views: dict[str, dict] = {}
    kept: dict[str, list[dict]] = {}
    notes: list[str] = []
    for view in sorted(VIEWS):
        rows = collected.rows.get(view, [])
        read = collected.read.get(view, 0)
        if not read:
            continue
        seen, unique, too_long = set(), [], 0
        for row in (normalise_row(view, r) for r in rows):
            key = tuple(row[f] for f in VIEWS[view])
            if key in seen and d.dedupe:
                continue
            seen.add(key)
            if row_tokens(view, row, count) > d.max_tokens:
                too_long += 1
                continue
            unique.append(row)
        duplicates = len(rows) - len(unique) - too_long
        rejected = read - len(rows)
        views[view] = {"read": read, "rejected": rejected, "duplicates": duplicates, "too_long": too_long,
                       "kept": len(unique)}
        if view == "pointwise":
            labels: dict[tuple, set] = {}
            for r in unique:
                labels.setdefault((r["prompt"], r["response"]), set()).add(r["label"])
            views[view]["conflicting_label_pairs"] = sum(len(v) > 1 for v in labels.values())
        if too_long:
            notes.append(f"{view}: {too_long} rows longer than data.max_tokens={d.max_tokens} ({label}) were dropped")
        if unique:
            kept[view] = unique
        elif read:
            notes.append(f"{view}: no rows left after validation and filtering")
    if not kept:
        total = {k: sum(v[k] for v in views.values()) for k in ("read", "rejected", "duplicates", "too_long")}
        raise DataError(
            f"empty dataset after filtering: read {total['read']} rows, rejected {total['rejected']}, "
            f"duplicates {total['duplicates']}, longer than data.max_tokens={d.max_tokens}: {total['too_long']} "
            f"(counted by {label}); raise data.max_tokens or check the source", file=str(d.path or d.source))

    if out.exists():
        shutil.rmtree(out)
    for view, rows in kept.items():
        split_of = assign_splits([r[GROUP_BY] for r in rows], fractions, d.seed)
        by_split = {s: [r for r in rows if split_of[r[GROUP_BY]] == s] for s in SPLITS}
        (out / view).mkdir(parents=True, exist_ok=True)
        views[view]["splits"] = {}
        for s in SPLITS:
            write_jsonl(out / view / f"{s}.jsonl", by_split[s])
            views[view]["splits"][s] = cards.split_summary(view, by_split[s], count)
    if collected.rejects:
        write_jsonl(out / "rejects.jsonl", [r.to_json() for r in collected.rejects])
        notes.append(f"{len(collected.rejects)} rejected rows (on_error: skip) are listed with reasons in rejects.jsonl")
    card = {
        "name": out.name,
        "source": description,
        "fingerprint": fp,
        "settings": {"seed": d.seed, "splits": fractions, "group_by": GROUP_BY, "max_tokens": d.max_tokens,
                     "dedupe": d.dedupe,
                     "token_counter": label, "on_error": d.on_error,
                     "normalisation": "unicode NFC, CRLF -> LF, runs of spaces -> one, invisible characters removed"},
        "views": views,
        "rejected": len(collected.rejects),
        "content_hash": cards.content_hash(out),
        "notes": notes,
    }
    cards.write_card(out, card)
    return card


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")


def _result(out: Path, card: dict, repo: Optional[Path], skipped: bool = False) -> StageResult:
    metrics: dict[str, float] = {"rejected": float(card.get("rejected", 0)), "skipped": float(skipped)}
    artifacts = {"dataset": out, "card": out / cards.CARD_JSON}
    for view, info in card["views"].items():
        for key in ("read", "rejected", "duplicates", "too_long", "kept"):
            metrics[f"{view}.{key}"] = float(info[key])
        for split, summary in info.get("splits", {}).items():
            metrics[f"{view}.{split}.rows"] = float(summary["rows"])
    if repo is not None:
        artifacts["data_dvc"] = repo / versioning.DVC_FILE
    return StageResult(out_dir=out, metrics=metrics, artifacts=artifacts)

