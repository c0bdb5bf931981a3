"""How far does a scorer get on the synthetic pairwise data WITHOUT reading the prompt?

Features of the reply alone (politeness, rudeness, closing question, word count, how many drinks /
sizes / milks / extras / names it mentions, the placeholder "drink"), a logistic regression on
chosen-minus-rejected differences fitted on the train pairs, accuracy on the test pairs. A high
number means style and item counts stand in for correctness (a shortcut a reward model can take).

    python benchmarks/synthetic_shortcuts.py                 # the default in data/synthetic (prepared if missing)
    python benchmarks/synthetic_shortcuts.py --quick         # 200 generated prompts, shape check only
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from perl_core.config import load_config
from perl_core.data import synthetic as s

FEATURES = ["polite", "rude", "closing", "words", "n_drinks", "n_sizes", "n_milks", "n_extras", "n_names", "word_drink"]
STYLE = FEATURES[:4]


def features(reply: str) -> list[float]:
    low, m = reply.lower(), s.find_mentions(reply)
    return [float(bool(s._POLITE_RE.search(low))), float(bool(s._RUDE_RE.search(low))),
            float(bool(s._CLOSING_RE.search(low))), float(len(s._WORD_RE.findall(reply))),
            len(m.drinks), len(m.sizes), len(m.milks), len(m.extras), len(m.names), float(" drink" in low)]


def pair_matrix(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    d = np.array([np.subtract(features(r["chosen"]), features(r["rejected"])) for r in rows])
    return np.concatenate([d, -d]), np.concatenate([np.ones(len(d)), np.zeros(len(d))])


def fit_accuracy(xtr, ytr, xte, yte, steps: int = 2000, lr: float = 0.5) -> float:
    """Plain logistic regression (gradient descent on standardised features), test accuracy."""
    scale = xtr.std(0) + 1e-9
    xtr, xte = xtr / scale, xte / scale
    w = np.zeros(xtr.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-xtr @ w))
        w -= lr * xtr.T @ (p - ytr) / len(ytr)
    return float(((xte @ w > 0) == (yte == 1)).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--quick", action="store_true", help="tiny generated data, checks the shape of the output")
    args = ap.parse_args()
    if args.quick:
        views = s.generate(load_config("default", ["data.synthetic.n_prompts=200"]).data.synthetic)
        rows = views["pairwise"]
        train, test = rows[: len(rows) * 4 // 5], rows[len(rows) * 4 // 5:]
    else:
        from perl_core import data as data_api

        cfg = load_config("default", [f"data.data_dir={args.data_dir}"])
        data_api.prepare_dataset(cfg)  # skipped when up to date
        train, test = (data_api.load_rows(cfg.data, "pairwise", split) for split in ("train", "test"))
    xtr, ytr = pair_matrix(train)
    xte, yte = pair_matrix(test)
    style = [FEATURES.index(f) for f in STYLE]
    counts = [i for i in range(len(FEATURES)) if i not in style]
    report = {"test_pairs": len(test),
              "prompt_blind_accuracy": round(fit_accuracy(xtr, ytr, xte, yte), 4),
              "style_only_accuracy": round(fit_accuracy(xtr[:, style], ytr, xte[:, style], yte), 4),
              "item_counts_only_accuracy": round(fit_accuracy(xtr[:, counts], ytr, xte[:, counts], yte), 4)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
