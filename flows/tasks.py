"""Prefect tasks: each wraps one perl_core function and knows nothing else.

Caching: a task's cache key is the stage key the flow computes (data version + the stage's
config sections + the code version + the keys of the stages it reads), results are persisted
as JSON (never pickled) under PREFECT_HOME, and a stage whose output folder has gone is
recomputed (the flow passes `refresh_cache`). Every output folder is named by its key, so a
cached result always points at the folder it describes.

Retries: only transient failures (network, I/O timeouts) retry, with exponential backoff; a
`UserError`/`ConfigError`/`ValidationError` (bad input) fails at once.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import httpx
from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.tasks import exponential_backoff

from flows import launch
from perl_core.callbacks import MetricsCallback, SamplesCallback, null_callback, null_samples
from perl_core.config import PerlConfig

# ---------------------------------------------------------------- retries and caching
def _transient_types() -> tuple[type, ...]:
    import requests

    return (ConnectionError, TimeoutError, httpx.TransportError,
            requests.exceptions.ConnectionError, requests.exceptions.Timeout)


def transient_only(task, task_run, state) -> bool:
    """`retry_condition_fn`: retry network/timeouts; bad input, bugs and NaNs fail at once."""
    try:
        state.result()
    except _transient_types():
        return True
    except BaseException:
        return False
    return False


def stage_cache_key(context, parameters: dict[str, Any]) -> str:
    return f"perl-{context.task.name}-{parameters['key']}"


RETRIES = dict(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_jitter_factor=0.5,
               retry_condition_fn=transient_only)
CACHED = dict(cache_key_fn=stage_cache_key, persist_result=True, result_serializer="json", **RETRIES)


def _numbers(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def _as_dict(result, key: str, run_id: str, **extra: Any) -> dict:
    return {"key": key, "out_dir": str(result.out_dir), "metrics": _numbers(result.metrics),
            "artifacts": {k: str(v) for k, v in (result.artifacts or {}).items()}, "produced_by_run": run_id, **extra}


def with_progress(callback: MetricsCallback, stage: str, total_steps: int) -> MetricsCallback:
    """Feed the perl_core callback to MLflow (`callback`) and to a Prefect progress artifact."""
    artifact_id = create_progress_artifact(progress=0.0, key=f"{stage.replace('_', '-')}-progress",
                                           description=f"{stage}: optimizer steps done (%)")
    shown = [0.0]

    def _cb(metrics: dict[str, float], step: int) -> None:
        callback(metrics, step)
        pct = min(100.0, 100.0 * step / max(1, total_steps))
        if artifact_id is not None and (pct - shown[0] >= 5.0 or (pct >= 100.0 > shown[0])):
            update_progress_artifact(artifact_id, pct)
            shown[0] = pct

    return _cb


# ---------------------------------------------------------------- the stages
# Each task imports its perl_core function when it runs: the CLI starts without loading torch,
# and a test stands in for a stage by patching that function where it is defined. With
# launch.num_processes > 1 a training task runs its stage under `accelerate launch` instead (flows/launch.py).
@task(name="prepare_data", **CACHED)
def prepare_data(cfg: PerlConfig, key: str, run_id: str = "") -> dict:
    from perl_core.data import prepare_dataset
    from perl_core.data.versioning import data_version

    result = prepare_dataset(cfg)
    version = data_version(".")
    return _as_dict(result, key, run_id, data_version=version)


@task(name="train_anchor", **CACHED)
def train_anchor(cfg: PerlConfig, key: str, out_dir: str, run_id: str = "",
                 callback: MetricsCallback = null_callback) -> dict:
    cb = with_progress(callback, "anchor", cfg.sft.train.max_steps)
    if launch.launched(cfg):
        result = launch.run_stage(cfg, "anchor", out_dir, cb)
    else:
        from perl_core.sft import train_anchor as run

        result = run(cfg, out_dir, callback=cb, resume=True)
    return _as_dict(result, key, run_id)


@task(name="train_reward_model", **CACHED)
def train_reward_model(cfg: PerlConfig, key: str, out_dir: str, base_model: str | None = None, run_id: str = "",
                       callback: MetricsCallback = null_callback) -> dict:
    cb = with_progress(callback, "reward_model", cfg.reward.train.max_steps * (cfg.reward.ensemble.size or 1))
    if launch.launched(cfg):
        result = launch.run_stage(cfg, "reward_model", out_dir, cb,
                                  stage_args=("--base-model", str(base_model)) if base_model else ())
    else:
        from perl_core.reward.stage import train_reward_stage  # one reward model or an ensemble

        result = train_reward_stage(cfg, out_dir, callback=cb, resume=True, base_model=base_model)
    return _as_dict(result, key, run_id)


@task(name="train_policy", **CACHED)
def train_policy(cfg: PerlConfig, key: str, out_dir: str, anchor_dir: str, reward_model_dir: str, run_id: str = "",
                 callback: MetricsCallback = null_callback, samples_callback: SamplesCallback = null_samples) -> dict:
    cb = with_progress(callback, "policy", cfg.policy.train.max_steps)
    if launch.launched(cfg):
        result = launch.run_stage(cfg, "policy", out_dir, cb, samples_callback,
                                  stage_args=("--anchor", str(anchor_dir), "--reward-model", str(reward_model_dir)))
    else:
        from perl_core.policy.stage import train_policy as run

        result = run(cfg, out_dir, anchor_dir, reward_model_dir, callback=cb, resume=True,
                     samples_callback=samples_callback)
    return _as_dict(result, key, run_id)


@task(name="evaluate", **CACHED)
def evaluate(cfg: PerlConfig, key: str, out_dir: str, policy_dir: str, anchor_dir: str, reward_model_dir: str,
             run_id: str = "") -> dict:
    """Reward-model metrics (`reward.*`) and policy vs anchor (`policy.*`); reports and plots in `out_dir`."""
    from perl_core.eval.policy import evaluate_policy
    from perl_core.eval.reward import evaluate_reward_model

    out = Path(out_dir)
    reward = evaluate_reward_model(cfg, reward_model_dir, out / "reward_model")
    policy = evaluate_policy(cfg, policy_dir, anchor_dir, reward_model_dir, out / "policy")
    metrics = {**{f"reward.{k}": v for k, v in _numbers(reward).items()},
               **{f"policy.{k}": v for k, v in _numbers(policy).items()}}
    reports = {p.relative_to(out).as_posix(): str(p) for p in sorted(out.rglob("*")) if p.suffix in (".md", ".json", ".png")}
    (out / "DONE").write_text(key)
    return {"key": key, "out_dir": str(out), "metrics": metrics, "artifacts": reports, "produced_by_run": run_id}


@task(name="register", **RETRIES)
def register(cfg: PerlConfig, anchor: dict, reward_model: dict, policy: dict, evaluation: dict,
             data_version: dict) -> dict:
    """Register both models (alias `candidate`) and run the promotion gate. Idempotent on the stage keys.

    Both reference the anchor where its stage logged it instead of carrying a copy each.
    """
    from flows import registry
    from perl_core.artifacts import read_manifest

    tr = cfg.tracking
    common = {"perl.data_version": str(data_version.get("md5")), "perl.data_git_rev": str(data_version.get("git_rev"))}
    on_anchor = {"anchor_dir": anchor["out_dir"], "anchor_uri": registry.stage_artifact_uri(anchor, "anchor")}
    rm_kind = read_manifest(reward_model["out_dir"])["kind"]  # reward_model or reward_ensemble
    rm_version, rm_new = registry.register_model(rm_kind, tr.reward_model_name, reward_model["out_dir"],
                                                 reward_model["key"], evaluation["metrics"], common, **on_anchor)
    policy_tags = {**common, "perl.reward_model_version": rm_version, "perl.evaluation_key": evaluation["key"]}
    policy_version, policy_new = registry.register_model("policy", tr.policy_name, policy["out_dir"], policy["key"],
                                                         evaluation["metrics"], policy_tags, **on_anchor)
    decision = registry.promotion_gate(tr.policy_name, policy_version, tr.promotion_metric, tr.promotion_mode)
    if not policy_new and not decision.promoted:
        decision.reason = f"v{policy_version} was registered by an earlier run with these inputs; {decision.reason}"
    if decision.promoted:
        registry.promote_pair(tr.policy_name, tr.reward_model_name, policy_version, decision.reason)
    return {"reward_model_version": rm_version, "policy_version": policy_version, "new": policy_new or rm_new,
            "promoted": decision.promoted, "reason": decision.reason, "metric": tr.promotion_metric,
            "candidate_value": decision.candidate_value, "champion_value": decision.champion_value,
            "previous_champion": decision.champion}
