"""`perl-rlhf report efficiency`: PERL against full tuning, a LoRA rank sweep and TRL, in one report."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from flows.cli_common import ConfigOpt, SetOpt, console, friendly_errors

app = typer.Typer(help="Reports measured on this machine.", no_args_is_help=True)


@app.command("efficiency")
@friendly_errors
def efficiency(
    quick: bool = typer.Option(False, "--quick", help="tiny backbone, a few steps, two ranks: checks the report's shape (CI)"),
    out: Path = typer.Option(Path("reports/efficiency"), "--out", "-o", help="report folder"),
    config: str = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    ranks: Optional[List[int]] = typer.Option(None, "--rank", help="LoRA ranks to sweep (repeatable; default 1 2 4 8 16 32)"),
    trl: bool = typer.Option(True, "--trl/--no-trl", help="measure TRL side by side (needs the bench extra)"),
    engines: bool = typer.Option(False, "--engines", help="RL sampled with generate against a vLLM server (needs `make vllm-env`)"),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="benchmark backbone (default: the benchmarks' scratch:llama-small)"),
    reward_steps: Optional[int] = typer.Option(None, "--reward-steps", help="reward-model steps per setting (rank sweep and TRL too)"),
    reward_batch_size: Optional[int] = typer.Option(None, "--reward-batch-size", help="preference pairs per step"),
    policy_steps: Optional[int] = typer.Option(None, "--policy-steps", help="RL steps per setting (TRL RLOO too)"),
    resume: bool = typer.Option(False, "--resume", help="reuse the parts an interrupted run already saved in --out"),
    saved_only: bool = typer.Option(False, "--saved-only", help="with --resume: measure nothing new, report what was saved"),
) -> None:
    """Run the reward and policy benchmarks, the rank sweep and the TRL comparison; write one Markdown + JSON report."""
    from bench.report import efficiency_report

    report = efficiency_report(out, quick=quick, preset=config, overrides=list(overrides or []), ranks=ranks,
                               with_trl=trl, with_engines=engines, backbone=backbone, reward_steps=reward_steps,
                               reward_batch_size=reward_batch_size, policy_steps=policy_steps,
                               resume="saved-only" if (resume and saved_only) else resume,
                               log=lambda msg: console.print(f"[dim]{msg}[/]"))
    console.print((out / "efficiency_report.md").read_text(), markup=False, highlight=False)
    console.print(f"report: {out / 'efficiency_report.md'} ({report['seconds'] / 60:.1f} min)")
