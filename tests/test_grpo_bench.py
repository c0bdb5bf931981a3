"""bench.grpo_rewards's pairing of runs (the measurements themselves are in docs/results.md)."""
import pytest

from bench.grpo_rewards import SETTINGS, _config, paired, summary
from bench.trl_compare import trl_available


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


@pytest.mark.skipif(not trl_available(), reason="needs the bench extra")
def test_trl_grpo_gets_a_chat_model_the_rendered_turns_and_our_reward_model_reads_text(tmp_path, monkeypatch):
    """TRL's side of the GRPO comparison on a chat model: prompts as messages (TRL renders the template ours
    renders), the reward callable handed our prompt text and the answer's text, one batch trained."""
    import datasets

    import perl_core.eval.policy
    from bench.trl_grpo import grpo_overrides, trl_grpo_workload
    from chat_backbones import build_chat_backbone
    from perl_core.artifacts import write_manifest
    from perl_core.config import load_config
    from perl_core.data import load_prompts, prepare_dataset
    from perl_core.modeling import prompt_messages
    from stand_ins import stand_in_reward_model

    anchor = build_chat_backbone(tmp_path / "anchor", "smollm2")
    write_manifest(anchor, kind="anchor", base_model=anchor, tuning="none", config={})
    rm = stand_in_reward_model(anchor, tmp_path / "rm", fit_vocab=True)
    cfg = load_config("default", grpo_overrides(2) + [
        f"data.data_dir={tmp_path / 'data'}", "data.synthetic.n_prompts=40", "policy.k=2", "policy.train.batch_size=2",
        "policy.train.max_steps=1", "policy.generation.max_new_tokens=4", "policy.lora.rank=2"])
    prepare_dataset(cfg)
    seen, rows = [], []
    from_list = datasets.Dataset.from_list
    monkeypatch.setattr(datasets.Dataset, "from_list", lambda r: rows.extend(r) or from_list(r))
    real = perl_core.eval.policy.rm_scores
    monkeypatch.setattr(perl_core.eval.policy, "rm_scores", lambda s, p, r: seen.append((p, r)) or real(s, p, r))
    result = trl_grpo_workload(cfg.model_dump(mode="json"), anchor, str(rm))
    assert result["batches"] == 1 and result["library"] == "trl"
    # the turns ours renders, as messages: TRL applies the same chat template with the generation prompt
    assert rows and all(r["prompt"] == prompt_messages(r["text"]) for r in rows)
    train = set(load_prompts(cfg.data, "train"))
    prompts, answers = seen[0]  # the first call is TRL's reward callable (then the quality check)
    assert len(prompts) == 4 and set(prompts) <= train  # 2 prompts x k = 2, our prompt text
    assert all(isinstance(a, str) for a in answers)  # the answer's text, not TRL's message dicts
