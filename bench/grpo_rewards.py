"""GRPO against RLOO, and the gold rubric (a verifiable reward) against the learned reward model, on the
embedded default: one anchor and one reward model, then RL runs that differ in one setting, every seed.

Each run trains a policy (`train_policy`) and evaluates it against the anchor on the same held-out
prompts (`evaluate_policy`: gold gain with its paired interval, KL). Runs of two settings with the
same seed are paired prompt by prompt; the interval of their difference is a paired bootstrap over
every (seed, prompt) pair. Every run's result is saved as it finishes, so an interrupted benchmark
continues where it stopped (`--budget-s` stops it between runs).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

GOLD = '{function: "perl_core.policy.rewards:gold_rubric"}'
# what each setting adds to the preset (the runs' only difference)
SETTINGS: dict[str, list[str]] = {
    "rloo": [],
    "grpo": ["policy.algorithm=grpo", "policy.loss_type=dapo", "policy.train.updates_per_batch=2"],
    "grpo_gold": ["policy.algorithm=grpo", "policy.loss_type=dapo", "policy.train.updates_per_batch=2",
                  f"policy.rewards=[{GOLD}]"],
    "grpo_mix": ["policy.algorithm=grpo", "policy.loss_type=dapo", "policy.train.updates_per_batch=2",
                 f"policy.rewards=[{{weight: 1.0}}, {GOLD}]"],
}
# the pairs the report compares: (setting, against)
PAIRS = [("grpo", "rloo"), ("grpo_gold", "grpo"), ("grpo_mix", "grpo"), ("grpo_mix", "grpo_gold")]


def _config(preset: str, overrides: Sequence[str]):
    from perl_core.config import load_config

    # every held-out prompt's gold in the evaluation's table: the paired comparison reads them
    return load_config(preset, list(overrides) + ["evaluation.n_samples_table=100000"])


def base_models(work: Path, preset: str, overrides: Sequence[str], log: Callable[[str], None]) -> tuple[Path, Path]:
    """The anchor and the reward model every run shares (trained once, kept in `work`)."""
    from perl_core.data import prepare_dataset
    from perl_core.reward.train import train_reward_model
    from perl_core.sft import train_anchor

    cfg = _config(preset, overrides)
    prepare_dataset(cfg)
    anchor, rm = work / "anchor", work / "reward_model"
    if not (anchor / "manifest.json").exists():
        log("training the anchor")
        train_anchor(cfg, anchor)
    if not (rm / "manifest.json").exists():
        log("training the reward model")
        train_reward_model(cfg, rm, base_model=str(anchor))
    return anchor, rm


def run_setting(work: Path, name: str, seed: int, preset: str, overrides: Sequence[str]) -> dict:
    """Train and evaluate one policy; its summary, with every held-out prompt's gold, saved in `work/runs`."""
    from perl_core.eval.policy import evaluate_policy
    from perl_core.policy.stage import train_policy

    out = work / "runs" / f"{name}-seed{seed}.json"
    if out.exists():
        return json.loads(out.read_text())
    cfg = _config(preset, list(overrides) + SETTINGS[name] + [f"policy.train.seed={seed}"])
    folder = work / "policies" / f"{name}-seed{seed}"
    started = time.perf_counter()
    trained = train_policy(cfg, folder, work / "anchor", work / "reward_model")
    seconds = time.perf_counter() - started
    metrics = evaluate_policy(cfg, folder, work / "anchor", work / "reward_model", folder / "eval")
    table = json.loads((folder / "eval" / "policy_eval.json").read_text())["samples"]
    result = {"setting": name, "seed": seed, "overrides": SETTINGS[name], "train_seconds": seconds,
              "train": {k: v for k, v in trained.metrics.items() if k.startswith("final_")},
              "eval": {k: metrics[k] for k in sorted(metrics) if k.startswith(("gold", "anchor_gold", "kl",
                                                                               "reward_gain"))},
              "prompts": [row["prompt"] for row in table], "policy_gold": [row["policy_gold"] for row in table],
              "anchor_gold": [row["anchor_gold"] for row in table]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


def paired(a: list[dict], b: list[dict]) -> Optional[dict]:
    """Gold of `a` minus gold of `b` over every (seed, prompt) both have: mean and 95 % paired bootstrap."""
    from perl_core.metrics import paired_bootstrap_ci

    by_seed = {r["seed"]: r for r in b}
    x, y = [], []
    for r in a:
        other = by_seed.get(r["seed"])
        if other is None:
            continue
        assert r["prompts"] == other["prompts"], "the runs were evaluated on other prompts"
        x += r["policy_gold"]
        y += other["policy_gold"]
    if not x:
        return None
    mean, low, high = paired_bootstrap_ci(x, y)
    return {"gold_difference": mean, "ci_low": low, "ci_high": high, "seeds": sorted(by_seed.keys() & {r["seed"] for r in a})}


def summary(runs: list[dict]) -> dict:
    """Per setting: the mean over its seeds of held-out gold gain and KL; per pair: the paired difference."""
    import numpy as np

    settings = {}
    for name in SETTINGS:
        mine = [r for r in runs if r["setting"] == name]
        if mine:
            settings[name] = {
                "seeds": [r["seed"] for r in mine],
                "gold": float(np.mean([r["eval"]["gold_score_mean"] for r in mine])),
                "anchor_gold": float(np.mean([r["eval"]["anchor_gold_score_mean"] for r in mine])),
                "gold_gain": float(np.mean([r["eval"]["gold_gain"] for r in mine])),
                "gold_gain_per_seed": [round(r["eval"]["gold_gain"], 4) for r in mine],
                "kl": float(np.mean([r["eval"]["kl_mean"] for r in mine])) if "kl_mean" in mine[0]["eval"] else None,
                "train_seconds": float(np.mean([r["train_seconds"] for r in mine]))}
    pairs = {f"{a} - {b}": paired([r for r in runs if r["setting"] == a], [r for r in runs if r["setting"] == b])
             for a, b in PAIRS}
    return {"settings": settings, "pairs": {k: v for k, v in pairs.items() if v is not None}}


def grpo_rewards_benchmark(work: Path, seeds: Sequence[int], names: Sequence[str], preset: str = "default",
                           overrides: Sequence[str] = (), budget_s: Optional[float] = None,
                           log: Callable[[str], None] = print) -> dict:
    """Every (setting, seed) not yet saved, until `budget_s` seconds have passed; then the summary of all saved."""
    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    base_models(work, preset, overrides, log)
    for seed in seeds:
        for name in names:
            if budget_s is not None and time.perf_counter() - started > budget_s:
                log("budget spent: run again to continue")
                break
            if not (work / "runs" / f"{name}-seed{seed}.json").exists():
                log(f"{name}, seed {seed}")
                r = run_setting(work, name, seed, preset, overrides)
                log(f"  gold gain {r['eval']['gold_gain']:+.3f}, KL {r['eval'].get('kl_mean', float('nan')):.2f}, "
                    f"{r['train_seconds']:.0f} s")
    runs = [json.loads(p.read_text()) for p in sorted((work / "runs").glob("*.json"))] \
        if (work / "runs").exists() else []
    return {"preset": preset, "overrides": list(overrides), "runs": len(runs), **summary(runs)}
