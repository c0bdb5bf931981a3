"""Preparation: normalisation, dedupe, length filter, seeded split without leakage, card, determinism."""
import json

import pytest

from perl_core.config import load_config
from perl_core.data import corpus, load_prompts, load_rows, prepare_dataset
from perl_core.data.prepare import assign_splits, normalise_text, token_counter

SPLITS = ("train", "validation", "test")


def synthetic_cfg(tmp_path, *extra):
    return load_config("default", [f"data.data_dir={tmp_path}", "data.synthetic.n_prompts=120", *extra])


def test_normalise_text_keeps_the_prompt_response_seam():
    assert normalise_text("  Customer:\u00a0a\u200b  latte \r\nAgent: ", is_prompt=True) == "Customer: a latte\nAgent:"
    assert normalise_text("\t Sure!   One\u2003latte.  ", is_prompt=False) == " Sure! One latte."
    assert normalise_text("Cafe\u0301", is_prompt=False) == "Caf\u00e9"  # NFC
    assert normalise_text("no lead", is_prompt=False) == "no lead"


def test_dedupe_after_normalisation_and_counts(tmp_path):
    src = tmp_path / "rows.jsonl"
    rows = [{"prompt": "P\nAgent:", "response": " a", "label": 1},
            {"prompt": "P\nAgent:  ", "response": "   a ", "label": 1},  # same after normalisation
            {"prompt": "P\nAgent:", "response": " a", "label": 0},  # conflicting label: kept, counted
            {"prompt": "Q\nAgent:", "response": " b", "label": 0}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config("default", [f"data.data_dir={tmp_path / 'out'}", "data.source=local", "data.format=pointwise"])
    cfg.data.path = str(src)
    result = prepare_dataset(cfg)
    assert result.metrics["pointwise.duplicates"] == 1 and result.metrics["pointwise.kept"] == 3
    card = json.loads((tmp_path / "out" / "local" / "card.json").read_text())
    assert card["views"]["pointwise"]["conflicting_label_pairs"] == 1
    cfg.data.dedupe = False
    assert prepare_dataset(cfg).metrics["pointwise.kept"] == 4


def test_split_is_seeded_grouped_and_never_leaks(tmp_path):
    cfg = synthetic_cfg(tmp_path)
    prepare_dataset(cfg)
    prompts_by_split = {}
    for split in SPLITS:
        prompts = set()
        for view in ("pairwise", "pointwise", "sft"):
            rows = load_rows(cfg.data, view, split)
            assert rows, (view, split)
            prompts |= {r["prompt"] for r in rows}
        prompts_by_split[split] = prompts
    # a prompt (so every (prompt, response) pair) sits in one split, the same one in every view
    assert not prompts_by_split["train"] & prompts_by_split["validation"]
    assert not prompts_by_split["train"] & prompts_by_split["test"]
    assert not prompts_by_split["validation"] & prompts_by_split["test"]
    assert set(load_prompts(cfg.data, "test")) == prompts_by_split["test"]


def test_assign_splits_fractions_seed_and_tiny_data():
    keys = [f"prompt {i}" for i in range(2000)]
    fractions = {"train": 0.8, "validation": 0.1, "test": 0.1}
    a = assign_splits(keys, fractions, seed=0)
    assert a == assign_splits(list(reversed(keys)), fractions, seed=0)  # order does not matter
    assert a != assign_splits(keys, fractions, seed=1)
    counts = {s: sum(v == s for v in a.values()) for s in SPLITS}
    assert 1500 < counts["train"] < 1700 and 150 < counts["validation"] < 250 and 150 < counts["test"] < 250
    tiny = assign_splits(["a", "b", "c"], fractions, seed=0)  # every wanted split gets a group
    assert sorted(tiny.values()) == ["test", "train", "validation"]


def test_preparation_is_byte_deterministic_and_card_has_no_paths(tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    prepare_dataset(synthetic_cfg(first))
    prepare_dataset(synthetic_cfg(second))
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for rel in files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel
    card_text = (first / "synthetic" / "card.json").read_text() + (first / "synthetic" / "card.md").read_text()
    assert str(tmp_path) not in card_text


def test_card_counts_match_the_files(tmp_path):
    cfg = synthetic_cfg(tmp_path)
    prepare_dataset(cfg)
    card = json.loads((tmp_path / "synthetic" / "card.json").read_text())
    for view in ("pairwise", "pointwise", "sft"):
        info = card["views"][view]
        rows = {s: load_rows(cfg.data, view, s) for s in SPLITS}
        assert {s: info["splits"][s]["rows"] for s in SPLITS} == {s: len(r) for s, r in rows.items()}
        assert info["kept"] == sum(map(len, rows.values())) == info["read"] - info["rejected"] - info["duplicates"] - info["too_long"]
    test_rows = load_rows(cfg.data, "pointwise", "test")
    balance = card["views"]["pointwise"]["splits"]["test"]["label_balance"]
    assert balance["positive"] == sum(r["label"] for r in test_rows)
    assert "| train |" in (tmp_path / "synthetic" / "card.md").read_text()


def test_length_filter_counts_what_it_drops(tmp_path):
    cfg = synthetic_cfg(tmp_path, "data.max_tokens=60")
    _, count = token_counter(cfg.data)
    generated = load_config("default", ["data.synthetic.n_prompts=120"]).data.synthetic
    from perl_core.data.synthetic import generate

    sft = generate(generated)["sft"]
    expected_long = sum(count(r["prompt"]) + count(r["response"]) + 2 > 60 for r in sft)
    assert 0 < expected_long < len(sft)
    result = prepare_dataset(cfg)
    assert result.metrics["sft.too_long"] == expected_long
    card = json.loads((tmp_path / "synthetic" / "card.json").read_text())
    assert any("max_tokens=60" in n for n in card["notes"])


def test_synthetic_is_skipped_when_up_to_date(tmp_path):
    cfg = synthetic_cfg(tmp_path)
    assert prepare_dataset(cfg).metrics["skipped"] == 0
    assert prepare_dataset(cfg).metrics["skipped"] == 1
    (tmp_path / "synthetic" / "sft" / "test.jsonl").write_text("tampered\n")
    assert prepare_dataset(cfg).metrics["skipped"] == 0  # content hash no longer matches: regenerated
    assert load_rows(cfg.data, "sft", "test")[0]["prompt"].startswith("Customer:")


def test_corpus_is_train_text_only(tmp_path):
    cfg = synthetic_cfg(tmp_path)
    prepare_dataset(cfg)
    texts = set(corpus(cfg.data))
    assert {r["prompt"] for r in load_rows(cfg.data, "sft", "train")} <= texts
    assert not {r["prompt"] for r in load_rows(cfg.data, "sft", "test")} & texts


def test_every_registered_source_has_a_reader_and_no_reader_is_unregistered():
    """perl_core.config.DATA_SOURCES names the sources once; each has its reader module, and every module
    of perl_core.data that reads rows is registered."""
    from pathlib import Path

    from perl_core.config import DATA_SOURCES
    from perl_core.data.prepare import source_module

    readers = {name: source_module(name) for name in DATA_SOURCES}
    assert all(callable(module.read) and callable(module.describe) for module in readers.values())
    folder = Path(readers["synthetic"].__file__).parent
    with_read = {p.stem for p in folder.glob("*.py") if "\ndef read(" in p.read_text() and "\ndef describe(" in p.read_text()}
    assert with_read == {Path(module.__file__).stem for module in readers.values()}
