"""Source adapters on small hand-written fixtures in each source's real format."""
import json
from pathlib import Path

import pytest

from perl_core.config import load_config
from perl_core.data import load_rows, prepare_dataset
from perl_core.data import taskmaster4 as tm4
from perl_core.data.hh_rlhf import split_transcripts
from perl_core.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def make_cfg(tmp_path, source, path, *extra):
    cfg = load_config("default", [f"data.data_dir={tmp_path}", f"data.source={source}", *extra])
    cfg.data.path = str(path)
    return cfg


def all_rows(cfg, view):
    return [r for s in ("train", "validation", "test") for r in load_rows(cfg.data, view, s)]


def test_hh_rlhf_splits_shared_prompt_and_final_replies(tmp_path):
    cfg = make_cfg(tmp_path, "hh-rlhf", FIXTURES / "hh-rlhf")
    prepare_dataset(cfg)
    rows = {r["chosen"]: r for r in all_rows(cfg, "pairwise")}
    assert len(rows) == 3
    multi = rows[" One iced coffee coming up."]
    # multi-turn history kept whole; prompt + reply is the original transcript (minus the leading newlines)
    assert multi["prompt"] == "Human: I want a coffee.\n\nAssistant: Hot or iced?\n\nHuman: Iced, please.\n\nAssistant:"
    assert multi["rejected"] == " Make it yourself."
    original = json.loads((FIXTURES / "hh-rlhf" / "train.jsonl").read_text().splitlines()[1])
    assert "\n\n" + multi["prompt"] + multi["chosen"] == original["chosen"]


def test_hh_rlhf_rejects_transcripts_that_do_not_share_a_prompt():
    row = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: x\n\nAssistant: b"}
    with pytest.raises(DataError, match=r"f.jsonl, row 4, field 'rejected': .*differ before their final Assistant"):
        split_transcripts(row, "f.jsonl", 4)
    with pytest.raises(DataError, match=r"field 'chosen': transcript has no"):
        split_transcripts({"chosen": "no turns", "rejected": "\n\nAssistant: b"}, "f.jsonl", 1)


def test_taskmaster4_reward_rows_and_dialog_rows(tmp_path):
    cfg = make_cfg(tmp_path, "taskmaster4", FIXTURES / "taskmaster4", "data.max_tokens=1536")
    result = prepare_dataset(cfg)
    # 3 reward rows read, one exact duplicate (same context, generation, reward) merged and counted
    assert result.metrics["pointwise.read"] == 3 and result.metrics["pointwise.duplicates"] == 1
    pointwise = {r["id"]: r for r in all_rows(cfg, "pointwise")}
    assert pointwise["dlg-r1"]["prompt"] == (
        "Agent: Welcome to the Coffee Bar. What can I get for you?\nUser: Can I get a decaf cortado?\nAgent:")
    assert pointwise["dlg-r1"]["response"] == ' CALL get_menu_items {"query": "Cortado"}'
    assert pointwise["dlg-r1"]["label"] == 1 and pointwise["dlg-r1"]["kind"] == "api"
    no = pointwise["dlg-r2"]
    assert no["label"] == 0 and no["response"] == " Sorry, we have no coffee."
    assert 'API: get_menu_items -> {"items": [{"menu_item_id": "cortado-0004", "name": "Cortado"}]}' in no["prompt"]
    # dialogs: every agent action is a target: d1 has an API call + 2 replies, d2 one reply
    sft = {r["id"]: r for r in all_rows(cfg, "sft")}
    assert sorted(sft) == ["dlg-d1#1", "dlg-d1#3", "dlg-d1#5", "dlg-d2#1"]
    assert sft["dlg-d1#1"]["prompt"] == "User: I'd like a mocha, please.\nAgent:"
    assert sft["dlg-d1#1"]["response"] == ' CALL get_menu_items {"query": "Mocha"}'
    # the malformed JSON response in the source is kept verbatim, not dropped
    assert sft["dlg-d1#3"]["prompt"].endswith(
        'API: get_menu_items -> {"menu_items":[{"menu_item_id":""mocha-3095"","name":"Mocha"}]}\nAgent:')
    assert sft["dlg-d1#3"]["response"] == " One mocha. Please check the screen."
    assert sft["dlg-d2#1"]["response"] == " Yes, we have chai."  # a newline inside a turn stays on one line


def test_taskmaster4_bad_reward_row_names_file_row_field(tmp_path):
    (tmp_path / "tm" / "reward").mkdir(parents=True)
    bad = [{"conversation_id": "x", "context": "[not json", "generation": "{}", "reward": 1.0}]
    (tmp_path / "tm" / "reward" / "reward_00.json").write_text(json.dumps(bad))
    cfg = make_cfg(tmp_path / "out", "taskmaster4", tmp_path / "tm")
    with pytest.raises(DataError, match=r"reward_00.json, row 1, field 'context': cannot read it"):
        prepare_dataset(cfg)


def test_render_matches_between_reward_and_dialogs():
    turns = tm4.dialog_turns([
        {"index": 0, "speaker": "user", "text": "Latte", "annotations": [
            {"name": "api_call", "value": "get_menu_items", "context": "api_call_0"},
            {"name": "request", "value": '{"query":"Latte"}', "context": "api_call_0"},
            {"name": "api_response", "value": "get_menu_items", "context": "api_response_0"},
            {"name": "response", "value": '{"ok":true}', "context": "api_response_0"}]}])
    reward_style = [{"role": "user", "text": "Latte"}, {"role": "agent", "api": {"get_menu_items": {"query": "Latte"}}},
                    {"role": "api", "response": {"get_menu_items": {"ok": True}}}]
    assert tm4.render_prompt(turns) == tm4.render_prompt(reward_style)


def test_hub_shp_by_name(tmp_path):
    cfg = make_cfg(tmp_path, "hub", FIXTURES / "hub" / "stanfordnlp" / "SHP")
    prepare_dataset(cfg)
    rows = {r["id"]: r for r in all_rows(cfg, "pairwise")}
    assert rows["p1"]["chosen"] == " About two minutes at 80 C." and rows["p1"]["rejected"] == " An hour."
    assert rows["p2"]["chosen"] == " Yes, cold extraction pulls fewer acids."  # labels=0: B preferred
    assert rows["p2"]["prompt"] == "Human: Is cold brew less acidic?\n\nAssistant:"


def test_hub_summarize_from_feedback_comparisons(tmp_path):
    cfg = make_cfg(tmp_path, "hub", FIXTURES / "hub" / "openai" / "summarize_from_feedback")
    prepare_dataset(cfg)
    rows = {r["id"]: r for r in all_rows(cfg, "pairwise")}
    assert rows["t3_a"]["chosen"] == " Spilled coffee on laptop, borrowed one."
    assert rows["t3_b"]["chosen"] == " Roommate drinks my milk and never replaces it."
    assert rows["t3_b"]["prompt"] == ("SUBREDDIT: r/relationships\nTITLE: Milk thief\n"
                                      "POST: My roommate drinks all the milk and never buys more.\n\nTL;DR:")


def test_hub_hh_rlhf_mirror_uses_the_transcript_split(tmp_path):
    cfg = make_cfg(tmp_path, "hub", FIXTURES / "hh-rlhf")
    prepare_dataset(cfg)
    assert " Make it yourself." in {r["rejected"] for r in all_rows(cfg, "pairwise")}
    card = (tmp_path / "hub" / "card.json").read_text()
    assert str(FIXTURES) not in card


def test_hub_unreachable_dataset_is_a_clear_error(tmp_path):
    from perl_core.errors import UserError

    cfg = make_cfg(tmp_path, "hub", "nobody/no-such-dataset-xyz")
    with pytest.raises(UserError, match=r"data.path='nobody/no-such-dataset-xyz'.*load_dataset failed"):
        prepare_dataset(cfg)
