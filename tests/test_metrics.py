"""Metric functions against values computed by hand (and ROC-AUC against brute-force pair counting)."""
import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch

from perl_core import metrics as M


def brute_force_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    credit = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
    return credit / (len(pos) * len(neg))


def test_importing_the_metrics_does_not_import_scipy():
    """A served reward model imports this module; scipy is loaded only when ranks are computed."""
    code = ("import sys, perl_core.metrics as M; before = 'scipy' in sys.modules; M.average_ranks([2, 1]); "
            "print(before, 'scipy.stats' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_average_ranks_share_ties():
    # sorted: 1 (rank 1), 2 (rank 2), 3, 3 (ranks 3 and 4 -> 3.5 each), 7 (rank 5)
    assert M.average_ranks([3, 1, 7, 3, 2]).tolist() == [3.5, 1.0, 5.0, 3.5, 2.0]
    assert M.average_ranks([5.0] * 4).tolist() == [2.5] * 4
    with pytest.raises(ValueError):
        M.average_ranks([1.0, float("nan")])


def test_roc_auc_known_ranking():
    # positives at 0.35 and 0.8; negatives at 0.1 and 0.4: 3 of 4 pairs ordered right
    assert M.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert M.roc_auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert M.roc_auc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0


def test_roc_auc_ties_count_half():
    # positive 1 ties the negative (0.5), positive 2 beats it (1): 1.5 / 2
    assert M.roc_auc([1.0, 1.0, 2.0], [0, 1, 1]) == pytest.approx(0.75)
    assert M.roc_auc([5.0] * 6, [0, 1, 0, 1, 1, 0]) == pytest.approx(0.5)


def test_roc_auc_matches_brute_force_with_many_ties():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 5, size=60).astype(float)  # heavy ties
    labels = rng.integers(0, 2, size=60)
    assert M.roc_auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels), abs=1e-12)


def test_roc_auc_accepts_torch_and_rejects_one_class():
    assert M.roc_auc(torch.tensor([0.2, 0.9]), torch.tensor([0, 1])) == 1.0
    with pytest.raises(ValueError, match="both classes"):
        M.roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match=r"labels\[1\] is 2"):
        M.roc_auc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match=r"scores\[0\] is nan"):
        M.roc_auc([float("nan"), 0.2], [0, 1])


def test_accuracy_and_balanced_accuracy_by_hand():
    labels = [1, 1, 1, 1, 0, 0]
    preds = [1, 1, 1, 0, 0, 1]
    assert M.accuracy(preds, labels) == pytest.approx(4 / 6)
    # TPR 3/4, TNR 1/2
    assert M.balanced_accuracy(preds, labels) == pytest.approx((0.75 + 0.5) / 2)
    # thresholded probabilities give the same predictions
    probs = [0.9, 0.6, 0.5, 0.4, 0.1, 0.7]
    assert M.balanced_accuracy(probs, labels, threshold=0.5) == pytest.approx(0.625)
    with pytest.raises(ValueError, match="same length"):
        M.accuracy([1, 0], [1])


def test_expected_calibration_error_constructed():
    # bin [0.1, 0.2): mean prob 0.1, positive rate 0.5 -> |0.4| * 2/4
    # bin [0.9, 1.0]: mean prob 0.9, positive rate 1.0 -> |0.1| * 2/4
    probs = [0.1, 0.1, 0.9, 0.9]
    labels = [0, 1, 1, 1]
    assert M.expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.25)
    # perfectly calibrated: half of the 0.5s are positive, all the 1.0s are
    assert M.expected_calibration_error([0.5, 0.5, 1.0], [0, 1, 1], n_bins=5) == pytest.approx(0.0)
    bins = M.reliability_bins(probs, labels, n_bins=10)
    assert [b["count"] for b in bins] == [0, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.expected_calibration_error([1.2], [1])


def test_pairwise_accuracy_ties_policy():
    chosen = [2.0, 1.0, 0.5, 3.0]
    rejected = [1.0, 1.0, 0.9, 0.0]
    assert M.pairwise_accuracy(chosen, rejected) == pytest.approx(2.5 / 4)
    assert M.pairwise_accuracy(chosen, rejected, ties="wrong") == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="ties"):
        M.pairwise_accuracy(chosen, rejected, ties="drop")


def test_win_rate_counts_ties_apart():
    out = M.win_rate([1.0, 2.0, 3.0, 3.0], [0.0, 2.0, 4.0, 3.0])
    assert out == {"win": 0.25, "tie": 0.5, "loss": 0.25}
    # with a tolerance, near-equal scores tie
    assert M.win_rate([1.0, 1.05], [1.0, 1.0], tol=0.1) == {"win": 0.0, "tie": 1.0, "loss": 0.0}


def test_bootstrap_interval_covers_the_mean_and_has_the_normal_width():
    rng = np.random.default_rng(0)
    values = rng.normal(2.0, 1.0, size=400)
    mean, low, high = M.bootstrap_ci(values, n=2000, confidence=0.95, seed=1)
    assert mean == pytest.approx(values.mean())
    assert low < mean < high
    # the percentile interval of a mean is close to +-1.96 standard errors
    se = values.std(ddof=1) / np.sqrt(values.size)
    assert (high - low) / 2 == pytest.approx(1.96 * se, rel=0.15)
    assert M.bootstrap_ci(values, n=500, seed=7) == M.bootstrap_ci(values, n=500, seed=7)


def test_bootstrap_of_a_constant_is_a_point():
    assert M.bootstrap_ci([3.0] * 10, n=200) == (3.0, 3.0, 3.0)


def test_paired_bootstrap_uses_per_item_differences():
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 10, size=200)  # large per-prompt variation shared by both sides
    anchor = difficulty
    policy = difficulty + 0.5
    diff, low, high = M.paired_bootstrap_ci(policy, anchor, n=500)
    assert diff == pytest.approx(0.5)
    assert low == pytest.approx(0.5) and high == pytest.approx(0.5)  # the shared part cancels
    _, ulow, uhigh = M.bootstrap_ci(policy - anchor.mean(), n=500)
    assert uhigh - ulow > 1.0  # an unpaired view would be far wider


def test_distinct_n_by_hand():
    assert M.distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert M.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # ab, ba, ab
    assert M.distinct_n(["a b", "a b"], 2) == pytest.approx(1 / 2)
    assert M.distinct_n(["one"], 2) == 0.0


# ---------------------------------------------------------------- ROC-AUC intervals (LoRA vs full)
def test_auc_bootstrap_ci_on_hand_examples():
    labels = [1, 1, 1, 0, 0]
    perfect, reversed_ = [5, 4, 3, 2, 1], [1, 2, 3, 4, 5]
    # a perfect ranking stays perfect in every stratified resample
    assert M.auc_bootstrap_ci(perfect, labels, n=200) == (1.0, 1.0, 1.0)
    # the paired difference of perfect (AUC 1) and reversed (AUC 0) is 1 in every resample
    assert M.auc_bootstrap_ci(perfect, labels, other_scores=reversed_, n=200) == (1.0, 1.0, 1.0)
    # a model against itself: exactly 0
    assert M.auc_bootstrap_ci(perfect, labels, other_scores=perfect, n=200) == (0.0, 0.0, 0.0)
    # 5 of the 6 positive-negative pairs ordered: only positive 0.2 < negative 0.3
    mixed = [0.9, 0.8, 0.2, 0.3, 0.1]
    auc, low, high = M.auc_bootstrap_ci(mixed, labels, n=500)
    assert auc == pytest.approx(5 / 6) and low <= auc <= high and 0 <= low < high <= 1


def test_auc_bootstrap_ci_rejects_a_single_class():
    with pytest.raises(ValueError, match="both labels"):
        M.auc_bootstrap_ci([0.1, 0.2], [1, 1])


def test_compare_reward_evals_pairs_rows_by_id(tmp_path):
    import json

    from perl_core.errors import UserError
    from perl_core.eval.reward import compare_reward_evals

    def write(name, scores, ids=("a", "b", "c", "d")):
        rows = [{"id": i, "label": y, "score": s} for i, y, s in zip(ids, [1, 1, 0, 0], scores)]
        (tmp_path / name).mkdir()
        (tmp_path / name / "reward_eval.json").write_text(json.dumps({"scores": {"pointwise": rows}}))
        return tmp_path / name

    a = write("lora", [2.0, 1.0, -1.0, -2.0])       # AUC 1
    b = write("full", [1.0, -1.5, -1.0, -2.0])      # positives 1.0, -1.5 vs negatives -1.0, -2.0: 3 of 4 -> 0.75
    out = compare_reward_evals(a, b)
    assert out["roc_auc_a"] == 1.0 and out["roc_auc_b"] == 0.75 and out["roc_auc_diff"] == pytest.approx(0.25)
    assert out["roc_auc_diff_ci_low"] <= 0.25 <= out["roc_auc_diff_ci_high"]
    assert out["balanced_accuracy_a"] == 1.0 and out["balanced_accuracy_b"] == 0.75
    with pytest.raises(UserError, match=r"not score the same pointwise rows: 1 of A's 4 are not in B .*id 'd'"):
        compare_reward_evals(a, write("other", [1, 1, 1, 1], ids=("a", "b", "c", "x")))


def test_pairwise_credit_is_each_pairs_share_of_the_accuracy():
    chosen, rejected = [2.0, 0.0, 1.0, 5.0], [1.0, 0.0, 3.0, 4.0]  # win, tie, loss, win
    assert M.pairwise_credit(chosen, rejected).tolist() == [1.0, 0.5, 0.0, 1.0]
    assert M.pairwise_credit(chosen, rejected, ties="wrong").tolist() == [1.0, 0.0, 0.0, 1.0]
    assert M.pairwise_accuracy(chosen, rejected) == pytest.approx(2.5 / 4)
    # its bootstrap is the accuracy's interval: 3 right of 4 (no tie) lies in [0, 1] around 0.75
    acc, low, high = M.bootstrap_ci(M.pairwise_credit([1, 1, 1, 0], [0, 0, 0, 1]), n=500)
    assert acc == 0.75 and 0.0 <= low < 0.75 < high == 1.0


def test_sigmoid_by_hand_and_at_extremes():
    import math
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 1 / (1 + exp(-x)) would warn of overflow at -1000
        p = M.sigmoid([0.0, math.log(3.0), -math.log(3.0), 1000.0, -1000.0])
    assert p == pytest.approx([0.5, 0.75, 0.25, 1.0, 0.0], abs=1e-12)
