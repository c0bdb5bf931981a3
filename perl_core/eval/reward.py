"""Reward-model evaluation, written as files (JSON, Markdown, PNG) into `out_dir`.

:func:`evaluate_reward_model` scores the test split: pairwise accuracy and mean margin (with
bootstrap intervals) and the Bradley-Terry loss on pairwise rows; ROC-AUC, (balanced) accuracy,
ECE and the cross-entropy on pointwise rows; reward mean/std; a reliability diagram and score
histograms by label. Per-row scores are kept, so :func:`compare_reward_evals` can put two
reward models (LoRA, full tuning) side by side on the same rows with paired intervals. A
reward-model ensemble is evaluated as its aggregate (`policy.ensemble_aggregation`, what RL
optimises), member by member (`member_i.*`) and by its members' disagreement.

It returns a flat ``{name: float}`` dict that orchestration can log as metrics.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from perl_core import data as data_api
from perl_core import metrics as M
from perl_core.config import EvaluationConfig, PerlConfig
from perl_core.errors import UserError
from perl_core.eval import reporting as R
from perl_core.reward.ensemble import EnsembleScorer
from perl_core.reward.stage import load_reward_scorer, read_reward_manifest
from perl_core.reward.train import fit_example, score_rows


def _cut(scorer, prompt: str, response: str) -> Optional[tuple[int, int]]:
    """(prompt, response) tokens the scorer cuts to read the pair under its own truncation setting;
    None when it cannot read it at all (too long for `error`, or for `left` when the response is)."""

    try:
        _, prompt_cut, response_cut = fit_example(scorer.tokenizer, prompt, response, scorer.max_length,
                                                  scorer.encoder, scorer.truncation)
        return prompt_cut, response_cut
    except ValueError:
        return None


def pairwise_report(r_chosen, r_rejected, n_bins: int = 10) -> tuple[dict[str, float], list[dict]]:
    """Metrics of chosen/rejected scores, and the reliability bins of the Bradley-Terry
    probability sigmoid(r_c - r_r), each pair counted in both orders (label 1 as given, label 0
    swapped) so the diagram is not trivially one-sided."""
    c, r = np.asarray(r_chosen, dtype=np.float64), np.asarray(r_rejected, dtype=np.float64)
    margin = c - r
    p = M.sigmoid(margin)
    probs = np.concatenate([p, 1.0 - p])
    labels = np.concatenate([np.ones_like(p), np.zeros_like(p)])
    scores = np.concatenate([c, r])
    metrics = {
        "pairwise_accuracy": M.pairwise_accuracy(c, r),
        "pairwise_loss": float(np.mean(np.logaddexp(0.0, -margin))),  # -log sigmoid(margin)
        "pairwise_ece": M.expected_calibration_error(probs, labels, n_bins),
        "pairwise_margin_mean": float(margin.mean()),
        "pairwise_reward_mean": float(scores.mean()),
        "pairwise_reward_std": float(scores.std()),
        "n_pairs": float(c.size),
    }
    return metrics, M.reliability_bins(probs, labels, n_bins)


def pairwise_intervals(r_chosen, r_rejected, ev: EvaluationConfig) -> dict[str, float]:
    """Bootstrap intervals of the pairwise accuracy (each pair's credit 1 / 0.5 / 0 resampled) and of
    the mean margin r_c - r_r: on 156 pairs an accuracy is uncertain by several points."""
    kw = dict(n=ev.bootstrap_samples, confidence=ev.confidence, seed=ev.seed)
    margin = np.asarray(r_chosen, dtype=np.float64) - np.asarray(r_rejected, dtype=np.float64)
    out: dict[str, float] = {}
    for name, values in (("pairwise_accuracy", M.pairwise_credit(r_chosen, r_rejected)), ("pairwise_margin_mean", margin)):
        _, out[f"{name}_ci_low"], out[f"{name}_ci_high"] = M.bootstrap_ci(values, **kw)
    return out


def compare_pairwise(rows_a: Sequence[dict], rows_b: Sequence[dict], ev: EvaluationConfig = EvaluationConfig()) -> dict:
    """Two reward models on the same preference pairs (per-pair rows with `key`, `chosen`, `rejected`,
    in any order): each one's pairwise accuracy and mean margin with intervals, and the paired
    bootstrap interval of the differences a - b (pairs resampled, both models on each resampled
    pair, so pair difficulty cancels). Margins are on each model's own reward scale."""
    by = _match_by(rows_a, rows_b)
    b_by_key = {r[by]: r for r in rows_b}
    keys = [r[by] for r in rows_a]
    if len(keys) != len(b_by_key) or any(k not in b_by_key for k in keys):
        raise ValueError("compare_pairwise needs the same pairs on both sides (check with same_rows first)")
    ca = np.array([r["chosen"] for r in rows_a], dtype=np.float64)
    ra = np.array([r["rejected"] for r in rows_a], dtype=np.float64)
    cb = np.array([b_by_key[k]["chosen"] for k in keys], dtype=np.float64)
    rb = np.array([b_by_key[k]["rejected"] for k in keys], dtype=np.float64)
    kw = dict(n=ev.bootstrap_samples, confidence=ev.confidence, seed=ev.seed)
    credit_a, credit_b = M.pairwise_credit(ca, ra), M.pairwise_credit(cb, rb)
    out: dict = {"n_pairs": len(keys), "confidence": ev.confidence,
                 # the discordant pairs are all the difference is made of
                 "pairs_only_a_right": int(np.sum((credit_a == 1) & (credit_b < 1))),
                 "pairs_only_b_right": int(np.sum((credit_b == 1) & (credit_a < 1)))}
    for name, credit, margin in (("a", credit_a, ca - ra), ("b", credit_b, cb - rb)):
        for metric, values in (("pairwise_accuracy", credit), ("pairwise_margin_mean", margin)):
            out[f"{metric}_{name}"], out[f"{metric}_{name}_ci_low"], out[f"{metric}_{name}_ci_high"] = \
                M.bootstrap_ci(values, **kw)
    for metric, a, b in (("pairwise_accuracy", credit_a, credit_b), ("pairwise_margin", ca - ra, cb - rb)):
        out[f"{metric}_diff"], out[f"{metric}_diff_ci_low"], out[f"{metric}_diff_ci_high"] = \
            M.paired_bootstrap_ci(a, b, **kw)
    return out


def pointwise_report(scores, labels, n_bins: int = 10) -> tuple[dict[str, float], list[dict]]:
    """Metrics of thumbs up/down: the score is a logit, sigmoid(score) the probability of 1.
    ROC-AUC needs no threshold; accuracy and balanced accuracy threshold the probability at 0.5
    (for a pairwise-trained RM the score's offset is arbitrary, so read those with care)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    probs = M.sigmoid(s)
    both = bool(y.min() == 0 and y.max() == 1)
    metrics = {
        "roc_auc": M.roc_auc(s, y) if both else float("nan"),
        "balanced_accuracy": M.balanced_accuracy(probs, y, threshold=0.5),
        "accuracy": M.accuracy(probs, y, threshold=0.5),
        "ece": M.expected_calibration_error(probs, y, n_bins),
        # binary cross-entropy from logits, stable for large |s|
        "pointwise_loss": float(np.mean(np.logaddexp(0.0, s) - y * s)),
        "pointwise_reward_mean": float(s.mean()),
        "pointwise_reward_std": float(s.std()),
        "positive_rate": float(y.mean()),
        "n_pointwise": float(s.size),
    }
    return metrics, M.reliability_bins(probs, y, n_bins)


def reward_and_members(scorer, prompts: Sequence[str], responses: Sequence[str]):
    """Scores of (prompt, response) pairs, and for an ensemble also each member's raw scores [members, pairs]."""

    if isinstance(scorer, EnsembleScorer):
        raw = scorer.member_scores(prompts, responses)
        return scorer.combine(raw).numpy(), raw.numpy()
    return scorer.score(prompts, responses).detach().float().cpu().numpy(), None


def ensemble_report(scorer, raw: np.ndarray, view: str, labels=None, n_bins: int = 10) -> dict[str, float]:
    """Each member's metrics alone (`member_i.<metric>`) and `<view>_disagreement`: the mean over
    responses of the members' std (offsets removed, as the aggregate sees them)."""
    out: dict[str, float] = {}
    for i, scores in enumerate(raw):
        if view == "pairwise":
            n = len(scores) // 2
            metrics, _ = pairwise_report(scores[:n], scores[n:], n_bins)
        else:
            metrics, _ = pointwise_report(scores, labels, n_bins)
        out.update({f"member_{i}.{k}": v for k, v in metrics.items() if not k.startswith("n_")})
    out[f"{view}_disagreement"] = float(scorer.spread(torch.as_tensor(raw)).mean())
    out["ensemble_size"] = float(len(raw))
    return out


def _reward_markdown(model_dir: str, objective: str, metrics: dict, skipped: dict, truncated: dict,
                     plots: dict) -> str:
    lines = ["# Reward model evaluation", "", f"Model: `{model_dir}` (objective: {objective}), test split.", ""]
    lines.append(R.markdown_table(["metric", "value"], [[k, v] for k, v in metrics.items()]))
    if any(skipped.values()):
        lines += ["", "Rows longer than the model's max_length were left out: "
                  + ", ".join(f"{view}: {n}" for view, n in skipped.items() if n) + "."]
    if any(n for cut in truncated.values() for n in cut.values()):
        lines += ["", "Rows cut to fit the model's max_length (its truncation setting): "
                  + ", ".join(f"{view}: {cut['prompts']} prompts, {cut['responses']} responses"
                              for view, cut in truncated.items()) + "."]
    lines.append("")
    lines += [f"![{name}]({Path(p).name})" for name, p in plots.items()]
    return "\n".join(lines) + "\n"


def evaluate_reward_model(cfg: PerlConfig, reward_model_dir: str | Path, out_dir: str | Path,
                          split: str = "test", n_bins: int = 10) -> dict[str, float]:
    """Score `split` of every preference view the dataset has (pairwise and/or pointwise) with the
    reward model in `reward_model_dir`; write `reward_eval.{json,md}` and PNG plots into `out_dir`."""

    manifest = read_reward_manifest(reward_model_dir)
    objective = manifest.get("objective") or cfg.reward.objective
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scorer = load_reward_scorer(reward_model_dir, cfg.policy.ensemble_aggregation, cfg.policy.ensemble_lambda,
                                precision=cfg.reward.train.precision)
    max_length = scorer.max_length

    # the objective's own view must exist; the other one is a bonus when the dataset has it
    views = [objective] + [v for v in ("pairwise", "pointwise") if v != objective]
    metrics: dict[str, float] = {}
    skipped: dict[str, int] = {}
    truncated: dict[str, dict[str, int]] = {}
    plots: dict[str, Path] = {}
    row_scores: dict[str, list[dict]] = {}
    for view in views:
        try:
            rows = data_api.load_rows(cfg.data, view, split)
        except UserError:
            if view == objective:
                raise
            continue
        fields = ("chosen", "rejected") if view == "pairwise" else ("response",)
        cuts = [[_cut(scorer, r["prompt"], r[f]) for f in fields] for r in rows]
        numbers = [i + 1 for i, c in enumerate(cuts) if None not in c]
        kept = [rows[i - 1] for i in numbers]
        read = [c for c in cuts if None not in c]
        skipped[view] = len(rows) - len(kept)
        truncated[view] = {"prompts": sum(any(p for p, _ in c) for c in read),
                           "responses": sum(any(r for _, r in c) for c in read)}
        if not kept:
            if view == objective:
                raise UserError(f"{view} {split} split: none of its {len(rows)} rows fits max_length={max_length}")
            continue
        prompts = [r["prompt"] for r in kept]
        if view == "pairwise":
            scores, members = reward_and_members(scorer, prompts + prompts,
                                                 [r["chosen"] for r in kept] + [r["rejected"] for r in kept])
            chosen, rejected = scores[: len(kept)], scores[len(kept):]
            view_metrics, bins = pairwise_report(chosen, rejected, n_bins)
            view_metrics.update(pairwise_intervals(chosen, rejected, cfg.evaluation))
            row_scores["pairwise"] = score_rows(kept, scores, "pairwise", numbers)
            plots["pairwise reliability"] = R.reliability_plot(
                bins, out / "reward_reliability_pairwise.png", "P(chosen > rejected) = sigmoid(r_c - r_r)")
            plots["pairwise scores"] = R.histograms({"chosen": chosen, "rejected": rejected},
                                                    out / "reward_scores_pairwise.png", "RM score by label", "score")
        else:
            labels = [int(r["label"]) for r in kept]
            scores, members = reward_and_members(scorer, prompts, [r["response"] for r in kept])
            view_metrics, bins = pointwise_report(scores, labels, n_bins)
            if 0 < sum(labels) < len(labels):
                _, view_metrics["roc_auc_ci_low"], view_metrics["roc_auc_ci_high"] = M.auc_bootstrap_ci(
                    scores, labels, n=cfg.evaluation.bootstrap_samples, confidence=cfg.evaluation.confidence,
                    seed=cfg.evaluation.seed)
            row_scores["pointwise"] = score_rows(kept, scores, "pointwise", numbers)
            plots["pointwise reliability"] = R.reliability_plot(
                bins, out / "reward_reliability_pointwise.png", "P(label = 1) = sigmoid(score)")
            plots["pointwise scores"] = R.histograms(
                {"label 1 (thumbs up)": scores[np.asarray(labels) == 1],
                 "label 0 (thumbs down)": scores[np.asarray(labels) == 0]},
                out / "reward_scores_pointwise.png", "RM score by label", "score")
        metrics.update(view_metrics)
        if scorer.truncation != "error":
            metrics.update({f"{view}_truncated_{part}": float(n) for part, n in truncated[view].items()})
        if members is not None:
            metrics.update(ensemble_report(scorer, members, view, labels if view == "pointwise" else None, n_bins))

    R.write_json(out / "reward_eval.json", {
        "reward_model": str(reward_model_dir), "objective": objective, "split": split, "metrics": metrics,
        "skipped_too_long": skipped, "truncated": truncated, "truncation": scorer.truncation,
        "plots": {k: p.name for k, p in plots.items()}, "scores": row_scores,
    })
    (out / "reward_eval.md").write_text(_reward_markdown(str(reward_model_dir), objective, metrics, skipped,
                                                         truncated, plots))
    return metrics


EVAL_FILE = "reward_eval.json"
_ROW_FIELDS = {"pairwise": ("chosen", "rejected"), "pointwise": ("label", "score")}


def read_reward_eval(path: str | Path) -> tuple[Path, dict]:
    """A `perl-rlhf eval reward` result: its folder or its reward_eval.json, checked enough that a
    comparison never fails half way with a traceback."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder; expected the --out folder of `perl-rlhf eval reward` "
                        f"(or the {EVAL_FILE} in it)")
    file = path / EVAL_FILE if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{path} has no {EVAL_FILE}: is it the --out folder of `perl-rlhf eval reward`?")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{file} is not valid JSON ({err}); re-run `perl-rlhf eval reward`") from None
    if not isinstance(data, dict) or not isinstance(data.get("scores"), dict):
        raise UserError(f"{file} is not a reward evaluation (no 'scores' object); re-run `perl-rlhf eval reward`")
    for view, rows in data["scores"].items():
        fields = _ROW_FIELDS.get(view)
        if fields is None or not isinstance(rows, list):
            raise UserError(f"{file}: scores.{view} is not a list of pairwise or pointwise rows")
        for i, row in enumerate(rows):
            missing = [f for f in fields if not isinstance(row, dict) or not isinstance(row.get(f), (int, float))]
            if missing or not (row.get("key") or row.get("id") is not None):
                raise UserError(f"{file}: scores.{view}[{i}] lacks {', '.join(missing) or 'a key or id'} "
                                f"(expected {', '.join(fields)} and a row key); re-run `perl-rlhf eval reward`")
    return file, data


def _match_by(rows_a: Sequence[dict], rows_b: Sequence[dict]) -> str:
    """Rows match by their text's `key`; files written before keys existed match by `id`."""
    return "key" if all(r.get("key") for r in (*rows_a, *rows_b)) else "id"


def _row_name(row: dict) -> str:
    parts = [f"row {row['row']}" if row.get("row") else "", f"id {row['id']!r}" if row.get("id") is not None else "",
             f"key {row['key']}" if row.get("key") else ""]
    return ", ".join(p for p in parts if p)


def same_rows(file_a: Path, rows_a: Sequence[dict], file_b: Path, rows_b: Sequence[dict], view: str,
              note: str = "") -> None:
    """Refuse two evaluations that did not score the same rows, naming how many differ and one of them
    (rows match as in :func:`_match_by`); pointwise rows must agree on the label too."""
    by = _match_by(rows_a, rows_b)
    a, b = {r[by]: r for r in rows_a}, {r[by]: r for r in rows_b}
    only_a, only_b = [k for k in a if k not in b], [k for k in b if k not in a]
    what = "pairs" if view == "pairwise" else "rows"
    if len(a) != len(rows_a) or len(b) != len(rows_b):
        raise UserError(f"{file_a if len(a) != len(rows_a) else file_b}: two {view} rows share one {by}; "
                        "re-run `perl-rlhf eval reward` (it keys rows by their text)")
    if only_a or only_b:
        example = a[only_a[0]] if only_a else b[only_b[0]]
        raise UserError(
            f"{file_a} and {file_b} did not score the same {view} {what}: {len(only_a)} of A's {len(a)} are not in B "
            f"and {len(only_b)} of B's {len(b)} are not in A (e.g. {_row_name(example)}, only in "
            f"{'A' if only_a else 'B'}); evaluate both models on the same split of the same data{note}")
    if view == "pointwise":
        differ = [k for k in a if a[k]["label"] != b[k]["label"]]
        if differ:
            raise UserError(f"{file_a} and {file_b} scored the same rows with different labels ({len(differ)} rows, "
                            f"e.g. {_row_name(a[differ[0]])}: {a[differ[0]]['label']} in A, {b[differ[0]]['label']} in B); "
                            "evaluate both models on the same data version")


def compare_pointwise(rows_a: Sequence[dict], rows_b: Sequence[dict], ev: EvaluationConfig = EvaluationConfig()) -> dict:
    """ROC-AUC of two reward models on the same pointwise rows, with the paired, stratified bootstrap
    interval of the difference a - b."""
    by = _match_by(rows_a, rows_b)
    b_by = {r[by]: r for r in rows_b}
    labels = [int(r["label"]) for r in rows_a]
    sa, sb = [r["score"] for r in rows_a], [b_by[r[by]]["score"] for r in rows_a]
    kw = dict(n=ev.bootstrap_samples, confidence=ev.confidence, seed=ev.seed)
    out = {"n": len(labels), "n_negative": labels.count(0), "confidence": ev.confidence}
    for name, scores in (("a", sa), ("b", sb)):
        out[f"roc_auc_{name}"], out[f"roc_auc_{name}_ci_low"], out[f"roc_auc_{name}_ci_high"] = \
            M.auc_bootstrap_ci(scores, labels, **kw)
        out[f"balanced_accuracy_{name}"] = M.balanced_accuracy(M.sigmoid(scores), labels, 0.5)
    out["roc_auc_diff"], out["roc_auc_diff_ci_low"], out["roc_auc_diff_ci_high"] = \
        M.auc_bootstrap_ci(sa, labels, other_scores=sb, **kw)
    return out


def compare_reward_evals(eval_a: str | Path, eval_b: str | Path, ev: EvaluationConfig = EvaluationConfig()) -> dict:
    """Two reward models (LoRA against full tuning) evaluated on the same rows: every view both
    `reward_eval.json` files hold, the objective's view required. Pairwise: accuracy and mean margin
    with the paired bootstrap interval of a - b (:func:`compare_pairwise`); pointwise: ROC-AUC and
    the paired, stratified interval of its difference (:func:`compare_pointwise`)."""
    (file_a, a), (file_b, b) = read_reward_eval(eval_a), read_reward_eval(eval_b)
    obj_a, obj_b = a.get("objective"), b.get("objective")
    if obj_a and obj_b and obj_a != obj_b:
        raise UserError(f"{file_a} evaluates a {obj_a} reward model and {file_b} a {obj_b} one: "
                        "compare two evaluations of the same objective")
    objective = obj_a or obj_b
    views = [v for v in ("pairwise", "pointwise") if a["scores"].get(v) and b["scores"].get(v)]
    if objective and objective not in views:
        lacking = file_a if not a["scores"].get(objective) else file_b
        raise UserError(f"{lacking}: no per-row {objective} scores (re-run `perl-rlhf eval reward` on {objective} data)")
    if not views:
        raise UserError(f"{file_a} and {file_b} share no per-row scores (re-run `perl-rlhf eval reward` for both)")
    skipped = [x.get("skipped_too_long") or {} for x in (a, b)]
    out: dict = {"objective": objective or views[0]}
    for view in views:
        note = "" if not any(s.get(view) for s in skipped) else (
            f" (rows longer than a model's max_length are left out: A skipped {skipped[0].get(view, 0)}, "
            f"B skipped {skipped[1].get(view, 0)})")
        same_rows(file_a, a["scores"][view], file_b, b["scores"][view], view, note)
        if view == "pairwise":
            out.update(compare_pairwise(a["scores"][view], b["scores"][view], ev))
            continue
        labels = {int(r["label"]) for r in a["scores"][view]}
        if labels != {0, 1}:
            if view == objective:
                raise UserError(f"{file_a}: the pointwise rows hold only label {labels.pop()}; ROC-AUC needs both labels")
            continue
        out.update(compare_pointwise(a["scores"][view], b["scores"][view], ev))
    return out
