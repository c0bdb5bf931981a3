"""policy.rewards: the reward model and programmatic rewards, weighted, logged per term; broken functions named."""
import json
import math

import pytest
import torch

from perl_core.callbacks import collect
from perl_core.config import ConfigError, RewardTerm, build_config
from perl_core.data.synthetic import gold_score
from perl_core.data.taskmaster4 import render_action
from perl_core.errors import UserError
from perl_core.policy.rewards import (combine, ends_turn, function_rewards, gold_rubric, length_penalty,
                                      parse_api_calls, resolve, valid_api_call)
from perl_core.policy.rl import rl_loop
from test_rl import PROMPTS, dirs, policy_cfg, roles_for  # noqa: F401 - dirs is a fixture

SEEN: list = []


# functions the tests name as `test_rewards:...`
def response_chars(prompts, responses, rows, scale=1.0):
    SEEN.append(rows)
    return [scale * len(r) for r in responses]


def breaks_on_latte(prompts, responses, rows):
    return [1.0 / ("latte" not in p) for p in prompts]


def one_short(prompts, responses, rows):
    return [0.0] * (len(responses) - 1)


def nan_on_second(prompts, responses, rows):
    return [float("nan") if i == 1 else 0.0 for i in range(len(responses))]


def test_terms_combine_with_their_weights():
    terms = [RewardTerm(weight=0.5), RewardTerm(function="m:f", weight=2.0)]
    total = combine([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])], terms)
    assert total.tolist() == [0.5 * 1 + 2 * 3, 0.5 * 2 + 2 * 4]
    alone = torch.tensor([0.25, -1.0])
    assert combine([alone], [RewardTerm()]) is alone  # the default adds nothing, not even a multiplication


def test_each_term_is_logged_and_the_sum_is_the_reward(dirs):
    cfg = policy_cfg(rewards=[{"weight": 0.5}, {"function": "test_rewards:response_chars", "weight": 2.0,
                                                "kwargs": {"scale": 0.1}, "name": "chars"}],
                     log_samples_every=1, train={"batch_size": 3, "max_steps": 2})
    roles = roles_for(dirs, cfg)
    metrics, tables = [], []
    rows = {p: {"prompt": p, "tag": i} for i, p in enumerate(PROMPTS)}
    SEEN.clear()
    rl_loop(roles, roles.tokenizer, PROMPTS, cfg, callback=collect(metrics), prompt_rows=rows,
            samples_callback=lambda table, step: tables.append(table))
    for (_, m), table in zip(metrics, tables):
        assert m["rl/reward/chars"] == pytest.approx(sum(0.1 * len(r["response"]) for r in table) / len(table))
        assert m["rl/reward/reward_model"] == pytest.approx(sum(r["reward/reward_model"] for r in table) / len(table))
        assert m["rl/reward"] == pytest.approx(0.5 * m["rl/reward/reward_model"] + 2.0 * m["rl/reward/chars"])
        for r in table:
            assert r["reward"] == pytest.approx(0.5 * r["reward/reward_model"] + 2 * r["reward/chars"], abs=1e-5)
    # each function row is its prompt's data row with `finished` added
    for batch in SEEN:
        assert all(set(row) == {"prompt", "tag", "finished"} and row["tag"] == PROMPTS.index(row["prompt"])
                   for row in batch)


def test_without_the_reward_model_in_the_list_it_never_scores(dirs):
    cfg = policy_cfg(algorithm="grpo", rewards=[{"function": "perl_core.policy.rewards:length_penalty",
                                                 "kwargs": {"max_words": 1, "per_word": 1.0}}],
                     train={"batch_size": 3, "max_steps": 2})
    roles = roles_for(dirs, cfg)
    roles.reward_and_spread = lambda *a: pytest.fail("the reward model scored")
    metrics = []
    rl_loop(roles, roles.tokenizer, PROMPTS, cfg, callback=collect(metrics))
    assert all(m["rl/reward"] == m["rl/reward/length_penalty"] <= 0 for _, m in metrics)


@pytest.mark.parametrize("function, message", [
    ("breaks_on_latte", r"test_rewards:breaks_on_latte raised ZeroDivisionError: .* on response \d+ \(prompt "
                        r"'Customer: a small latte"),
    ("one_short", r"test_rewards:one_short returned 5 values for 6 responses"),
    ("nan_on_second", r"test_rewards:nan_on_second returned nan for response 1 \(prompt"),
])
def test_a_broken_reward_function_stops_the_run_naming_it_and_the_row(dirs, function, message):
    cfg = policy_cfg(rewards=[{"function": f"test_rewards:{function}"}], train={"batch_size": 3, "max_steps": 1})
    roles = roles_for(dirs, cfg)
    with pytest.raises(UserError, match=message):
        rl_loop(roles, roles.tokenizer, PROMPTS[:3], cfg)


def test_an_unimportable_function_is_refused_with_its_setting():
    with pytest.raises(UserError, match=r"policy.rewards\[1\].function='no_such_module:f': cannot import"):
        resolve([RewardTerm(), RewardTerm(function="no_such_module:f")])
    with pytest.raises(UserError, match=r"expected `module:function`"):
        resolve([RewardTerm(function="perl_core.policy.rewards")])
    with pytest.raises(ConfigError, match=r"policy.rewards: names must differ"):
        build_config({"policy": {"rewards": [{"function": "a:f"}, {"function": "b:f"}]}})


def test_function_rewards_refuse_a_bool_and_accept_ints():
    term = RewardTerm(function="x:y")
    assert function_rewards(term, lambda p, r, rows: [1, 2.5], ["a", "b"], ["c", "d"], [{}, {}]).tolist() == [1, 2.5]
    with pytest.raises(UserError, match=r"x:y returned True for response 0"):
        function_rewards(term, lambda p, r, rows: [True, 1.0], ["a", "b"], ["c", "d"], [{}, {}])


def test_shipped_rewards_on_hand_examples():
    prompt = "Customer: Hi, can I get a small oat latte? It's for Ana.\nAgent:"
    good, bad = " One small oat latte for Ana, coming right up. Thanks!", " A large mocha."
    assert gold_rubric([prompt] * 2, [good, bad], [{}, {}]) == [gold_score(prompt, good), gold_score(prompt, bad)]
    assert gold_rubric([prompt], [good], [{}])[0] > gold_rubric([prompt], [bad], [{}])[0]
    # 6 words, 3 over a budget of 3
    assert length_penalty(["p"] * 2, ["a b c d e f", "a b"], [{}, {}], max_words=3, per_word=0.5) == [-1.5, 0.0]
    assert ends_turn(["p"] * 2, ["x", "y"], [{"finished": True}, {"finished": False}]) == [1.0, 0.0]


def test_valid_api_call_accepts_what_taskmaster4_renders_and_refuses_broken_calls():
    calls = [{"api": {"add_order_item": {"menu_item_id": "cortado-0004", "quantity": "1",
                                          "attributes": [{"attribute_id": "caffeine", "option": "Decaf"}]}}},
             {"api": {"get_menu_items": {"query": "macchiato"}, "get_addons": {"menu_item_id": "x"}}},
             {"api": {"finish_order": None}}]
    rendered = [" " + render_action(turn) for turn in calls]
    assert valid_api_call(["p"] * 3, rendered, [{}] * 3) == [1.0, 1.0, 1.0]
    assert parse_api_calls(rendered[1]) == [("get_menu_items", {"query": "macchiato"}),
                                            ("get_addons", {"menu_item_id": "x"})]
    broken = [' CALL get_menu_items {"query": "latte"', " CALL {\"query\": 1}", ' CALL add_order_item {"a": 1} and',
              " CALL"]
    assert valid_api_call(["p"] * 4, broken, [{}] * 4) == [0.0, 0.0, 0.0, 0.0]
    # a spoken reply is not a call: it scores `spoken`; `apis` restricts the names
    assert valid_api_call(["p"], [" Sure, one latte."], [{}], spoken=0.5) == [0.5]
    assert valid_api_call(["p"], [rendered[0]], [{}], apis=["get_menu_items"]) == [0.0]
    assert json.loads(json.dumps(parse_api_calls(rendered[2]))) == [["finish_order", None]]
    assert not math.isnan(valid_api_call(["p"], [""], [{}])[0])
