"""Evaluation metrics as pure numpy functions.

Every function takes array-likes (lists, numpy arrays, or CPU/GPU torch tensors) and returns
plain Python floats or dicts, so the reward model, the policy and the reports all compute a
number the same way. Inputs are checked: mismatched lengths, empty inputs, NaN/inf and labels
outside {0, 1} raise ``ValueError`` naming the argument.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def _as_array(values, name: str) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().float().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"{name}[{bad}] is {arr[bad]} (expected a finite number)")
    return arr


def _labels(labels, name: str = "labels") -> np.ndarray:
    arr = _as_array(labels, name)
    bad = np.flatnonzero((arr != 0) & (arr != 1))
    if bad.size:
        raise ValueError(f"{name}[{int(bad[0])}] is {arr[bad[0]]:g}; labels must be 0 or 1")
    return arr.astype(np.int64)


def _same_length(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same length, got {a.size} and {b.size}")


def sigmoid(x) -> np.ndarray:
    """The logistic function, elementwise, without overflow warnings for large |x|: a reward
    model's logit (or a Bradley-Terry margin) as a probability."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def _binary(predictions, threshold: float | None, name: str = "predictions") -> np.ndarray:
    if threshold is None:
        return _labels(predictions, name)
    return (_as_array(predictions, name) >= threshold).astype(np.int64)


# ---------------------------------------------------------------- pointwise (thumbs up/down)
def average_ranks(values) -> np.ndarray:
    """1-based ranks of `values`; tied values share the mean of the ranks they span."""
    from scipy.stats import rankdata  # here, not at the top: a served reward model imports this module

    return rankdata(_as_array(values, "values"), method="average").astype(np.float64)


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative),
    ties counted half. Computed from ranks (Mann-Whitney U), so O(n log n) and exact.

    Raises ValueError when only one class is present (the AUC is undefined).
    """
    s = _as_array(scores, "scores")
    y = _labels(labels)
    _same_length(s, y, "scores and labels")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc needs both classes; got {n_pos} positive and {n_neg} negative labels")
    ranks = average_ranks(s)
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def accuracy(predictions, labels, threshold: float | None = None) -> float:
    """Fraction of predictions equal to the labels. With `threshold`, `predictions` are scores
    or probabilities and predict 1 when ``>= threshold``; without it they must already be 0/1."""
    p = _binary(predictions, threshold)
    y = _labels(labels)
    _same_length(p, y, "predictions and labels")
    return float(np.mean(p == y))


def balanced_accuracy(predictions, labels, threshold: float | None = None) -> float:
    """Mean of the true-positive rate and the true-negative rate (robust to class imbalance).
    A class absent from `labels` is left out of the mean. `threshold` as in :func:`accuracy`."""
    p = _binary(predictions, threshold)
    y = _labels(labels)
    _same_length(p, y, "predictions and labels")
    rates = [float(np.mean(p[y == c] == c)) for c in (0, 1) if np.any(y == c)]
    return float(np.mean(rates))


def reliability_bins(probs, labels, n_bins: int = 10) -> list[dict]:
    """Equal-width bins on [0, 1]: per bin its edges, count, mean predicted probability and the
    observed positive rate (the points of a reliability diagram; empty bins have count 0)."""
    p = _as_array(probs, "probs")
    y = _labels(labels)
    _same_length(p, y, "probs and labels")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if p.min() < 0 or p.max() > 1:
        raise ValueError(f"probs must lie in [0, 1], got range [{p.min():g}, {p.max():g}]")
    # bin b holds [b/n, (b+1)/n); probability 1.0 falls in the last bin
    idx = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    bins = []
    for b in range(n_bins):
        mask = idx == b
        count = int(mask.sum())
        bins.append({
            "low": b / n_bins,
            "high": (b + 1) / n_bins,
            "count": count,
            "mean_prob": float(p[mask].mean()) if count else float("nan"),
            "positive_rate": float(y[mask].mean()) if count else float("nan"),
        })
    return bins


def expected_calibration_error(probs, labels, n_bins: int = 10) -> float:
    """ECE = sum over bins of (bin count / N) * |positive rate in bin - mean probability in bin|,
    with `n_bins` equal-width bins on [0, 1] (see :func:`reliability_bins`)."""
    bins = reliability_bins(probs, labels, n_bins)
    total = sum(b["count"] for b in bins)
    return float(sum(b["count"] / total * abs(b["positive_rate"] - b["mean_prob"]) for b in bins if b["count"]))


# ---------------------------------------------------------------- pairwise (chosen vs rejected)
def pairwise_accuracy(r_chosen, r_rejected, ties: str = "half") -> float:
    """Fraction of pairs where the chosen response scores higher than the rejected one.

    `ties` decides what an exact tie ``r_chosen == r_rejected`` counts as: ``"half"`` (default,
    consistent with ROC-AUC: a tied pair is a coin flip) or ``"wrong"`` (the strict reading: a
    model that scores everything equal gets 0, not 0.5).
    """
    return float(np.mean(pairwise_credit(r_chosen, r_rejected, ties)))


def pairwise_credit(r_chosen, r_rejected, ties: str = "half") -> np.ndarray:
    """Each pair's share of :func:`pairwise_accuracy`: 1 chosen scored higher, 0 lower, a tie
    0.5 (``ties="half"``) or 0 (``"wrong"``). Its mean is the accuracy, so the bootstrap helpers
    below give the accuracy's interval, and on the same pairs the paired interval of a difference."""
    c = _as_array(r_chosen, "r_chosen")
    r = _as_array(r_rejected, "r_rejected")
    _same_length(c, r, "r_chosen and r_rejected")
    if ties not in ("half", "wrong"):
        raise ValueError(f"ties must be 'half' or 'wrong', got {ties!r}")
    tie_credit = 0.5 if ties == "half" else 0.0
    return np.where(c > r, 1.0, np.where(c == r, tie_credit, 0.0))


def win_rate(a, b, tol: float = 0.0) -> dict[str, float]:
    """How often `a` beats `b` item by item (e.g. policy vs anchor reward on the same prompt).

    Returns fractions ``{"win", "tie", "loss"}`` summing to 1; a tie (``|a - b| <= tol``) is
    counted apart, never split between win and loss.
    """
    x = _as_array(a, "a")
    y = _as_array(b, "b")
    _same_length(x, y, "a and b")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    diff = x - y
    tie = np.abs(diff) <= tol
    win = (diff > 0) & ~tie
    loss = (diff < 0) & ~tie
    n = diff.size
    return {"win": float(win.sum() / n), "tie": float(tie.sum() / n), "loss": float(loss.sum() / n)}


# ---------------------------------------------------------------- uncertainty
def bootstrap_ci(values, n: int = 1000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Percentile bootstrap of the mean: ``(sample mean, low, high)``.

    Resamples `values` with replacement `n` times and takes the ``(1 - confidence) / 2`` and
    ``(1 + confidence) / 2`` quantiles of the resampled means. Seeded, so reproducible.
    """
    x = _as_array(values, "values")
    if n < 1:
        raise ValueError(f"n (bootstrap resamples) must be >= 1, got {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    means = np.empty(n)
    # chunked so 10,000 resamples of 10,000 values never hold a 10^8 index matrix
    chunk = max(1, 2_000_000 // x.size)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        idx = rng.integers(0, x.size, size=(stop - start, x.size))
        means[start:stop] = x[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(x.mean()), float(low), float(high)


def auc_bootstrap_ci(scores, labels, other_scores=None, n: int = 1000, confidence: float = 0.95,
                     seed: int = 0) -> tuple[float, float, float]:
    """ROC-AUC of `scores` (or, with `other_scores`, the paired difference AUC(scores) - AUC(other))
    with a percentile bootstrap interval: ``(value, low, high)``.

    Resampling is stratified (positives and negatives separately, each with replacement), so every
    resample has both classes; with `other_scores` both models are scored on the same resampled
    rows, so row difficulty cancels. With 59 thumbs-down rows an AUC is uncertain by several
    points: compare models by the difference's interval, not two point estimates.
    """
    s, y = _as_array(scores, "scores"), _labels(labels)
    _same_length(s, y, "scores and labels")
    o = None if other_scores is None else _as_array(other_scores, "other_scores")
    if o is not None:
        _same_length(s, o, "scores and other_scores")
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if pos.size == 0 or neg.size == 0:
        raise ValueError("ROC-AUC needs both labels (0 and 1) in labels")
    rng = np.random.default_rng(seed)
    stat = (lambda idx: roc_auc(s[idx], y[idx])) if o is None else \
        (lambda idx: roc_auc(s[idx], y[idx]) - roc_auc(o[idx], y[idx]))
    values = np.array([stat(np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)]))
                       for _ in range(n)])
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return float(stat(np.arange(s.size))), float(low), float(high)


def paired_bootstrap_ci(a, b, n: int = 1000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Bootstrap of the mean difference ``a - b`` over paired items (policy minus anchor on the
    same prompt): resamples items, not the two sides separately, so per-prompt difficulty
    cancels. Returns ``(mean difference, low, high)``; an interval excluding 0 is a clear effect."""
    x = _as_array(a, "a")
    y = _as_array(b, "b")
    _same_length(x, y, "a and b")
    return bootstrap_ci(x - y, n=n, confidence=confidence, seed=seed)


# ---------------------------------------------------------------- text
def distinct_n(texts: Sequence[str] | Iterable[str], n: int = 2) -> float:
    """Distinct-n diversity: unique word n-grams / total word n-grams over all `texts`
    (whitespace tokens, case kept). 1.0 means no n-gram repeats; 0.0 when no text has n words."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        words = str(text).split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return float(len(seen) / total) if total else 0.0
