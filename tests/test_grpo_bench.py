"""bench.grpo_rewards's pairing of runs (the measurements themselves are in docs/results.md)."""
import pytest

from bench.grpo_rewards import SETTINGS, _config, paired, summary


def run(setting, seed, gold, anchor=0.5):
    return {"setting": setting, "seed": seed, "prompts": [f"p{i}" for i in range(len(gold))], "policy_gold": gold,
            "anchor_gold": [anchor] * len(gold), "train_seconds": 1.0,
            "eval": {"gold_score_mean": sum(gold) / len(gold), "anchor_gold_score_mean": anchor,
                     "gold_gain": sum(gold) / len(gold) - anchor, "kl_mean": 1.0 + seed}}


def test_runs_pair_by_seed_and_prompt():
    a = [run("grpo", 0, [1.0, 0.5]), run("grpo", 1, [0.0, 1.0]), run("grpo", 2, [1.0, 1.0])]
    b = [run("rloo", 0, [0.5, 0.5]), run("rloo", 1, [0.0, 0.0])]  # no seed 2: that run is left out
    p = paired(a, b)
    # differences 0.5, 0, 0, 1 over the (seed, prompt) pairs both have
    assert p["gold_difference"] == pytest.approx(0.375) and p["seeds"] == [0, 1]
    assert p["ci_low"] <= 0.375 <= p["ci_high"]
    s = summary(a + b)
    assert s["settings"]["grpo"]["gold_gain"] == pytest.approx((0.25 + 0.0 + 0.5) / 3)
    assert s["settings"]["rloo"]["kl"] == pytest.approx(1.5)
    assert set(s["pairs"]) == {"grpo - rloo"}


def test_each_setting_is_a_valid_config():
    for name, overrides in SETTINGS.items():
        cfg = _config("default", overrides)
        assert (cfg.policy.algorithm == "grpo") == (name != "rloo")
    assert [t.function for t in _config("default", SETTINGS["grpo_mix"]).policy.rewards] == [
        None, "perl_core.policy.rewards:gold_rubric"]
