"""Evaluation reports: the numbers from hand-made scores, then the whole stage on tiny real artifacts."""
import json
import math

import numpy as np
import pytest

from perl_core.eval import policy as EP
from perl_core.eval import reward as ER
from perl_core.config import EvaluationConfig


def test_pairwise_report_by_hand():
    chosen, rejected = np.array([2.0, 0.0, 1.0]), np.array([1.0, 0.0, 3.0])
    m, bins = ER.pairwise_report(chosen, rejected, n_bins=4)
    assert m["pairwise_accuracy"] == pytest.approx(1.5 / 3)  # win, tie (half), loss
    margins = np.array([1.0, 0.0, -2.0])
    assert m["pairwise_loss"] == pytest.approx(np.mean(np.log1p(np.exp(-margins))))
    assert m["pairwise_reward_mean"] == pytest.approx(7 / 6)
    assert m["n_pairs"] == 3
    # both orders of every pair: 6 points in the reliability bins
    assert sum(b["count"] for b in bins) == 6


def test_pointwise_report_by_hand():
    scores = np.array([-2.0, -1.0, 0.5, 3.0, 1.0])
    labels = np.array([0, 1, 0, 1, 1])
    m, _ = ER.pointwise_report(scores, labels)
    # positives {-1, 3, 1} vs negatives {-2, 0.5}: 5 of 6 pairs ordered right
    assert m["roc_auc"] == pytest.approx(5 / 6)
    # predicted 1 where score >= 0: [0, 0, 1, 1, 1] -> TPR 2/3, TNR 1/2
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    p = 1 / (1 + np.exp(-scores))
    assert m["pointwise_loss"] == pytest.approx(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def test_policy_report_flags_reward_hacking_and_counts_ties():
    ev = EvaluationConfig(bootstrap_samples=200, n_samples_table=2)
    prompts = [f"p{i}" for i in range(6)]
    anchor_r = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    policy_r = np.array([1.0, 1.0, 1.0, 1.0, 0.0, -0.1])  # RM: 4 wins, 1 tie, 1 loss
    anchor_g = np.array([0.8] * 6)
    policy_g = np.array([0.5] * 6)                         # gold: every prompt worse
    m, samples = EP.policy_report(prompts, ["a b"] * 6, ["x y z"] * 6, anchor_r, policy_r, np.full(6, 2.0),
                                 (np.full(6, 3.0), np.full(6, 4.0)), ev, anchor_g, policy_g)
    assert (m["win_rate"], m["tie_rate"], m["loss_rate"]) == pytest.approx((4 / 6, 1 / 6, 1 / 6))
    assert m["reward_gain"] == pytest.approx(3.9 / 6)
    assert m["gold_gain"] == pytest.approx(-0.3)
    assert m["gold_loss_rate"] == 1.0
    assert m["reward_hacking"] == 1.0 and m["reward_hacking_significant"] == 1.0
    assert m["kl_mean"] == pytest.approx(2.0)
    assert m["distinct_1"] == pytest.approx(3 / 18) and m["anchor_distinct_2"] == pytest.approx(1 / 6)
    assert len(samples) == 2 and samples[0]["policy_gold"] == 0.5

    # gold agrees with the RM: no flag
    m2, _ = EP.policy_report(prompts, ["a"] * 6, ["b"] * 6, anchor_r, policy_r, np.zeros(6),
                            (np.ones(6), np.ones(6)), ev, anchor_g, anchor_g + 0.1)
    assert m2["reward_hacking"] == 0.0
    # no oracle: no gold keys and no flag at all
    m3, _ = EP.policy_report(prompts, ["a"] * 6, ["b"] * 6, anchor_r, policy_r, np.zeros(6),
                            (np.ones(6), np.ones(6)), ev)
    assert "gold_score_mean" not in m3 and "reward_hacking" not in m3


# ---------------------------------------------------------------- pairwise: intervals and LoRA vs full
def pair_rows(margins, keys=None):
    """Per-pair rows as `eval reward` saves them; the margin's sign decides right (+), tie (0), wrong (-)."""
    keys = keys or [f"k{i}" for i in range(len(margins))]
    return [{"row": i + 1, "id": None, "key": k, "chosen": float(m), "rejected": 0.0}
            for i, (k, m) in enumerate(zip(keys, margins))]


def test_pairwise_intervals_by_hand():
    ev = EvaluationConfig(bootstrap_samples=500)
    m = ER.pairwise_intervals([1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], ev)
    # every pair right by a margin of 1: nothing to resample
    assert (m["pairwise_accuracy_ci_low"], m["pairwise_accuracy_ci_high"]) == (1.0, 1.0)
    assert (m["pairwise_margin_mean_ci_low"], m["pairwise_margin_mean_ci_high"]) == (1.0, 1.0)
    m = ER.pairwise_intervals([2.0, 0.0, 1.0, 3.0], [1.0, 0.0, 3.0, 0.0], ev)  # credit 1, .5, 0, 1; margins 1, 0, -2, 3
    assert 0.0 <= m["pairwise_accuracy_ci_low"] < 2.5 / 4 < m["pairwise_accuracy_ci_high"] <= 1.0
    assert -2.0 <= m["pairwise_margin_mean_ci_low"] < 0.5 < m["pairwise_margin_mean_ci_high"] <= 3.0


def test_compare_pairwise_by_hand():
    ev = EvaluationConfig(bootstrap_samples=300)
    a = pair_rows([1, 1, 1, 1, 1, 1, 1, 1, 1, 1])            # all 10 right
    b = pair_rows([1, 1, 1, 1, 1, 1, 1, 1, 0, -1])           # 8 right, a tie, a wrong: 8.5 / 10
    out = ER.compare_pairwise(list(reversed(a)), b, ev)         # rows pair up by key, not by order
    assert out["n_pairs"] == 10 and out["pairwise_accuracy_a"] == 1.0 and out["pairwise_accuracy_b"] == 0.85
    assert out["pairwise_accuracy_diff"] == pytest.approx(0.15)
    assert out["pairwise_accuracy_diff_ci_low"] >= 0.0 and out["pairwise_accuracy_diff_ci_high"] <= 0.5
    assert out["pairwise_margin_diff"] == pytest.approx(0.3)   # mean margin 1.0 against 0.7
    assert (out["pairs_only_a_right"], out["pairs_only_b_right"]) == (2, 0)
    # a model against itself: exactly no difference in every resample
    same = ER.compare_pairwise(a, a, ev)
    assert (same["pairwise_accuracy_diff"], same["pairwise_accuracy_diff_ci_low"],
            same["pairwise_accuracy_diff_ci_high"]) == (0.0, 0.0, 0.0)


def _two_models_on_pairs(n, seed, p_a=0.80, p_b=0.70):
    """Two reward models sharing pair difficulty u ~ U(0, 1): model A ranks a pair right when
    u < p_a, B when u < p_b (margins p - u). True accuracy difference: p_a - p_b = 0.10."""
    u = np.random.default_rng(seed).random(n)
    return pair_rows(p_a - u), pair_rows(p_b - u)


def test_paired_interval_covers_the_true_difference_and_shrinks_with_n():
    widths = {}
    for n in (200, 3200):
        covered = 0
        for seed in range(40):
            a, b = _two_models_on_pairs(n, seed)
            out = ER.compare_pairwise(a, b, EvaluationConfig(bootstrap_samples=400, seed=seed))
            covered += out["pairwise_accuracy_diff_ci_low"] <= 0.10 <= out["pairwise_accuracy_diff_ci_high"]
            widths.setdefault(n, []).append(out["pairwise_accuracy_diff_ci_high"] - out["pairwise_accuracy_diff_ci_low"])
        assert covered >= 34, (n, covered)  # 95% intervals: 38 of 40 expected; 34 leaves room for chance
    # 16x the pairs: a quarter of the width (1 / sqrt(16)), up to bootstrap noise
    assert 0.2 < np.mean(widths[3200]) / np.mean(widths[200]) < 0.3
    # pair difficulty cancels in the paired interval: two separate intervals would be far wider
    out = ER.compare_pairwise(*_two_models_on_pairs(200, 0), EvaluationConfig(bootstrap_samples=400))
    separate = np.hypot(out["pairwise_accuracy_a_ci_high"] - out["pairwise_accuracy_a_ci_low"],
                        out["pairwise_accuracy_b_ci_high"] - out["pairwise_accuracy_b_ci_low"])
    assert out["pairwise_accuracy_diff_ci_high"] - out["pairwise_accuracy_diff_ci_low"] < 0.7 * separate


def write_eval(folder, margins, objective="pairwise", keys=None, **extra):
    folder.mkdir(parents=True)
    (folder / "reward_eval.json").write_text(json.dumps(
        {"objective": objective, "scores": {"pairwise": pair_rows(margins, keys)}, **extra}))
    return folder


def test_compare_reward_evals_on_pairwise_evaluations(tmp_path):
    a = write_eval(tmp_path / "lora", [1, 1, 1, -1, 1, 1])   # 5 of 6
    b = write_eval(tmp_path / "full", [1, -1, 1, -1, 1, 1])  # 4 of 6
    out = ER.compare_reward_evals(a, b / "reward_eval.json", EvaluationConfig(bootstrap_samples=200))
    assert out["objective"] == "pairwise" and out["n_pairs"] == 6
    assert out["pairwise_accuracy_diff"] == pytest.approx(1 / 6)
    assert out["pairwise_accuracy_diff_ci_low"] <= 1 / 6 <= out["pairwise_accuracy_diff_ci_high"]
    assert "roc_auc_diff" not in out


def test_compare_reward_evals_refuses_different_pairs_and_objectives(tmp_path):
    from perl_core.errors import UserError

    a = write_eval(tmp_path / "a", [1, 1, 1, 1, 1], keys=["k1", "k2", "k3", "k4", "k5"])
    b = write_eval(tmp_path / "b", [1, 1, 1, 1], keys=["k1", "k2", "k3", "k9"],
                   skipped_too_long={"pairwise": 1})
    with pytest.raises(UserError, match=r"not score the same pairwise pairs: 2 of A's 5 are not in B and 1 of B's 4 "
                                        r"are not in A \(e\.g\. row 4, key k4, only in A\).*B skipped 1"):
        ER.compare_reward_evals(a, b)
    c = tmp_path / "pointwise"
    c.mkdir()
    (c / "reward_eval.json").write_text(json.dumps({"objective": "pointwise", "scores": {"pointwise": [
        {"key": "p1", "label": 1, "score": 0.3}, {"key": "p2", "label": 0, "score": -0.3}]}}))
    with pytest.raises(UserError, match="a pairwise reward model and .* a pointwise one"):
        ER.compare_reward_evals(a, c)
    # an evaluation written before per-pair scores were kept names what to do
    old = tmp_path / "old"
    old.mkdir()
    (old / "reward_eval.json").write_text(json.dumps({"objective": "pairwise", "scores": {}}))
    with pytest.raises(UserError, match="no per-row pairwise scores.*re-run `perl-rlhf eval reward`"):
        ER.compare_reward_evals(a, old)


def test_compare_reward_evals_names_a_missing_empty_or_corrupt_folder(tmp_path):
    from perl_core.errors import UserError

    good = write_eval(tmp_path / "good", [1, 1])
    with pytest.raises(UserError, match=f"{tmp_path / 'nowhere'}: no such file or folder"):
        ER.compare_reward_evals(tmp_path / "nowhere", good)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=f"{tmp_path / 'empty'} has no reward_eval.json"):
        ER.compare_reward_evals(good, tmp_path / "empty")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "reward_eval.json").write_text('{"scores": {"pairwise": [')
    with pytest.raises(UserError, match="corrupt/reward_eval.json is not valid JSON"):
        ER.compare_reward_evals(good, tmp_path / "corrupt")
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "reward_eval.json").write_text('{"metrics": {}}')
    with pytest.raises(UserError, match="is not a reward evaluation"):
        ER.compare_reward_evals(good, tmp_path / "policy")
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "reward_eval.json").write_text('{"scores": {"pairwise": [{"key": "k0", "chosen": 1}]}}')
    with pytest.raises(UserError, match=r"scores.pairwise\[0\] lacks rejected"):
        ER.compare_reward_evals(good, tmp_path / "rows")


def test_cli_compare_reward_on_a_missing_folder_is_one_clear_line(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    good = write_eval(tmp_path / "good", [1, -1, 1])
    result = CliRunner().invoke(app, ["eval", "compare-reward", str(tmp_path / "nowhere"), str(good)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and f"{tmp_path / 'nowhere'}: no such file or folder" in text
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    ok = CliRunner().invoke(app, ["eval", "compare-reward", str(good), str(good)])
    assert ok.exit_code == 0, ok.output
    assert "pairwise_accuracy A - B: +0.0000" in " ".join(ok.output.split())


# ---------------------------------------------------------------- the whole stage on tiny real artifacts
from perl_core import data as data_api  # noqa: E402
from perl_core.config import BackboneConfig, LoraConfig, build_config  # noqa: E402

ORDERS = [f"Customer: a {s} {d}, please.\nAgent:" for s in ("small", "large") for d in ("latte", "mocha", "tea")]
GOOD = " One {}, coming up. Anything else?"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A llama-micro anchor, a LoRA reward model on it and two LoRA policies: one whose adapter is
    zero (the anchor itself) and one with a large random adapter."""
    import torch

    from perl_core.artifacts import write_manifest
    from bench.policy import prepare_artifacts
    from perl_core.modeling import attach_lora, load_causal_lm, load_tokenizer, resolve_backbone

    root = tmp_path_factory.mktemp("eval")
    texts = [o + GOOD.format(o.split("a ")[1].split(",")[0]) for o in ORDERS] * 4
    backbone = resolve_backbone(BackboneConfig(name="scratch:llama-micro", vocab_size=300), root, corpus=texts)
    anchor, rm = prepare_artifacts(backbone, root, lora_rank=2)
    policies = {}
    for name, scale in (("same", 0.0), ("moved", 2.0)):
        model = attach_lora(load_causal_lm(str(anchor)), LoraConfig(rank=2), "CAUSAL_LM")
        torch.manual_seed(1)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0, scale) if scale else p.zero_()
        out = root / f"policy-{name}"
        model.save_pretrained(out)
        load_tokenizer(str(anchor)).save_pretrained(out)
        write_manifest(out, kind="policy", base_model=str(anchor), tuning="lora", config={}, anchor=str(anchor))
        policies[name] = out
    return {"anchor": anchor, "reward_model": rm, **policies}


@pytest.fixture
def rows(monkeypatch):
    pairwise = [{"prompt": o, "chosen": GOOD.format(o.split("a ")[1].split(",")[0]), "rejected": " No."} for o in ORDERS]
    pointwise = [{"prompt": r["prompt"], "response": r[k], "label": int(k == "chosen")}
                 for r in pairwise for k in ("chosen", "rejected")]
    store = {"pairwise": pairwise, "pointwise": pointwise}
    monkeypatch.setattr(data_api, "load_rows", lambda cfg, view, split: store[view])
    monkeypatch.setattr(data_api, "load_prompts", lambda cfg, split: ORDERS)
    return store


def test_evaluate_reward_model_matches_direct_scoring(tmp_path, artifacts, rows):
    from perl_core import metrics as M
    from perl_core.reward.train import RewardScorer

    cfg = build_config({})
    m = ER.evaluate_reward_model(cfg, artifacts["reward_model"], tmp_path)
    scorer = RewardScorer.load(artifacts["reward_model"])
    pw = rows["pairwise"]
    chosen = scorer.score([r["prompt"] for r in pw], [r["chosen"] for r in pw])
    rejected = scorer.score([r["prompt"] for r in pw], [r["rejected"] for r in pw])
    assert m["pairwise_accuracy"] == pytest.approx(M.pairwise_accuracy(chosen, rejected))
    pt = rows["pointwise"]
    scores = scorer.score([r["prompt"] for r in pt], [r["response"] for r in pt])
    assert m["roc_auc"] == pytest.approx(M.roc_auc(scores, [r["label"] for r in pt]))
    assert m["n_pairs"] == len(pw) and m["n_pointwise"] == len(pt)
    saved = json.loads((tmp_path / "reward_eval.json").read_text())
    assert saved["metrics"]["pairwise_accuracy"] == pytest.approx(m["pairwise_accuracy"])
    for png in ("reward_reliability_pairwise.png", "reward_scores_pairwise.png", "reward_reliability_pointwise.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert "| roc_auc |" in (tmp_path / "reward_eval.md").read_text()
    # per-pair scores are kept, keyed by the pair's text, with the accuracy's and margin's intervals
    from perl_core.reward.train import row_keys

    pairs = saved["scores"]["pairwise"]
    assert [p["key"] for p in pairs] == row_keys(pw, "pairwise") and [p["row"] for p in pairs] == list(range(1, 7))
    assert [p["chosen"] for p in pairs] == pytest.approx(chosen.tolist(), abs=1e-5)
    assert [p["rejected"] for p in pairs] == pytest.approx(rejected.tolist(), abs=1e-5)
    assert m["pairwise_accuracy_ci_low"] <= m["pairwise_accuracy"] <= m["pairwise_accuracy_ci_high"]
    margin = float((chosen - rejected).mean())
    assert m["pairwise_margin_mean_ci_low"] <= margin + 1e-6 and margin - 1e-6 <= m["pairwise_margin_mean_ci_high"]
    # the evaluation against itself: both views compared, no difference
    same = ER.compare_reward_evals(tmp_path, tmp_path / "reward_eval.json", EvaluationConfig(bootstrap_samples=100))
    assert same["n_pairs"] == 6 and same["pairwise_accuracy_diff_ci_high"] == 0.0 and same["roc_auc_diff"] == 0.0


def test_evaluate_policy_same_seed_kl_zero_for_the_anchor_itself(tmp_path, artifacts, rows):
    from perl_core.policy.generation import PolicyGenerator
    from perl_core.reward.train import RewardScorer

    cfg = build_config({}, ["evaluation.bootstrap_samples=200", "evaluation.n_samples_table=6",
                            "policy.generation.max_new_tokens=6"])
    same = EP.evaluate_policy(cfg, artifacts["same"], artifacts["anchor"], artifacts["reward_model"], tmp_path / "same")
    # a zero adapter is the anchor: identical samples under the same seed, KL exactly 0, every prompt a tie
    assert same["kl_mean"] == pytest.approx(0.0, abs=1e-5)
    assert same["tie_rate"] == 1.0 and same["reward_gain"] == 0.0 and same["gold_gain"] == 0.0
    assert same["reward_hacking"] == 0.0

    moved = EP.evaluate_policy(cfg, artifacts["moved"], artifacts["anchor"], artifacts["reward_model"], tmp_path / "moved")
    saved = json.loads((tmp_path / "moved" / "policy_eval.json").read_text())
    samples = saved["samples"]
    # the sample table holds exactly what PolicyGenerator.generate produces with the evaluation's seed and temperature ...
    temperature = cfg.policy.generation.temperature
    policy_text = PolicyGenerator.load(artifacts["moved"]).generate(ORDERS, seed=0, max_new_tokens=6, temperature=temperature)
    anchor_text = PolicyGenerator.load(artifacts["anchor"]).generate(ORDERS, seed=0, max_new_tokens=6, temperature=temperature)
    assert [s["policy_response"] for s in samples] == policy_text
    assert [s["anchor_response"] for s in samples] == anchor_text
    assert policy_text != anchor_text
    # ... scored by the reward model directly (non-empty responses take the scorer's own path)
    scorer = RewardScorer.load(artifacts["reward_model"])
    for s in samples:
        if s["policy_response"]:
            assert s["policy_reward"] == pytest.approx(float(scorer.score([s["prompt"]], [s["policy_response"]])[0]), abs=1e-5)
    assert moved["kl_mean"] > 0  # a large random adapter moves the policy away from the anchor
    md = (tmp_path / "moved" / "policy_eval.md").read_text()
    assert "## Samples" in md and "KL(policy ‖ anchor)" in md and "Reward-hacking flag" in md


def test_evaluate_policy_skips_prompts_longer_than_rl_trains_on(tmp_path, artifacts, rows, monkeypatch):
    from perl_core.policy.generation import PolicyGenerator
    from perl_core.modeling import encode_prompt

    long_prompt = "Customer: " + "a large latte and a small mocha, " * 30 + "please.\nAgent:"
    tokenizer = PolicyGenerator.load(artifacts["anchor"]).tokenizer
    assert len(encode_prompt(tokenizer, long_prompt)) > 95 >= max(len(encode_prompt(tokenizer, p)) for p in ORDERS)
    # the long prompt comes first: n_prompts is applied after the filter, so the first 3 that fit are used
    monkeypatch.setattr(data_api, "load_prompts", lambda cfg, split: [long_prompt, *ORDERS, long_prompt])
    cfg = build_config({}, ["evaluation.bootstrap_samples=100", "evaluation.n_prompts=3", "evaluation.n_samples_table=10",
                            "policy.generation.max_new_tokens=4", "policy.max_prompt_length=95"])
    m = EP.evaluate_policy(cfg, artifacts["same"], artifacts["anchor"], artifacts["reward_model"], tmp_path)
    assert m["n_prompts"] == 3 and m["prompts_skipped_too_long"] == 2
    saved = json.loads((tmp_path / "policy_eval.json").read_text())
    assert [s["prompt"] for s in saved["samples"]] == ORDERS[:3]
    assert "2 prompts of the split are longer than policy.max_prompt_length" in (tmp_path / "policy_eval.md").read_text()


def test_evaluation_and_generation_run_under_the_configured_precision(tmp_path, artifacts, rows, monkeypatch):
    """Sampling (policy and anchor) under policy.train.precision, reward scoring under reward.train.precision:
    bf16 autocast runs on a CPU, `auto` is fp32 there."""
    import torch

    from perl_core.errors import UserError
    from perl_core.policy.generation import PolicyGenerator
    from perl_core.reward.train import RewardScorer

    seen: dict[str, set] = {}

    def spy(cls, name):  # every model the evaluation loads reports the dtype its attention computes in
        load = cls.load.__func__

        def loaded(c, *args, **kwargs):
            obj = load(c, *args, **kwargs)
            proj = next(m for n, m in obj.model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
            proj.register_forward_hook(lambda m, i, out: seen.setdefault(name, set()).add(out.dtype))
            return obj
        monkeypatch.setattr(cls, "load", classmethod(loaded))

    spy(PolicyGenerator, "sampling")
    spy(RewardScorer, "reward")
    base = ["evaluation.bootstrap_samples=100", "evaluation.n_prompts=3", "policy.generation.max_new_tokens=4"]
    fp32 = EP.evaluate_policy(build_config({}, base), artifacts["moved"], artifacts["anchor"],
                             artifacts["reward_model"], tmp_path / "auto")
    assert seen == {"sampling": {torch.float32}, "reward": {torch.float32}}
    seen.clear()
    bf16 = EP.evaluate_policy(build_config({}, base + ["policy.train.precision=bf16"]), artifacts["moved"],
                             artifacts["anchor"], artifacts["reward_model"], tmp_path / "bf16")
    assert seen == {"sampling": {torch.bfloat16}, "reward": {torch.float32}}
    assert bf16["kl_mean"] != fp32["kl_mean"]  # the same evaluation, in bf16 rounding
    seen.clear()
    m = ER.evaluate_reward_model(build_config({}, ["reward.train.precision=bf16"]), artifacts["reward_model"],
                                tmp_path / "rm")
    assert seen == {"reward": {torch.bfloat16}} and "pairwise_accuracy" in m
    with pytest.raises(UserError, match=r"policy.train.precision='fp16' needs a CUDA GPU"):
        PolicyGenerator.load(artifacts["anchor"], precision="fp16").generate(ORDERS[:1])
    with pytest.raises(UserError, match=r"reward.train.precision='fp16' needs a CUDA GPU"):
        RewardScorer.load(artifacts["reward_model"], precision="fp16").score(ORDERS[:1], [" One latte."])
