"""MLflow tracking for a pipeline run: one parent run, a nested run per stage.

Embedded default: `sqlite:///mlflow.db` with artifacts in a local folder. The same code
talks to a server when `MLFLOW_TRACKING_URI=http://...` is set. A server that cannot be
reached stops the run before any training (:func:`check_servers`).

Per-step metrics come from the perl_core callback; they are logged against an explicit run
id (not the fluent "active run"), so it does not matter which thread Prefect runs a task on.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import httpx
import yaml

from perl_core.config import PerlConfig, flatten
from perl_core.errors import UserError

# Folders inside a stage's output that are not the model (resume checkpoints).
SKIP_DIRS = {"checkpoints", "checkpoint"}
# RL's sample completions, appended to every `policy.log_samples_every` steps (MLflow UI: Artifacts).
SAMPLES_TABLE = "samples/rl_samples.json"


class ServerUnreachable(UserError):
    """A configured tracking/orchestration server did not answer."""


# ---------------------------------------------------------------- where things go
def tracking_uri(cfg: PerlConfig) -> str:
    """`MLFLOW_TRACKING_URI` wins over `tracking.tracking_uri` (the embedded SQLite default)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.tracking_uri


def _health(url: str, what: str, setting: str) -> None:
    health = url.rstrip("/") + "/health"
    try:
        response = httpx.get(health, timeout=5.0)
    except httpx.HTTPError as err:
        raise ServerUnreachable(
            f"{what} at {url} cannot be reached ({type(err).__name__}: {err}). "
            f"Start the server, or unset {setting} to use the embedded local default. "
            "Nothing was trained."
        ) from None
    if response.status_code >= 400:
        raise ServerUnreachable(f"{what} at {url} answered {health} with HTTP {response.status_code}; "
                                f"check {setting}. Nothing was trained.")


def check_servers(cfg: PerlConfig) -> str:
    """Fail fast, before any training, when a configured server does not answer. Returns the MLflow URI."""
    uri = tracking_uri(cfg)
    setting = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "tracking.tracking_uri"
    if uri.startswith(("http://", "https://")):
        _health(uri, "the MLflow tracking server", setting)
    elif uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    api = os.environ.get("PREFECT_API_URL")
    if api:
        _health(api, "the Prefect API", "PREFECT_API_URL")
    return uri


def git_commit(repo_root: str | Path = ".") -> str:
    """HEAD of the checkout, else the commit a container image was built from (`PERL_IMAGE_COMMIT`)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root, capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return os.environ.get("PERL_IMAGE_COMMIT", "unknown")


def setup(cfg: PerlConfig) -> str:
    """Point MLflow at the configured store and experiment (artifacts in a local folder by default)."""
    import mlflow

    uri = check_servers(cfg)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    if client.get_experiment_by_name(cfg.tracking.experiment) is None:
        location = None
        if not uri.startswith(("http://", "https://")):
            location = Path(cfg.tracking.artifact_location).expanduser().resolve().as_uri()
        client.create_experiment(cfg.tracking.experiment, artifact_location=location)
    mlflow.set_experiment(cfg.tracking.experiment)
    return uri


# ---------------------------------------------------------------- per-step metrics
class MetricsLog:
    """The perl_core callback that writes to one MLflow run; buffered, flushed every `every` points."""

    def __init__(self, run_id: str, every: int = 50):
        import mlflow

        self.client, self.run_id, self.every = mlflow.MlflowClient(), run_id, every
        self.pending: list = []

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            self.pending.append(Metric(key.replace("@", "_at_"), float(value), now, int(step)))
        if len(self.pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        while self.pending:
            chunk, self.pending = self.pending[:1000], self.pending[1000:]
            self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)

    def samples(self, rows: list[dict], step: int) -> None:
        """The perl_core samples callback: completions go into one table (`SAMPLES_TABLE`), a `step` column apart."""
        if rows:
            table = {key: [row.get(key) for row in rows] for key in rows[0]}
            self.client.log_table(self.run_id, {"step": [int(step)] * len(rows), **table}, SAMPLES_TABLE)


# ---------------------------------------------------------------- runs
@contextlib.contextmanager
def pipeline_run(cfg: PerlConfig, run_name: Optional[str] = None) -> Iterator[Any]:
    """The parent run: params = flatten(cfg), the config as an artifact, the git commit as a tag."""
    import mlflow

    setup(cfg)
    tags = {"perl.git_commit": git_commit(), "perl.preset": cfg.preset}
    with mlflow.start_run(run_name=run_name, tags=tags, log_system_metrics=_system_metrics()) as run:
        params = {k: ("" if v is None else str(v))[:6000] for k, v in flatten(cfg).items()}
        mlflow.log_params(params)
        mlflow.log_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config.yaml")
        log_image_lock()
        yield run


def log_image_lock() -> None:
    """Inside the Docker image: its resolved package set (`PERL_IMAGE_LOCK`, docker/Dockerfile) as image/requirements.lock."""
    import mlflow

    lock = os.environ.get("PERL_IMAGE_LOCK")
    if lock and Path(lock).is_file():
        mlflow.log_artifact(lock, artifact_path="image")


@contextlib.contextmanager
def stage_run(stage: str, cached: bool = False) -> Iterator[Any]:
    """A nested run for one stage under the active parent run."""
    import mlflow

    tags = {"perl.stage": stage, "perl.cached": str(cached).lower()}
    with mlflow.start_run(run_name=stage, nested=True, tags=tags,
                          log_system_metrics=_system_metrics() and not cached) as run:
        yield run


def _system_metrics() -> bool:
    """CPU/memory/disk per run (psutil); `MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false` turns it off."""
    return os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").lower() not in ("0", "false", "no")


def log_data_version(data_dir: str | Path, version: dict, name: str) -> None:
    """The dataset as an MLflow dataset input: source = its folder, digest = the DVC md5, plus the git revision."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    md5 = str(version.get("md5") or "untracked")
    with warnings.catch_warnings():  # the local-path source matches two equivalent resolvers
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(Path(data_dir).resolve()))
    dataset = MetaDataset(source=source, name=name, digest=md5[:36])
    tags = {"dvc_md5": md5, "git_rev": str(version.get("git_rev") or "unknown"),
            "matches_working_copy": str(version.get("matches_working_copy"))}
    mlflow.log_input(dataset, context="training", tags=tags)
    mlflow.set_tags({"perl.data_version": md5, "perl.data_git_rev": tags["git_rev"]})


def log_stage_result(result: dict, artifact_path: str, log_model_dir: bool = True) -> None:
    """Final metrics, the stage's reports/plots and (for fresh runs) its model folder."""
    import mlflow

    metrics = {k.replace("@", "_at_"): float(v) for k, v in (result.get("metrics") or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if metrics:
        mlflow.log_metrics(metrics)
    mlflow.set_tags({"perl.stage_key": result.get("key", ""), "perl.out_dir": str(result.get("out_dir", "")),
                     "perl.produced_by_run": result.get("produced_by_run", "")})
    out_dir = Path(result.get("out_dir", ""))
    if not log_model_dir or not out_dir.is_dir():
        return
    for path in sorted(out_dir.iterdir()):
        if path.is_dir() and path.name in SKIP_DIRS:
            continue
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=f"{artifact_path}/{path.name}")
        else:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)
