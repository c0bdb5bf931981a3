"""`perl-rlhf run`, `perl-rlhf serve`, `perl-rlhf registry list|promote|rollback`."""
from __future__ import annotations

import functools
import os
import sys
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from flows.cli_common import ConfigOpt, SetOpt, cli_config, friendly_errors
from perl_core.errors import UserError

out = Console(width=None if sys.stdout.isatty() else 120)
registry_app = typer.Typer(help="The MLflow model registry: versions, aliases, promotion gate, rollback.",
                           no_args_is_help=True)


def _prefect_defaults() -> None:
    """Before Prefect is imported: the ephemeral server's first start (fresh PREFECT_HOME, migrations)
    can take longer than Prefect's 20 s default on a busy 2-core box; no telemetry (offline)."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


# ---------------------------------------------------------------- run
@friendly_errors
def run(config: str = ConfigOpt, overrides: Optional[List[str]] = SetOpt) -> None:
    """Run the whole pipeline (data, anchor, reward model, policy, evaluation, registry) on the embedded default."""
    _prefect_defaults()
    from flows import tracking
    from flows.pipeline import perl_pipeline

    cfg = cli_config(config, overrides)
    tracking.check_servers(cfg)  # before Prefect starts and before any training
    summary = perl_pipeline(cfg)
    print_summary(summary, cfg)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def print_summary(summary: dict, cfg) -> None:
    dv = summary["data_version"]
    stages = Table(title="PERL pipeline", show_lines=False)
    for col in ("stage", "status", "key", "output"):
        stages.add_column(col)
    for name, s in summary["stages"].items():
        stages.add_row(name, "cached (skipped)" if s["cached"] else "ran", s["key"] or "-", s["out_dir"] or "-")
    out.print(stages)
    out.print(f"data version: md5 [bold]{dv.get('md5')}[/] at git {dv.get('git_rev')} "
              f"(working copy matches data.dvc: {dv.get('matches_working_copy')})")

    m = summary["metrics"]
    rm = Table(title="reward model (test split)")
    rm.add_column("metric")
    rm.add_column("value", justify="right")
    for k, v in m.items():
        # an ensemble's members are in the evaluation report and MLflow; the table keeps the aggregate
        if k.startswith("reward.") and not k.endswith(("_ci_low", "_ci_high")) and not k.startswith("reward.member_"):
            rm.add_row(k.split(".", 1)[1], _fmt(v))
    out.print(rm)

    pol = Table(title="policy vs anchor (held-out prompts)")
    for col in ("", "policy", "anchor", "gain [CI]"):
        pol.add_column(col, justify="right")
    for label, p, a, g in (("RM reward", "reward_mean", "anchor_reward_mean", "reward_gain"),
                           ("gold score", "gold_score_mean", "anchor_gold_score_mean", "gold_gain")):
        if f"policy.{p}" in m:
            gain = f"{_fmt(m.get(f'policy.{g}'))} [{_fmt(m.get(f'policy.{g}_ci_low'))}, {_fmt(m.get(f'policy.{g}_ci_high'))}]"
            pol.add_row(label, _fmt(m.get(f"policy.{p}")), _fmt(m.get(f"policy.{a}")), gain)
    for label, key in (("win rate vs anchor", "win_rate"), ("KL(policy||anchor) nats", "kl_mean")):
        if f"policy.{key}" in m:
            pol.add_row(label, _fmt(m[f"policy.{key}"]), "", "")
    out.print(pol)

    reg = summary["registry"]
    verdict = "[green]promoted to champion[/]" if reg["promoted"] else "[yellow]not promoted[/]"
    out.print(f"registry: reward model v{reg['reward_model_version']}, policy v{reg['policy_version']}: {verdict}")
    out.print(f"  gate: {reg['reason']}")
    _print_registry(cfg)
    uri = summary["tracking_uri"]
    out.print(f"\nMLflow run {summary['run_id']} in {uri}")
    if uri.startswith("sqlite:///"):
        out.print(f"  open the MLflow UI:  mlflow ui --backend-store-uri {uri}   (then http://127.0.0.1:5000)")
    else:
        out.print(f"  open the MLflow UI:  {uri}")
    api = os.environ.get("PREFECT_API_URL")
    out.print(f"  open the Prefect UI: {api.rsplit('/api', 1)[0] if api else 'prefect server start   (then http://127.0.0.1:4200)'}")


def _print_registry(cfg) -> None:
    from flows import registry

    t = cfg.tracking
    table = Table(title="model registry")
    for col in ("model", "version", "aliases", t.promotion_metric, "data version (md5)"):
        table.add_column(col)
    for name in (t.reward_model_name, t.policy_name):
        for v in registry.list_versions(name):
            table.add_row(name, v["version"], ",".join(v["aliases"]) or "-", _fmt(v["metrics"].get(t.promotion_metric)),
                          str(v["tags"].get("perl.data_version", "-"))[:12])
    out.print(table)


# ---------------------------------------------------------------- serve
@friendly_errors
def serve(config: str = ConfigOpt, overrides: Optional[List[str]] = SetOpt,
          cron: str = typer.Option("0 3 * * *", help="schedule (cron, UTC)"),
          name: str = typer.Option("perl-scheduled", help="deployment name")) -> None:
    """Serve the pipeline deployment on its schedule (this process runs the scheduled flow runs)."""
    _prefect_defaults()
    from flows import tracking
    from flows.pipeline import perl_pipeline

    cfg = cli_config(config, overrides)
    if not os.environ.get("PREFECT_API_URL"):
        raise UserError("perl-rlhf serve needs a Prefect server to run its schedule (the ephemeral mode has no "
                        "scheduler): start one with `prefect server start`, then set "
                        "PREFECT_API_URL=http://127.0.0.1:4200/api")
    tracking.check_servers(cfg)
    out.print(f"serving deployment [bold]perl-pipeline/{name}[/] on cron {cron!r}; Ctrl-C to stop")
    # one run at a time, as prefect.yaml's deployments: a run that outlasts its interval holds the next one
    perl_pipeline.serve(name=name, cron=cron, parameters={"cfg": cfg.model_dump(mode="json")},
                        tags=["perl", cfg.preset], description="PERL pipeline; promotes only through the gate",
                        concurrency_limit=1)


# ---------------------------------------------------------------- registry
def _registry_errors(fn):
    """What the registry commands ask MLflow about is the user's to fix (a version that does not exist,
    nothing registered yet, a store that is not an MLflow database): one line, not MLflow's traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import mlflow
        from mlflow.exceptions import MlflowException
        from sqlalchemy.exc import SQLAlchemyError

        try:
            return fn(*args, **kwargs)
        except MlflowException as err:
            raise UserError(f"model registry at {mlflow.get_tracking_uri()}: {err.message}") from None
        except SQLAlchemyError as err:
            reason = getattr(err, "orig", None) or err
            raise UserError(f"MLflow store {mlflow.get_tracking_uri()} cannot be read: {reason}") from None

    return wrapper


def _tracking_cfg(config: str, overrides):
    from flows import tracking

    cfg = cli_config(config, overrides)
    tracking.setup(cfg)
    return cfg


@registry_app.command("list")
@friendly_errors
@_registry_errors
def registry_list(config: str = ConfigOpt, overrides: Optional[List[str]] = SetOpt) -> None:
    """Versions of the reward model and the policy, with aliases and the promotion metric."""
    cfg = _tracking_cfg(config, overrides)
    _print_registry(cfg)


@registry_app.command("promote")
@friendly_errors
@_registry_errors
def registry_promote(version: str = typer.Argument(..., help="policy version to promote"),
                     force: bool = typer.Option(False, "--force", help="skip the gate (manual override, recorded)"),
                     config: str = ConfigOpt, overrides: Optional[List[str]] = SetOpt) -> None:
    """Promote a policy version (and the reward model it was trained against) through the gate."""
    from flows import registry

    cfg = _tracking_cfg(config, overrides)
    t = cfg.tracking
    decision = registry.promotion_gate(t.policy_name, version, t.promotion_metric, t.promotion_mode)
    if decision.promoted or force:
        reason = decision.reason if decision.promoted else f"forced by hand over the gate ({decision.reason})"
        rm = registry.promote_pair(t.policy_name, t.reward_model_name, version, reason)
        out.print(f"[green]champion[/]: {t.policy_name} v{version}" + (f", {t.reward_model_name} v{rm}" if rm else ""))
        out.print(f"  {reason}")
    else:
        out.print(f"[yellow]not promoted[/]: {decision.reason}")
        raise typer.Exit(1)


@registry_app.command("rollback")
@friendly_errors
@_registry_errors
def registry_rollback(config: str = ConfigOpt, overrides: Optional[List[str]] = SetOpt) -> None:
    """Move `champion` back to the previous champion (policy and its reward model)."""
    from flows import registry

    cfg = _tracking_cfg(config, overrides)
    t = cfg.tracking
    was, now = registry.rollback(t.policy_name, t.reward_model_name)
    paired = registry.alias_version(t.reward_model_name, "champion")
    out.print(f"rolled back {t.policy_name}: champion v{was} -> v{now}"
              + (f"; {t.reward_model_name} champion is v{paired}" if paired else ""))
