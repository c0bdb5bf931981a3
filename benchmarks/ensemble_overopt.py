"""Over-optimisation with one reward model against a reward-model ensemble, measured by the gold oracle.

Coste et al. (ICLR 2024) trained several reward models with different seeds on preferences with
25% of the labels flipped, then ran RL on one of them, on their mean, on their minimum (worst
case) and on mean - lambda * std (uncertainty-weighted): the proxy reward rises in every run, and
the gold reward tells apart a policy that improves from one that exploits its reward model. This
runs that schedule on the embedded default (its gold oracle scores every sampled response):

    anchor (SFT) -> N reward models (seeds reward.train.seed + i, labels flipped with --label-noise)
    RL on: single (member 0 alone: the reward model `reward train` gives) | mean | min | mean_minus_std

and writes, per setting and RL step, the gold score and the proxy reward of the sampled responses
(their mean over the batch; every setting's with the members' offsets removed), the KL to the
anchor and the members' spread, as JSON and one plot. Per setting it also reports

* the peak and the final gold of training: the best and the last `--window` steps' batch means,
  each with a bootstrap interval over those steps (the peak window is chosen as the best one, so
  its mean is an optimistic estimate);
* the final policy on held-out prompts (`perl_core.eval.policy.evaluate_policy`): gold score and
  gold gain over the anchor with bootstrap intervals, RM reward gain, KL;
* with `--cost-steps N`: memory and step time of RL on the ensemble against one reward model, each
  in a fresh process (`bench.policy.policy_workload`), N steps each.

    python benchmarks/ensemble_overopt.py --cost-steps 10     # configs/overopt.yaml, 4 members: about an hour on 2 CPU cores
    python benchmarks/ensemble_overopt.py --quick             # the tiny preset, a few steps: shape only (CI)

Stages already in --work-dir are reused (the anchor, the ensemble), and RL resumes from its checkpoints.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETTINGS = ("single", "mean", "min", "mean_minus_std")
# the held-out evaluation's numbers this report keeps (each with its interval where it has one)
HELDOUT = ("n_prompts", "gold_score_mean", "anchor_gold_score_mean", "gold_gain", "reward_gain", "kl_mean",
           "gold_win_rate", "reward_hacking", "reward_hacking_significant")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="overopt", help="preset or YAML path")
    p.add_argument("--set", action="append", default=[], help="config override, e.g. policy.train.max_steps=300")
    p.add_argument("--members", type=int, default=4, help="reward models in the ensemble")
    p.add_argument("--label-noise", type=float, default=0.25, help="fraction of training preferences flipped")
    p.add_argument("--lambda", dest="lam", type=float, default=None, help="mean_minus_std's lambda "
                   "(default: policy.ensemble_lambda)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--work-dir", default=str(ROOT / "artifacts" / "ensemble_overopt"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ensemble_overopt.json"))
    p.add_argument("--window", type=int, default=20, help="RL steps per peak / final gold window")
    p.add_argument("--cost-steps", type=int, default=0, help="RL steps per cost measurement (0: no cost measurement)")
    p.add_argument("--quick", action="store_true", help="tiny preset, 2 members, a few steps: shape only (CI)")
    return p.parse_args(argv)


def flip_labels(rows: list[dict], fraction: float, seed: int) -> list[dict]:
    """The training rows with a seeded `fraction` of preferences reversed (pairwise: chosen <-> rejected;
    pointwise: label 1 - label): annotators who disagree, as in Coste et al.'s 25% setting."""
    flipped = set(random.Random(f"label-noise:{seed}").sample(range(len(rows)), round(fraction * len(rows))))
    out = []
    for i, row in enumerate(rows):
        if i not in flipped:
            out.append(row)
        elif "chosen" in row:
            out.append({**row, "chosen": row["rejected"], "rejected": row["chosen"]})
        else:
            out.append({**row, "label": 1 - int(row["label"])})
    return out


def run(args) -> dict:
    from perl_core import data as data_api
    from perl_core.artifacts import MANIFEST
    from perl_core.config import load_config
    from perl_core.reward.ensemble import train_reward_ensemble
    from perl_core.eval.policy import evaluate_policy
    from perl_core.policy.stage import train_policy
    from perl_core.sft import train_anchor

    overrides = list(args.set)
    if args.quick:
        args.config, args.members = "tiny", min(args.members, 2)
        overrides = ["sft.train.max_steps=3", "reward.train.max_steps=3", "policy.train.max_steps=2",
                     "policy.train.batch_size=2", "policy.generation.max_new_tokens=6"] + overrides
    overrides.append(f"reward.ensemble.size={args.members}")
    if args.lam is not None:
        overrides.append(f"policy.ensemble_lambda={args.lam}")
    cfg = load_config(args.config, overrides)
    work = Path(args.work_dir)
    data_api.prepare_dataset(cfg)
    started = time.perf_counter()

    anchor = work / "anchor"
    if not (anchor / MANIFEST).exists():
        train_anchor(cfg, anchor, resume=True)
    noisy = flip_labels(data_api.load_rows(cfg.data, cfg.reward.objective, "train"), args.label_noise, cfg.data.seed)
    ensemble = work / "reward_ensemble"
    if not (ensemble / MANIFEST).exists():
        train_reward_ensemble(cfg, ensemble, resume=True, base_model=str(anchor), train_rows=noisy)
    reward_models = json.loads((ensemble / MANIFEST).read_text())

    runs = {}
    for setting in args.settings:
        aggregation = "mean" if setting == "single" else setting
        run_cfg = cfg.model_copy(deep=True)
        run_cfg.policy.ensemble_aggregation = aggregation
        rm = ensemble / "member_0" if setting == "single" else ensemble
        out_dir = work / f"policy_{setting}"
        if not (out_dir / MANIFEST).exists():
            train_policy(run_cfg, out_dir, anchor, rm, callback=step_log(out_dir / "steps.jsonl"), resume=True)
        if not (out_dir / "eval" / "policy_eval.json").exists():
            evaluate_policy(run_cfg, out_dir, anchor, rm, out_dir / "eval")
        heldout = json.loads((out_dir / "eval" / "policy_eval.json").read_text())["metrics"]
        rows = read_steps(out_dir / "steps.jsonl")
        # on the ensemble's scale: member 0's offset off its raw score (RL's normalisation never saw it)
        shift = reward_models["members"][0]["offset"] if setting == "single" else 0.0
        runs[setting] = {
            "reward_model": str(rm), "aggregation": None if setting == "single" else aggregation,
            "step": [s for s, _ in rows], "gold": [m.get("rl/gold_score") for _, m in rows],
            "proxy": [m["rl/reward"] - shift for _, m in rows], "kl": [m["rl/kl"] for _, m in rows],
            "member_std": [m.get("rl/reward_member_std") for _, m in rows]}
        gold = runs[setting]["gold"]
        if gold and all(g is not None for g in gold):
            runs[setting]["gold_peak"] = window_gold(runs[setting]["step"], gold, args.window, cfg, "peak")
            runs[setting]["gold_final"] = window_gold(runs[setting]["step"], gold, args.window, cfg, "final")
        runs[setting]["heldout"] = {k: v for k, v in heldout.items() if k.split("_ci_")[0] in HELDOUT}
    cost = measure_cost(cfg, anchor, ensemble, args.cost_steps) if args.cost_steps else None
    return {"config": args.config, "overrides": overrides, "members": args.members, "label_noise": args.label_noise,
            "ensemble_lambda": cfg.policy.ensemble_lambda, "kl_coef": cfg.policy.kl_coef,
            "reward_models": {"validation": {k: v for k, v in reward_models["metrics"].items()
                                             if k.startswith("validation/")}},
            "seconds": time.perf_counter() - started, "runs": runs, "cost": cost, "window": args.window,
            "quick": args.quick}


def window_gold(steps: list[int], gold: list[float], window: int, cfg, which: str) -> dict:
    """The gold score over `window` consecutive RL steps, the last ones (`final`) or those with the highest
    mean (`peak`), with a bootstrap interval over the steps' batch means."""
    from perl_core.metrics import bootstrap_ci

    window = max(1, min(window, len(gold)))
    starts = range(len(gold) - window + 1)
    start = starts[-1] if which == "final" else max(starts, key=lambda i: sum(gold[i:i + window]))
    mean, low, high = bootstrap_ci(gold[start:start + window], n=cfg.evaluation.bootstrap_samples,
                                   confidence=cfg.evaluation.confidence, seed=cfg.evaluation.seed)
    return {"first_step": steps[start], "last_step": steps[start + window - 1], "mean": mean, "ci_low": low,
            "ci_high": high}


def measure_cost(cfg, anchor: Path, ensemble: Path, steps: int) -> dict:
    """RL on member 0 alone against RL on the whole ensemble (`min`): peak memory and median step time,
    each setting in a fresh process, with the same prompts, batch and generation."""
    from perl_core import data as data_api
    from bench.isolation import peak_memory_mb, ratio, run_isolated

    run_cfg = cfg.model_copy(deep=True)
    run_cfg.policy.train.max_steps = steps
    run_cfg.policy.ensemble_aggregation = "min"
    prompts = data_api.load_prompts(cfg.data, "train")[:256]
    out = {}
    for name, rm in (("single", ensemble / "member_0"), ("ensemble", ensemble)):
        result = run_isolated("bench.policy:policy_workload",
                              {"config": run_cfg.model_dump(mode="json"), "anchor_dir": str(anchor),
                               "reward_model_dir": str(rm), "prompts": prompts})
        out[name] = {"peak_memory_mb": peak_memory_mb(result), "memory": result["memory"],
                     **{k: result[k] for k in ("median_step_seconds", "median_score_seconds", "resident_params")}}
    out["ensemble_over_single"] = {k: ratio(out["ensemble"][k], out["single"][k])
                                   for k in ("peak_memory_mb", "median_step_seconds", "median_score_seconds",
                                             "resident_params")}
    return out


def step_log(path: Path):
    """A callback appending each RL step's metrics to `path`, so an interrupted run's curve survives its resume."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def _cb(metrics: dict[str, float], step: int) -> None:
        with path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    return _cb


def read_steps(path: Path) -> list[tuple[int, dict]]:
    """(step, metrics) in step order; a step run again after a resume keeps its latest metrics."""
    by_step = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(line)
        by_step[row.pop("step")] = row
    return sorted(by_step.items())


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` steps: one batch's gold score is noisy."""
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (gold_ax, proxy_ax, kl_ax) = plt.subplots(1, 3, figsize=(15, 4))
    window = max(1, max((len(r["step"]) for r in report["runs"].values()), default=1) // 20)
    for name, r in report["runs"].items():
        if all(g is not None for g in r["gold"]):
            gold_ax.plot(r["step"], smooth(r["gold"], window), label=name)
            kl_ax.plot(smooth(r["kl"], window), smooth(r["gold"], window), label=name)
        proxy_ax.plot(r["step"], smooth(r["proxy"], window), label=name)
    gold_ax.set(title="gold oracle (sampled responses)", xlabel="RL step", ylabel="gold score")
    proxy_ax.set(title="proxy reward optimised", xlabel="RL step", ylabel="reward (offsets removed)")
    kl_ax.set(title="gold against KL to the anchor", xlabel="KL (nats per response)", ylabel="gold score")
    for ax in (gold_ax, proxy_ax, kl_ax):
        ax.legend()
    fig.suptitle(f"{report['members']} reward models, {report['label_noise']:.0%} labels flipped, "
                 f"kl_coef {report['kl_coef']}; trailing mean over {window} steps")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report["plot"] = str(plot(report, out.with_suffix(".png")))
    out.write_text(json.dumps(report, indent=2))
    for name, r in report["runs"].items():
        line = f"{name:16s}"
        for which in ("gold_peak", "gold_final"):
            if which in r:
                w = r[which]
                line += (f"  {which} {w['mean']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}] "
                         f"(steps {w['first_step']}-{w['last_step']})")
        h = r["heldout"]
        if "gold_gain" in h:
            line += (f"  held-out gold {h['gold_score_mean']:.3f}, gain {h['gold_gain']:+.3f} "
                     f"[{h['gold_gain_ci_low']:+.3f}, {h['gold_gain_ci_high']:+.3f}]")
        print(line + f"  RM gain {h['reward_gain']:+.3f}  KL {h['kl_mean']:.2f}")
    if report["cost"]:
        print("ensemble / single: " + ", ".join(f"{k} {v:.2f}x" for k, v in report["cost"]["ensemble_over_single"].items()))
    print(f"wrote {out} and {report['plot']}")
    return report


if __name__ == "__main__":
    main()
