"""Bad inputs through the `perl-rlhf` command line: one clear line naming the file, row or line and
field, exit status 2, never a traceback; with `--on-error skip` the bad row goes to rejects.jsonl
and the good rows are imported."""
import gzip
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app


@pytest.fixture(autouse=True)
def wide_consoles(monkeypatch):
    """Rich wraps at 80 columns, inside paths too; the messages are asserted whole."""
    from flows import cli_common, cli_data, cli_pipeline

    for console in (cli_common.console, cli_data.out, cli_pipeline.out):
        monkeypatch.setattr(console, "width", 1000)


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result, " ".join(result.output.split())


def refused(*args) -> str:
    """The command's one-line message, after checking it stopped cleanly (exit 2, no exception)."""
    result, text = invoke(*args)
    assert result.exit_code == 2, (result.exit_code, text, result.exception)
    assert isinstance(result.exception, SystemExit)  # friendly_errors' exit, not an escaped exception
    assert "Traceback" not in text and "error:" in text
    return text[text.index("error:"):]


def pointwise(prompt, response=" ok", label=1) -> bytes:
    return json.dumps({"prompt": prompt, "response": response, "label": label}).encode() + b"\n"


def import_local(tmp_path, path, *extra):
    return ("data", "import", "local", "--path", path, "--format", "pointwise",
            "--set", f"data.data_dir={tmp_path / 'data'}", *extra)


def imported(tmp_path) -> list[dict]:
    folder = tmp_path / "data" / "local" / "pointwise"
    return [json.loads(line) for s in ("train", "validation", "test")
            for line in (folder / f"{s}.jsonl").read_text().splitlines()]


def rejects(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "data" / "local" / "rejects.jsonl").read_text().splitlines()]


GOOD_ROWS = [pointwise(f"Customer {i}: a latte.\nAgent:", label=i % 2) for i in range(4)]


# ---------------------------------------------------------------- bytes that are not UTF-8
def test_jsonl_with_bytes_that_are_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    latin1 = '{"prompt": "Un caf\xe9, s\'il vous pla\xeet", "response": " Oui", "label": 1}\n'.encode("latin-1")
    path.write_bytes(GOOD_ROWS[0] + latin1 + b"".join(GOOD_ROWS[1:]))
    text = refused(*import_local(tmp_path, path))
    assert "latin1.jsonl, row 2: not UTF-8: byte 0xe9" in text and "save the file as UTF-8" in text

    result, text = invoke(*import_local(tmp_path, path, "--on-error", "skip"))
    assert result.exit_code == 0, text
    assert [(r["row"], r["reason"][:21]) for r in rejects(tmp_path)] == [(2, "not UTF-8: byte 0xe9 ")]
    assert sorted(r["prompt"] for r in imported(tmp_path)) == [f"Customer {i}: a latte.\nAgent:" for i in range(4)]


@pytest.mark.parametrize("bad_row, reason", [
    (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}\n", "nested too deeply to decode"),  # RecursionError
    (b'{"prompt": "P", "response": " r", "label": ' + b"9" * 5000 + b"}\n", "cannot be decoded: ValueError"),
])
def test_a_row_the_json_decoder_cannot_read_is_that_rows_reject(tmp_path, bad_row, reason):
    """Whatever the decoder raises (not only JSONDecodeError), the row is one reject: a line naming
    file and row in the default mode, one entry of rejects.jsonl with --on-error skip."""
    path = tmp_path / "deep.jsonl"
    path.write_bytes(GOOD_ROWS[0] + bad_row + b"".join(GOOD_ROWS[1:]))
    text = refused(*import_local(tmp_path, path))
    assert f"deep.jsonl, row 2: invalid JSON line: {reason}" in text

    result, text = invoke(*import_local(tmp_path, path, "--on-error", "skip"))
    assert result.exit_code == 0, text
    assert [(r["row"], reason in r["reason"]) for r in rejects(tmp_path)] == [(2, True)]
    assert sorted(r["prompt"] for r in imported(tmp_path)) == [f"Customer {i}: a latte.\nAgent:" for i in range(4)]


def test_a_json_file_nested_too_deeply_is_refused_by_name(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" + "[" * 5000 + "]" * 5000 + "]")
    assert "deep.json: invalid JSON: nested too deeply to decode" in refused(*import_local(tmp_path, path))


def test_csv_with_bytes_that_are_not_utf8_names_row_line_and_field(tmp_path):
    path = tmp_path / "thumbs.csv"
    path.write_bytes(b"prompt,response,label\n" + b"A latte.,Sure,1\n" + b"Un caf\xe9.,Oui,0\n"
                     + b"A mocha.,Sure,0\n" + b"A tea.,Sure,1\n")
    text = refused(*import_local(tmp_path, path))
    assert "thumbs.csv, row 2, field 'prompt': not UTF-8: byte 0xe9 at character 7 of line 3" in text

    result, text = invoke(*import_local(tmp_path, path, "--on-error", "skip"))
    assert result.exit_code == 0, text
    (reject,) = rejects(tmp_path)
    assert (reject["row"], reject["field"], reject["raw"]["prompt"]) == (2, "prompt", "Un caf\ufffd.")
    assert sorted(r["prompt"] for r in imported(tmp_path)) == ["A latte.", "A mocha.", "A tea."]


def test_csv_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt,response,label\r\nA latte.,Sure,1\r\nA mocha.,Sure,0\r\n")
    result, text = invoke(*import_local(tmp_path, path))
    assert result.exit_code == 0, text
    assert sorted((r["prompt"], r["label"]) for r in imported(tmp_path)) == [("A latte.", 1), ("A mocha.", 0)]


# ---------------------------------------------------------------- truncated or corrupt .jsonl.gz
def test_truncated_jsonl_gz(tmp_path):
    rows = [pointwise(f"Customer {i}: a latte.\nAgent:", label=i % 2) for i in range(400)]
    whole = gzip.compress(b"".join(rows))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with gzip.open(path, "rt") as f:  # what the first half still holds, read the way the reader reads
        readable = 0
        try:
            for _ in f:
                readable += 1
        except EOFError:
            pass
    assert 0 < readable < 400

    text = refused(*import_local(tmp_path, path))
    assert f"cut.jsonl.gz: truncated or corrupt gzip file after line {readable}" in text and "EOFError" in text

    result, text = invoke(*import_local(tmp_path, path, "--on-error", "skip"))
    assert result.exit_code == 0, text
    assert [r["row"] for r in rejects(tmp_path)] == [None]
    assert len(imported(tmp_path)) == readable


def test_a_file_that_is_not_gzip(tmp_path):
    path = tmp_path / "plain.jsonl.gz"
    path.write_bytes(b"".join(GOOD_ROWS))
    assert "plain.jsonl.gz: not a gzip file" in refused(*import_local(tmp_path, path))


# ---------------------------------------------------------------- prepared data damaged after import
def test_damaged_split_file_names_line_and_field(tmp_path):
    split = tmp_path / "data" / "synthetic" / "sft"
    split.mkdir(parents=True)
    (split / "train.jsonl").write_text('{"prompt": "A latte.", "response": " Sure"}\n{"prompt": "A mocha."}\n')
    text = refused("sft", "train", "--set", f"data.data_dir={tmp_path / 'data'}", "--set", f"artifacts_dir={tmp_path}")
    assert "sft/train.jsonl, row 2, field 'response': missing or not text" in text
    assert "perl-rlhf data import synthetic" in text

    (split / "train.jsonl").write_text('{"prompt": "A latte.", "response": " Sure"}\n{"prompt": "A mo\n')
    text = refused("sft", "train", "--set", f"data.data_dir={tmp_path / 'data'}", "--set", f"artifacts_dir={tmp_path}")
    assert "sft/train.jsonl, row 2: invalid JSON line" in text


def test_damaged_data_card_in_status(tmp_path):
    (tmp_path / "data" / "mine").mkdir(parents=True)
    (tmp_path / "data" / "mine" / "card.json").write_text("{")
    result, text = invoke("data", "status", "--repo", tmp_path)
    assert result.exit_code == 0 and "Traceback" not in text
    assert f"mine: file {tmp_path / 'data' / 'mine' / 'card.json'}: not a readable data card" in text


# ---------------------------------------------------------------- model folders
def fake_artifact(folder: Path, kind="reward_model", weights=True, manifest=None) -> Path:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(manifest or {"kind": kind, "base_model": "x"}))
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "config.json").write_text("{}")
    if weights:
        (folder / "model.safetensors").write_bytes(b"")
    return folder


@pytest.mark.parametrize("case, expected", [
    ("missing", "{d} does not exist"),
    ("file", "{d} is a file, not an artifact folder"),
    ("no manifest", "{d} is not a PERL artifact: manifest.json is missing"),
    ("corrupt manifest", "{d}/manifest.json is damaged (Expecting"),
    ("manifest not an object", "{d}/manifest.json: expected a JSON object with 'kind', got list"),
    ("wrong kind", "{d}/manifest.json: expected a reward_model or reward_ensemble artifact, found kind='anchor'"),
    ("no weights", "{d} is not a complete reward_model artifact: no *.safetensors weights"),
    ("no tokenizer", "{d} is not a complete reward_model artifact: tokenizer_config.json (the tokenizer) is missing"),
    ("corrupt config", "{d}/config.json is damaged"),
    ("adapter without its base", "{d}/manifest.json: the adapter's base model /nowhere/anchor is missing"),
])
def test_bad_reward_model_folders(tmp_path, case, expected):
    d = tmp_path / "rm"
    if case == "file":
        d.write_text("x")
    elif case == "no manifest":
        d.mkdir()
    elif case == "corrupt manifest":
        fake_artifact(d)
        (d / "manifest.json").write_text("{")
    elif case == "manifest not an object":
        fake_artifact(d)
        (d / "manifest.json").write_text("[]")
    elif case == "wrong kind":
        fake_artifact(d, kind="anchor")
    elif case == "no weights":
        fake_artifact(d, weights=False)
    elif case == "no tokenizer":
        fake_artifact(d)
        (d / "tokenizer_config.json").unlink()
    elif case == "corrupt config":
        fake_artifact(d)
        (d / "config.json").write_text("{")
    elif case == "adapter without its base":
        fake_artifact(d, manifest={"kind": "reward_model", "base_model": "/nowhere/anchor"})
        (d / "adapter_config.json").write_text("{}")
    message = expected.format(d=d)
    assert message in refused("reward", "score", "--model", d, "--prompt", "A latte.", "--response", " Sure")
    assert message in refused("eval", "reward", "--model", d, "--set", f"artifacts_dir={tmp_path}")


def test_policy_commands_check_their_folders(tmp_path):
    anchor, rm = fake_artifact(tmp_path / "anchor", kind="anchor"), fake_artifact(tmp_path / "rm")
    text = refused("policy", "train", "--anchor", rm, "--reward-model", rm, "--set", f"artifacts_dir={tmp_path}")
    assert f"{rm}/manifest.json: expected an anchor artifact, found kind='reward_model'" in text
    text = refused("policy", "generate", "--model", rm, "--prompt", "A latte.")
    assert "expected an anchor or policy artifact, found kind='reward_model'" in text
    text = refused("eval", "policy", "--policy", tmp_path / "nope", "--anchor", anchor, "--reward-model", rm)
    assert f"{tmp_path / 'nope'} does not exist" in text


def test_input_files_of_score_and_generate(tmp_path):
    rm, anchor = fake_artifact(tmp_path / "rm"), fake_artifact(tmp_path / "anchor", kind="anchor")
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'{"prompt": "A latte.", "response": " Sure"}\n{"prompt": "Un caf\xe9", "response": " Oui"}\n')
    assert "rows.jsonl, row 2: not UTF-8: byte 0xe9" in refused("reward", "score", "--model", rm, "--jsonl", rows)
    assert f"--jsonl {tmp_path} is a folder, not a file" in refused("reward", "score", "--model", rm, "--jsonl", tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"A latte.\nUn caf\xe9\n")
    assert "prompts.txt: not UTF-8: byte 0xe9 on line 2" in refused("policy", "generate", "--model", anchor,
                                                                    "--prompts", prompts)
    assert f"--prompts {tmp_path} is a folder" in refused("policy", "generate", "--model", anchor, "--prompts", tmp_path)


# ---------------------------------------------------------------- config and registry
def test_config_path_that_is_a_folder_or_not_utf8(tmp_path):
    assert f"config file {tmp_path} is a folder, not a YAML file" in refused("sft", "train", "--config", tmp_path)
    bad = tmp_path / "mine.yaml"
    bad.write_bytes(b"sft:\n  max_length: 64 # caf\xe9\n")
    assert f"{bad}: not valid YAML" in refused("sft", "train", "--config", bad)


def test_registry_commands_on_unknown_versions(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    text = refused("registry", "promote", "99")
    assert "model registry at sqlite:///mlflow.db: Model Version (name=perl-policy, version=99) not found" in text
    (tmp_path / "broken.db").write_text("not a database")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri exports it
    text = refused("registry", "list", "--set", "tracking.tracking_uri=sqlite:///broken.db")
    assert "MLflow store sqlite:///broken.db cannot be read" in text


def test_efficiency_report_resume_names_a_damaged_saved_part(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "reward_efficiency.json").write_text('{"settings": {"lora": ')  # killed while writing it
    text = refused("report", "efficiency", "--resume", "--saved-only", "--out", out, "--config", "tiny",
                   "--set", f"data.data_dir={tmp_path / 'data'}", "--set", f"artifacts_dir={tmp_path / 'artifacts'}")
    assert f"{out / 'reward_efficiency.json'} is damaged" in text and "delete it" in text


def test_an_unknown_data_source_is_refused_with_the_registered_ones(tmp_path):
    from perl_core.config import DATA_SOURCES

    expected = "'synthetic', 'taskmaster4', 'hh-rlhf', 'hub' or 'local'"
    assert refused("data", "import", "bogus") == f"error: SOURCE 'bogus': Input should be {expected}"
    assert f"Input should be {expected}" in refused("sft", "train", "--set", "data.source=bogus")
    assert list(DATA_SOURCES) == ["synthetic", "taskmaster4", "hh-rlhf", "hub", "local"]
