"""Evaluation reports: the numbers from hand-made scores, then the whole stage on tiny real artifacts."""
import json
import math

import numpy as np
import pytest

from perl_core import evaluation as E
from perl_core.config import EvaluationConfig


def test_pairwise_report_by_hand():
    chosen, rejected = np.array([2.0, 0.0, 1.0]), np.array([1.0, 0.0, 3.0])
    m, bins = E.pairwise_report(chosen, rejected, n_bins=4)
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
    m, _ = E.pointwise_report(scores, labels)
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
    m, samples = E.policy_report(prompts, ["a b"] * 6, ["x y z"] * 6, anchor_r, policy_r, np.full(6, 2.0),
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
    m2, _ = E.policy_report(prompts, ["a"] * 6, ["b"] * 6, anchor_r, policy_r, np.zeros(6),
                            (np.ones(6), np.ones(6)), ev, anchor_g, anchor_g + 0.1)
    assert m2["reward_hacking"] == 0.0
    # no oracle: no gold keys and no flag at all
    m3, _ = E.policy_report(prompts, ["a"] * 6, ["b"] * 6, anchor_r, policy_r, np.zeros(6),
                            (np.ones(6), np.ones(6)), ev)
    assert "gold_score_mean" not in m3 and "reward_hacking" not in m3
