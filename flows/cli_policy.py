"""`perl-rlhf policy ...`: RL the anchor against a reward model; generate with a policy or anchor."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from flows.cli_common import (ConfigOpt, MetricsFileOpt, SetOpt, check_model_dir, cli_config, console, friendly_errors,
                              metrics_file_log, print_metrics, read_text_file)

app = typer.Typer(help="Policy RL (REINFORCE / RLOO / GRPO, KL to the anchor) with LoRA on one backbone.",
                  no_args_is_help=True)


def _log_line(metrics: dict, step: int) -> None:
    keys = ("rl/reward", "rl/gold_score", "rl/kl", "rl/kl_coef", "rl/response_length", "rl/step_seconds")
    shown = "  ".join(f"{k[3:]} {metrics[k]:.3f}" for k in keys if k in metrics)
    console.print(f"step {step:4d}  {shown}", highlight=False)


@app.command("train")
@friendly_errors
def train(
    config: str = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    anchor: Optional[Path] = typer.Option(None, "--anchor", help="anchor folder (default: <artifacts_dir>/anchor)"),
    reward_model: Optional[Path] = typer.Option(None, "--reward-model",
                                                help="reward-model folder (default: <artifacts_dir>/reward_model)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="policy folder (default: <artifacts_dir>/policy)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint in <out>/checkpoints"),
    every: int = typer.Option(10, "--log-every", help="print metrics every N steps"),
    metrics_file: Optional[Path] = MetricsFileOpt,
) -> None:
    """Train the policy adapter (no tracking; `perl-rlhf run` logs to MLflow)."""
    from perl_core.callbacks import null_samples
    from perl_core.policy.stage import train_policy

    cfg = cli_config(config, overrides)
    root = Path(cfg.artifacts_dir)
    log = metrics_file_log(metrics_file)

    def show(metrics: dict, step: int) -> None:
        if log:
            log(metrics, step)
        if step % every == 0 or step == 1:
            _log_line(metrics, step)

    anchor, reward_model = anchor or root / "anchor", reward_model or root / "reward_model"
    check_model_dir(anchor, "anchor")
    check_model_dir(reward_model, "reward_model")
    result = train_policy(cfg, out or root / "policy", anchor, reward_model, callback=show, resume=resume,
                          samples_callback=log.samples if log else null_samples)
    if log:
        log.result(result.metrics, result.artifacts)
    console.print(f"policy saved to {result.out_dir}")
    print_metrics(result.metrics)


@app.command("generate")
@friendly_errors
def generate(
    model: Path = typer.Option(..., "--model", "-m", help="policy or anchor folder (has manifest.json)"),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help="a prompt (repeatable)"),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts", help="a text file, one prompt per line (\\n escaped)"),
    seed: int = typer.Option(0, "--seed"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="0 decodes greedily"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
) -> None:
    """Print one JSON line {prompt, response} per prompt."""
    from perl_core.errors import UserError
    from perl_core.policy.generation import PolicyGenerator

    prompts = list(prompt or [])
    if prompts_file is not None:
        text = read_text_file(prompts_file, "--prompts")
        prompts += [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError("give at least one --prompt or a --prompts file")
    check_model_dir(model, "anchor", "policy")
    generator = PolicyGenerator.load(model)
    responses = generator.generate(prompts, seed=seed, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p)
    for p, r in zip(prompts, responses):
        typer.echo(json.dumps({"prompt": p, "response": r}))
