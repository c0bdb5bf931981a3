"""`perl-rlhf eval ...`: evaluate a reward model on the test split, or a policy against its anchor."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from flows.cli_common import ConfigOpt, SetOpt, check_model_dir, cli_config, console, friendly_errors, print_metrics

app = typer.Typer(help="Evaluate trained models; writes JSON, Markdown and PNG into --out.", no_args_is_help=True)


def _print(metrics: dict, out: Path, report: str) -> None:
    print_metrics(metrics)
    console.print(f"report: {out / report}")


@app.command("reward")
@friendly_errors
def reward(
    model: Path = typer.Option(..., "--model", "-m", help="reward-model folder (has manifest.json)"),
    config: str = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="report folder (default: <artifacts_dir>/eval/reward_model)"),
    split: str = typer.Option("test", "--split", help="which split to score"),
) -> None:
    """Reward-model metrics on the test split, a reliability diagram and score histograms by label."""
    from perl_core.eval.reward import evaluate_reward_model

    cfg = cli_config(config, overrides)
    check_model_dir(model, "reward_model")
    out_dir = out or Path(cfg.artifacts_dir) / "eval" / "reward_model"
    _print(evaluate_reward_model(cfg, model, out_dir, split=split), out_dir, "reward_eval.md")


@app.command("policy")
@friendly_errors
def policy(
    policy_dir: Path = typer.Option(..., "--policy", help="policy folder (has manifest.json)"),
    anchor: Path = typer.Option(..., "--anchor", help="anchor (SFT) folder"),
    reward_model: Path = typer.Option(..., "--reward-model", help="reward-model folder that scores both"),
    config: str = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="report folder (default: <artifacts_dir>/eval/policy)"),
    split: str = typer.Option("test", "--split", help="which split's prompts to sample"),
) -> None:
    """Policy against its anchor on held-out prompts: RM reward with CIs, win rate, KL, gold oracle, samples."""
    from perl_core.eval.policy import evaluate_policy

    cfg = cli_config(config, overrides)
    for folder, kind in ((policy_dir, "policy"), (anchor, "anchor"), (reward_model, "reward_model")):
        check_model_dir(folder, kind)
    out_dir = out or Path(cfg.artifacts_dir) / "eval" / "policy"
    _print(evaluate_policy(cfg, policy_dir, anchor, reward_model, out_dir, split=split), out_dir, "policy_eval.md")


@app.command("compare-reward")
@friendly_errors
def compare_reward(
    a: Path = typer.Argument(..., help="reward_eval.json (or its folder) of model A, e.g. LoRA"),
    b: Path = typer.Argument(..., help="reward_eval.json (or its folder) of model B, e.g. full tuning"),
    config: str = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
) -> None:
    """Two reward models on the same test rows: pairwise accuracy and margin (pairwise data), ROC-AUC
    (pointwise data), each with the paired bootstrap interval of A - B."""
    from perl_core.eval.reward import compare_reward_evals

    cfg = cli_config(config, overrides)
    out = compare_reward_evals(a, b, cfg.evaluation)
    print_metrics(out)
    pct = f"{out['confidence']:.0%}"
    for name, n in (("pairwise_accuracy", "n_pairs"), ("roc_auc", "n")):
        if f"{name}_diff" in out:
            console.print(f"{name} A - B: {out[f'{name}_diff']:+.4f}, {pct} paired bootstrap interval "
                          f"[{out[f'{name}_diff_ci_low']:+.4f}, {out[f'{name}_diff_ci_high']:+.4f}] on {out[n]} "
                          f"{'pairs' if n == 'n_pairs' else 'rows'}")
