"""The embedded default: the gold oracle against hand-scored replies, and the generated views."""
import random

import pytest

from perl_core.config import SyntheticConfig
from perl_core.data import synthetic
from perl_core.data.synthetic import Order, gold_breakdown, gold_score, parse_order

PROMPT = "Customer: Hi, can I get a large oat milk latte with an extra shot?\nAgent:"


# Hand-scored with the rubric in docs/data.md (drink .30, size .12, milk .12, extras .12, name .04,
# closing .10, polite .10, brevity .10; wrong drink -.15, rude -.20, rambling -.02/word past budget+6).
@pytest.mark.parametrize("response, expected", [
    (" Sure! One large oat milk latte with an extra shot. Anything else?", 1.0),
    # wrong drink: no drink credit, no brevity credit (nothing confirmed), -0.15
    (" Sure! One large oat milk mocha with an extra shot. Anything else?", 0.12 + 0.12 + 0.12 + 0.10 + 0.10 - 0.15),
    # milk omitted
    (" Sure! One large latte with an extra shot. Anything else?", 0.88),
    # rude opener instead of a polite one
    (" Ugh, fine. One large oat milk latte with an extra shot. Anything else?", 1.0 - 0.10 - 0.20),
    # no closing question, neutral opener
    (" Okay. One large oat milk latte with an extra shot.", 0.80),
    # a name the customer never gave: -0.05 and no name credit
    (" Sure! One large oat milk latte with an extra shot for Maya. Anything else?", 1.0 - 0.04 - 0.05),
    # rambling: 44 words against a budget of 14 + 2*4 = 22 -> no brevity credit, -0.02*(22-6) capped at -0.30
    (" Sure! One large oat milk latte with an extra shot. It has been a really busy morning here and the line "
     "keeps getting longer by the minute. My cat knocked a plant off the shelf this morning so I was running late."
     " Anything else?", 1.0 - 0.10 - 0.30),
    (" Okay.", 0.0),
    ("", 0.0),
])
def test_gold_score_matches_hand_scores(response, expected):
    assert gold_score(PROMPT, response) == pytest.approx(expected, abs=1e-9)


def test_gold_orders_replies_as_a_person_would():
    perfect = " Sure! One large oat milk latte with an extra shot. Anything else?"
    wrong_drink = " Sure! One large oat milk mocha with an extra shot. Anything else?"
    wrong_size = " Sure! One small oat milk latte with an extra shot. Anything else?"
    assert gold_score(PROMPT, perfect) > gold_score(PROMPT, wrong_size) > gold_score(PROMPT, wrong_drink)


def test_correctness_needs_the_prompt_no_token_decides():
    """The same reply is good for one order and bad for another: no token in it decides the label."""
    reply = " Of course! One small mocha. Is that right?"
    assert gold_score("Customer: One small mocha, please.\nAgent:", reply) >= 0.9
    assert gold_score("Customer: One large latte, please.\nAgent:", reply) < 0.3
    # politeness comes in many phrasings, each earns the same credit
    order = "Customer: One small mocha, please.\nAgent:"
    scores = {gold_score(order, f" {p} One small mocha. Anything else?") for p in synthetic.POLITE}
    assert scores == {1.0}


def test_parse_order_reads_back_every_generated_prompt():
    rng = random.Random(7)
    for _ in range(300):
        order = synthetic.sample_order(rng)
        prompt = synthetic.render_prompt(order, rng)
        assert prompt.startswith("Customer: ") and prompt.endswith("\nAgent:")
        assert parse_order(prompt) == order
        assert gold_score(prompt, synthetic.perfect_response(order)) == 1.0
    assert parse_order("Customer: A chai latte with whole milk and whipped cream. Name's Zoe.\nAgent:") == Order(
        drink="chai latte", size=None, milk="whole milk", extras=("whipped cream",), name="Zoe")


def test_breakdown_sums_to_total_and_stays_in_range():
    rng = random.Random(3)
    for _ in range(200):
        order = synthetic.sample_order(rng)
        prompt = synthetic.render_prompt(order, rng)
        reply = synthetic.compose_response(order, rng, quality=rng.random())
        parts = gold_breakdown(prompt, reply)
        total = parts.pop("total")
        assert total == pytest.approx(min(1.0, max(0.0, sum(parts.values()))), abs=1e-6)


def test_generate_is_deterministic_and_views_keep_their_promises():
    cfg = SyntheticConfig(n_prompts=60, seed=5)
    views = synthetic.generate(cfg)
    assert views == synthetic.generate(cfg)
    assert views != synthetic.generate(SyntheticConfig(n_prompts=60, seed=6))
    assert len(views["sft"]) == 60 and len(views["pointwise"]) == 60 * cfg.responses_per_prompt
    for row in views["pairwise"]:
        assert gold_score(row["prompt"], row["chosen"]) - gold_score(row["prompt"], row["rejected"]) >= cfg.min_gap
    for row in views["pointwise"]:
        assert row["label"] == int(gold_score(row["prompt"], row["response"]) >= cfg.label_threshold)
    for view in views.values():
        for row in view:
            assert row["prompt"].endswith("\nAgent:")
            assert all(row[k].startswith(" ") for k in ("response", "chosen", "rejected") if k in row)


def test_sft_replies_are_mediocre_so_rl_has_room():
    views = synthetic.generate(SyntheticConfig(n_prompts=400, seed=0))
    golds = [r["gold"] for r in views["sft"]]
    mean = sum(golds) / len(golds)
    assert 0.25 < mean < 0.65, mean
    assert sum(g >= 0.99 for g in golds) / len(golds) < 0.2
    labels = [r["label"] for r in views["pointwise"]]
    assert 0.25 < sum(labels) / len(labels) < 0.75  # both classes well represented


def test_shortcut_benchmark_quick_mode_shape(capsys, monkeypatch):
    import json
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "synthetic_shortcuts.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--quick"])
    runpy.run_path(str(script), run_name="__main__")
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"test_pairs", "prompt_blind_accuracy", "style_only_accuracy", "item_counts_only_accuracy"}
    assert report["test_pairs"] > 0
