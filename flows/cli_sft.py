"""`perl-rlhf sft ...`: train the anchor policy (supervised fine-tuning on the `sft` view)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from flows.cli_common import (ConfigOpt, MetricsFileOpt, SetOpt, cli_config, console, friendly_errors, metrics_file_log,
                              print_metrics)

app = typer.Typer(help="The anchor policy: SFT on the data's `sft` view (full or LoRA, saved merged).",
                  no_args_is_help=True)


@app.command("train")
@friendly_errors
def train(
    config: str = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="anchor folder (default: <artifacts_dir>/anchor)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint in <out>/checkpoints"),
    every: int = typer.Option(50, "--log-every", help="print the loss every N steps"),
    metrics_file: Optional[Path] = MetricsFileOpt,
) -> None:
    """Train the anchor (no tracking; `perl-rlhf run` logs to MLflow)."""
    from perl_core.sft import train_anchor

    cfg = cli_config(config, overrides)
    log = metrics_file_log(metrics_file)

    def show(metrics: dict, step: int) -> None:
        if log:
            log(metrics, step)
        shown = {k: v for k, v in metrics.items() if k in ("train/loss", "eval/loss", "train/step_seconds")}
        if shown and (step % every == 0 or "eval/loss" in shown):
            console.print(f"step {step:4d}  " + "  ".join(f"{k} {v:.4f}" for k, v in shown.items()), highlight=False)

    result = train_anchor(cfg, out or Path(cfg.artifacts_dir) / "anchor", callback=show, resume=resume)
    if log:
        log.result(result.metrics, result.artifacts)
    console.print(f"anchor saved to {result.out_dir}")
    print_metrics(result.metrics)
