"""`perl-rlhf reward ...`: train a reward model, score (prompt, response) pairs with one."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from flows.cli_common import (ConfigOpt, MetricsFileOpt, SetOpt, check_model_dir, cli_config, console, friendly_errors,
                              metrics_file_log, print_metrics)

app = typer.Typer(help="Reward models: LoRA or full, pairwise (Bradley-Terry) or pointwise (thumbs up/down).",
                  no_args_is_help=True)


@app.command("train")
@friendly_errors
def train(
    config: str = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="artifact folder (default: <artifacts_dir>/reward_model)"),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="anchor folder to initialise from (with reward.init_from_anchor)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint in <out>/checkpoints"),
    metrics_file: Optional[Path] = MetricsFileOpt,
) -> None:
    """Train a reward model on the configured data (no tracking; `perl-rlhf run` logs to MLflow).

    With `--set reward.ensemble.size=N`, N reward models (seeds reward.train.seed + i) in one folder."""
    from perl_core.callbacks import null_callback
    from perl_core.reward.stage import train_reward_stage

    cfg = cli_config(config, overrides)
    if base_model is not None:
        check_model_dir(Path(base_model), "anchor")
    out_dir = out or Path(cfg.artifacts_dir) / "reward_model"
    log = metrics_file_log(metrics_file)
    result = train_reward_stage(cfg, out_dir, callback=log or null_callback, resume=resume, base_model=base_model)
    if log:
        log.result(result.metrics, result.artifacts)
    what = "reward model" if cfg.reward.ensemble.size is None else f"ensemble of {cfg.reward.ensemble.size} reward models"
    console.print(f"{what} saved to {result.out_dir}")
    print_metrics(result.metrics)


@app.command("score")
@friendly_errors
def score(
    model: Path = typer.Option(..., "--model", "-m", help="reward-model or ensemble folder (has manifest.json)"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="one prompt (with --response)"),
    response: Optional[str] = typer.Option(None, "--response", help="one response to score"),
    jsonl: Optional[Path] = typer.Option(None, "--jsonl", help="file of {prompt, response} rows; prints one JSON row each with `reward`"),
    batch_size: int = typer.Option(32, "--batch-size"),
) -> None:
    """Score one (prompt, response) or every row of a JSONL file (an ensemble: the default
    policy.ensemble_aggregation of its members, and in JSONL their spread as `member_std`)."""
    from perl_core.data.local import read_jsonl
    from perl_core.data.schema import Reject
    from perl_core.reward.ensemble import EnsembleScorer
    from perl_core.reward.stage import load_reward_scorer
    from perl_core.errors import DataError, UserError

    if jsonl is None and (prompt is None or response is None):
        raise UserError("give --prompt and --response, or --jsonl FILE")
    if jsonl is not None:
        if not jsonl.is_file():
            raise UserError(f"--jsonl {jsonl} " + ("is a folder, not a file" if jsonl.exists() else "does not exist"))
        rows = []
        for item in read_jsonl(jsonl):
            if isinstance(item, Reject):
                raise item.as_error()
            i, row = item
            if not isinstance(row, dict):
                raise DataError(f"expected an object with prompt and response, got {type(row).__name__}",
                                file=str(jsonl), row=i)
            for key in ("prompt", "response"):
                if not isinstance(row.get(key), str):
                    raise DataError(f"needs a string {key!r}", file=str(jsonl), row=i, field=key)
            rows.append(row)
    else:
        rows = [{"prompt": prompt, "response": response}]
    check_model_dir(model, "reward_model")
    scorer = load_reward_scorer(model)
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    spread = None
    if isinstance(scorer, EnsembleScorer):
        rewards, spread = scorer.score_and_spread(prompts, responses, batch_size=batch_size)
        spread = spread.tolist()
    else:
        rewards = scorer.score(prompts, responses, batch_size=batch_size)
    if jsonl is None:
        typer.echo(f"{float(rewards[0]):.6f}")
        return
    for i, (row, reward) in enumerate(zip(rows, rewards.tolist())):
        typer.echo(json.dumps({**row, "reward": reward} | ({"member_std": spread[i]} if spread else {})))
