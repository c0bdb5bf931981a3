"""Local files (JSONL/JSON/CSV/Parquet + column_map) and every bad input with its message."""
import json
from pathlib import Path

import pytest

from perl_core.config import load_config
from perl_core.data import load_rows, prepare_dataset
from perl_core.errors import DataError, UserError

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def make_cfg(tmp_path, **data):
    cfg = load_config("default", [f"data.data_dir={tmp_path / 'out'}", "data.splits.train=0.5",
                                  "data.splits.validation=0.25", "data.splits.test=0.25"])
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def all_rows(cfg, view):
    return [r for s in ("train", "validation", "test") for r in load_rows(cfg.data, view, s)]


def test_jsonl_with_column_map(tmp_path):
    cfg = make_cfg(tmp_path, source="local", path=str(FIXTURES / "local" / "pairs.jsonl"), format="pairwise",
                   column_map={"question": "prompt", "good": "chosen", "bad": "rejected"})
    prepare_dataset(cfg)
    rows = all_rows(cfg, "pairwise")
    assert len(rows) == 4
    first = next(r for r in rows if "small mocha" in r["prompt"])
    assert first == {"prompt": "Customer: A small mocha, please.\nAgent:",
                     "chosen": " Sure! One small mocha. Anything else?", "rejected": " Whatever. A large latte."}


def test_csv_pointwise_labels_from_text(tmp_path):
    cfg = make_cfg(tmp_path, source="local", path=str(FIXTURES / "local" / "thumbs.csv"))  # format inferred
    prepare_dataset(cfg)
    rows = all_rows(cfg, "pointwise")
    assert sorted(r["label"] for r in rows) == [0, 0, 1, 1]
    assert " Of course, a medium latte, with commas." in {r["response"] for r in rows}


def test_json_array_sft(tmp_path):
    cfg = make_cfg(tmp_path, source="local", path=str(FIXTURES / "local" / "sft.json"), format="sft")
    prepare_dataset(cfg)
    assert {r["response"] for r in all_rows(cfg, "sft")} == {
        " Sure! One small mocha. Anything else?", " Of course! One medium latte.", " Certainly! One large americano."}


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"prompt": ["Q1\nAgent:", "Q2\nAgent:"], "response": [" a", " b"], "label": [1, 0]}), path)
    cfg = make_cfg(tmp_path, source="local", path=str(path), format="pointwise")
    prepare_dataset(cfg)
    assert sorted((r["prompt"], r["label"]) for r in all_rows(cfg, "pointwise")) == [("Q1\nAgent:", 1), ("Q2\nAgent:", 0)]


# ---------------------------------------------------------------- bad input, with its message
def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def line(**row):
    return json.dumps(row) + "\n"


GOOD = line(prompt="P\nAgent:", response=" r", label=1)


@pytest.mark.parametrize("name, text, fmt, expected", [
    ("missing.jsonl", GOOD + line(prompt="P2", label=0), "pointwise", r"row 2, field 'response': missing field"),
    ("type.jsonl", GOOD + line(prompt="P2", response=3, label=0), "pointwise", r"row 2, field 'response': expected text, got int"),
    ("empty.jsonl", "", "pointwise", r"empty file: no rows"),
    ("broken.jsonl", GOOD + '{"prompt": "P2", "response": \n', "pointwise", r"row 2: invalid JSON line"),
    ("label.jsonl", GOOD + line(prompt="P2", response=" r", label=2), "pointwise", r"row 2, field 'label': label must be 0 or 1"),
    ("label.csv", "prompt,response,label\nP,r,yes\n", "pointwise", r"row 1, field 'label': label must be 0 or 1 .*'yes'"),
    ("same.jsonl", line(prompt="P", chosen=" a", rejected=" a"), "pairwise", r"field 'rejected': chosen and rejected are the same"),
    ("blank.jsonl", line(prompt="  ", response=" r"), "sft", r"field 'prompt': empty text"),
])
def test_bad_rows_stop_with_file_row_and_field(tmp_path, name, text, fmt, expected):
    path = write(tmp_path, name, text)
    cfg = make_cfg(tmp_path, source="local", path=path, format=fmt)
    with pytest.raises(DataError, match=expected) as err:
        prepare_dataset(cfg)
    assert name in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_on_error_skip_writes_rejects_with_reasons(tmp_path):
    text = GOOD + line(prompt="P2", response=" s", label=1) + line(prompt="P3", label=0) + "not json\n" \
        + line(prompt="P4", response=" t", label=7)
    cfg = make_cfg(tmp_path, source="local", path=write(tmp_path, "mixed.jsonl", text), format="pointwise",
                   on_error="skip")
    result = prepare_dataset(cfg)
    rejects = [json.loads(x) for x in (tmp_path / "out" / "local" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["row"], r["field"]) for r in rejects] == [(3, "response"), (4, None), (5, "label")]
    assert "invalid JSON line" in rejects[1]["reason"]
    assert result.metrics["rejected"] == 3 and result.metrics["pointwise.kept"] == 2
    card = json.loads((tmp_path / "out" / "local" / "card.json").read_text())
    assert card["rejected"] == 3 and card["views"]["pointwise"]["read"] == 5


def test_empty_dataset_after_filtering_is_an_error(tmp_path):
    cfg = make_cfg(tmp_path, source="local", path=write(tmp_path, "long.jsonl", line(prompt="word " * 30, response=" r", label=1)),
                   format="pointwise", max_tokens=10)
    with pytest.raises(DataError, match=r"empty dataset after filtering: .*longer than data.max_tokens=10: 1"):
        prepare_dataset(cfg)


def test_unknown_columns_without_format_say_how_to_map(tmp_path):
    cfg = make_cfg(tmp_path, source="local", path=write(tmp_path, "odd.jsonl", line(q="x", a="y")))
    with pytest.raises(DataError, match=r"set data.format .* data.column_map"):
        prepare_dataset(cfg)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(UserError, match=r"data.path: .*nope.jsonl does not exist"):
        prepare_dataset(make_cfg(tmp_path, source="local", path=str(tmp_path / "nope.jsonl"), format="sft"))


def test_load_rows_before_import_says_what_to_run(tmp_path):
    cfg = make_cfg(tmp_path)
    with pytest.raises(DataError, match=r"run `perl-rlhf data import synthetic`"):
        load_rows(cfg.data, "pairwise", "train")
