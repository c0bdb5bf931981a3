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


# ---------------------------------------------------------------- encodings and damaged files
def test_byte_order_marks_are_not_part_of_the_data(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(bom + GOOD.encode())
    (tmp_path / "in" / "b.json").write_bytes(bom + json.dumps([{"prompt": "Q\nAgent:", "response": " s", "label": 0}]).encode())
    (tmp_path / "in" / "c.csv").write_bytes(bom + b"prompt,response,label\nR,t,1\n")
    cfg = make_cfg(tmp_path, source="local", path=str(tmp_path / "in"), format="pointwise")
    prepare_dataset(cfg)
    assert sorted(r["prompt"] for r in all_rows(cfg, "pointwise")) == ["P\nAgent:", "Q\nAgent:", "R"]


@pytest.mark.parametrize("name, data, expected", [
    ("array.json", b'[\n{"prompt": "P", "response": " r", "label": 1},\n{"prompt": "caf\xe9"}\n]',
     r"array.json: not UTF-8: byte 0xe9 on line 3 \(save the file as UTF-8\)"),
    ("rows.parquet", b"PAR1 this is not parquet", r"rows.parquet: not a readable Parquet file"),
    ("header.csv", b"pr\xf6mpt,response,label\nP,r,1\n", r"header.csv: header: not UTF-8: byte 0xf6 at character 3 of line 1"),
])
def test_unreadable_files_are_named(tmp_path, name, data, expected):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError, match=expected):
        prepare_dataset(make_cfg(tmp_path, source="local", path=str(tmp_path / name), format="pointwise"))


def test_unpaired_surrogate_escapes_are_rejected_and_the_rejects_file_is_still_utf8(tmp_path):
    text = GOOD + '{"prompt": "Q\\ud83d", "response": " s", "label": 0}\n' \
        + '{"prompt": "R", "response": " t", "label": 1, "note": "x\\udc80"}\n' + line(prompt="S", response=" u", label=0)
    cfg = make_cfg(tmp_path, source="local", path=write(tmp_path, "escapes.jsonl", text), format="pointwise",
                   on_error="skip")
    prepare_dataset(cfg)
    rejects = [json.loads(x) for x in (tmp_path / "out" / "local" / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["row"], r["field"], r["reason"][:45]) for r in rejects] == [
        (2, "prompt", "not valid Unicode: unpaired surrogate U+D83D "), (3, "note", "not valid Unicode: unpaired surrogate U+DC80 ")]
    assert rejects[0]["raw"]["prompt"] == "Q\ufffd"
    assert sorted(r["prompt"] for r in all_rows(cfg, "pointwise")) == ["P\nAgent:", "S"]


def test_csv_row_the_csv_module_cannot_read(tmp_path):
    text = "prompt,response,label\nP,r,1\nQ," + "x" * 140_000 + ",0\nR,t,0\n"
    path = write(tmp_path, "huge.csv", text)
    with pytest.raises(DataError, match=r"huge.csv, row 2: unreadable CSV row: field larger than field limit"):
        prepare_dataset(make_cfg(tmp_path, source="local", path=path, format="pointwise"))
    cfg = make_cfg(tmp_path, source="local", path=path, format="pointwise", on_error="skip")
    assert prepare_dataset(cfg).metrics["rejected"] == 1
    assert sorted(r["prompt"] for r in all_rows(cfg, "pointwise")) == ["P", "R"]
