"""The PERL pipeline: one Prefect flow per stage, and `perl_pipeline` chaining them.

    data -> anchor (SFT) -> reward_model -> policy (RL) -> evaluate -> register (+ promotion gate)

Every flow takes the typed config (`PerlConfig`), so Prefect validates and shows it. Each stage
runs in a nested MLflow run under the pipeline's parent run. A stage's key is a hash of the
data version, its own config section(s), the code version and the keys of the stages it
reads; its output folder is `artifacts_dir/<stage>/<key>`, so unchanged inputs reuse the
cached result and its folder, and a change to `policy.*` alone re-runs only the policy,
evaluation and registration.
"""
from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

import perl_core
from flows import tasks, tracking
from perl_core.config import DATA_SOURCES, ConfigError, PerlConfig
from perl_core.errors import UserError

STAGES = ("data", "anchor", "reward_model", "policy", "evaluate", "register")


class UserErrorsWithoutTraceback(logging.Filter):
    """Prefect logs a failed task or flow run's exception with its traceback. A `UserError` or
    `ConfigError` already says what to fix (the CLI prints it as one line), so its record keeps the
    message and drops the traceback; any other exception, a bug, keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (UserError, ConfigError)):
            record.exc_info, record.exc_text = None, None
        return True


for _name in ("prefect.flow_runs", "prefect.task_runs"):
    _logger = logging.getLogger(_name)
    if not any(isinstance(f, UserErrorsWithoutTraceback) for f in _logger.filters):
        _logger.addFilter(UserErrorsWithoutTraceback())


# ---------------------------------------------------------------- keys
# The perl_core modules each stage's task calls (flows/tasks.py); a stage's code is these and every
# perl_core module they import, followed through the import statements; the data readers, imported by
# name (perl_core.data.prepare.source_module), are named from the registry. Measurement code (bench/,
# outside perl_core) is no stage's code.
STAGE_CODE = {
    "data": ("perl_core.data", *(f"perl_core.data.{name.replace('-', '_')}" for name in DATA_SOURCES)),
    "anchor": ("perl_core.sft",),
    "reward_model": ("perl_core.reward.stage",),
    "policy": ("perl_core.policy.stage",),
    "evaluate": ("perl_core.eval.policy", "perl_core.eval.reward"),
}


def _module_file(root: Path, name: str) -> Optional[Path]:
    """perl_core.a.b -> root/a/b.py or root/a/b/__init__.py (root is perl_core's folder); None if neither."""
    parts = name.split(".")[1:]
    candidates = [root.joinpath(*parts).with_suffix(".py")] if parts else []
    candidates.append(root.joinpath(*parts, "__init__.py"))
    return next((path for path in candidates if path.is_file()), None)


def _imported(module: str, path: Path) -> set[str]:
    """The perl_core modules `module` (at `path`) imports anywhere in its body, function-level imports too,
    with the packages above each (importing perl_core.a.b runs perl_core/a/__init__.py)."""
    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x / from ..a import y
                parents = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parents + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # a submodule, when it is one
    found = set()
    for name in names:
        parts = name.split(".")
        if parts[0] == "perl_core":
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return found


def stage_code(stage: str, root: Optional[Path] = None) -> list[Path]:
    """The source files of `stage`'s code (see STAGE_CODE) under perl_core's folder `root`."""
    root = Path(root or Path(perl_core.__file__).resolve().parent)
    todo = list(STAGE_CODE[stage])
    seen: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        if name in seen or (path := _module_file(root, name)) is None:
            continue
        seen[name] = path
        todo += sorted(_imported(name, path) - set(seen))
    return sorted(set(seen.values()))


def code_version(stage: str, root: Optional[Path] = None) -> str:
    """sha256 over `stage`'s source files: editing them re-runs the stage (and, through the keys that
    carry its key, every stage after it); editing any other file of perl_core re-runs nothing."""
    root = Path(root or Path(perl_core.__file__).resolve().parent)
    digest = hashlib.sha256()
    for path in stage_code(stage, root):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def stage_key(stage: str, cfg_sections: dict[str, Any], data_md5: Optional[str], upstream: tuple[str, ...] = ()) -> str:
    payload = {"stage": stage, "code": code_version(stage), "data": data_md5, "config": cfg_sections, "upstream": upstream}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_dir(cfg: PerlConfig, stage: str, key: str) -> Path:
    return Path(cfg.artifacts_dir).expanduser().resolve() / stage / key


def _section(cfg: PerlConfig, *names: str) -> dict[str, Any]:
    dumped = cfg.model_dump(mode="json")
    return {name: dumped[name] for name in names}


# ---------------------------------------------------------------- one stage
def _run_stage(stage: str, task, done: Optional[Path], log_model_dir: bool = True, finish=None,
               trains: bool = False, samples: bool = False, **kwargs) -> dict:
    """Run (or restore from cache) one task inside its nested MLflow run.

    `done` is the file that proves the output folder is still there; without it the cache is refreshed.
    A task that `trains` gets the stage's metrics log as `callback`; one that logs `samples` gets
    its completions table as `samples_callback`. `finish(result)` runs last inside the nested run.
    """
    import mlflow

    refresh = done is not None and not done.exists()
    with tracking.stage_run(stage) as run:
        metrics_log = tracking.MetricsLog(run.info.run_id)
        extra = ({"callback": metrics_log} if trains else {}) | ({"samples_callback": metrics_log.samples} if samples else {})
        state = task.with_options(refresh_cache=refresh)(run_id=run.info.run_id, return_state=True, **kwargs, **extra)
        result = state.result()
        metrics_log.flush()
        cached = state.is_completed() and state.name == "Cached"
        result["cached"] = cached
        mlflow.set_tag("perl.cached", str(cached).lower())
        tracking.log_stage_result(result, stage, log_model_dir=log_model_dir and not cached)
        if finish is not None:
            finish(result)
    return result


# ---------------------------------------------------------------- stage flows
@flow(name="perl-data", log_prints=True)
def data_flow(cfg: PerlConfig) -> dict:
    """Import or generate, validate, split, write the data card, version with DVC."""
    key = stage_key("data", _section(cfg, "data"), None)
    data_dir = Path(cfg.data.data_dir) / (cfg.data.name or cfg.data.source)
    current = _data_version_or_none()
    # data.dvc and the folder disagree (or the folder is gone): prepare again
    in_sync = current is None or current.get("md5") is None or bool(current.get("matches_working_copy"))

    def finish(result: dict) -> None:
        import mlflow

        from perl_core.data.versioning import data_version

        version = data_version(".")  # fresh: downstream keys follow what is on disk now
        result.update(data_version=version, data_dir=str(data_dir))
        if card.exists():
            result["card_md5"] = hashlib.md5(card.read_bytes()).hexdigest()
        tracking.log_data_version(data_dir, version, cfg.data.name or cfg.data.source)
        for name in ("card.md", "card.json"):
            if (data_dir / name).exists():
                mlflow.log_artifact(str(data_dir / name), artifact_path="data")

    card = data_dir / "card.json"
    result = _run_stage("data", tasks.prepare_data, card if in_sync else data_dir / "__stale__", log_model_dir=False,
                        finish=finish, cfg=cfg, key=key)
    tracking.log_data_version(data_dir, result["data_version"], cfg.data.name or cfg.data.source)  # on the parent too
    if (data_dir / "card.md").exists():
        create_markdown_artifact((data_dir / "card.md").read_text(), key="data-card", description="the data card of this run")
    return result


def data_id(data: dict) -> Optional[str]:
    """What downstream keys hash: the DVC md5, else (data outside DVC) the folder's own md5."""
    version = data["data_version"]
    return version.get("md5") or version.get("working_copy_md5") or data.get("card_md5")


def _data_version_or_none() -> Optional[dict]:
    from perl_core.data.versioning import data_version

    try:
        return data_version(".")
    except Exception:  # no data.dvc yet (fresh clone): the data stage creates it
        return None


@flow(name="perl-anchor", log_prints=True)
def anchor_flow(cfg: PerlConfig, data: dict) -> dict:
    """SFT the backbone into the anchor (with `sft.enabled: false` the base is saved as the anchor untouched)."""
    key = stage_key("anchor", _section(cfg, "sft"), data_id(data))
    out = stage_dir(cfg, "anchor", key)
    return _run_stage("anchor", tasks.train_anchor, out / "manifest.json", trains=True, cfg=cfg, key=key,
                      out_dir=str(out))


@flow(name="perl-reward-model", log_prints=True)
def reward_model_flow(cfg: PerlConfig, data: dict, anchor: dict) -> dict:
    from_anchor = cfg.reward.init_from_anchor
    key = stage_key("reward_model", _section(cfg, "reward"), data_id(data),
                    (anchor["key"],) if from_anchor else ())
    out = stage_dir(cfg, "reward_model", key)
    return _run_stage("reward_model", tasks.train_reward_model, out / "manifest.json", trains=True, cfg=cfg, key=key,
                      out_dir=str(out), base_model=anchor["out_dir"] if from_anchor else None)


@flow(name="perl-policy", log_prints=True)
def policy_flow(cfg: PerlConfig, data: dict, anchor: dict, reward_model: dict) -> dict:
    key = stage_key("policy", _section(cfg, "policy"), data_id(data),
                    (anchor["key"], reward_model["key"]))
    out = stage_dir(cfg, "policy", key)
    return _run_stage("policy", tasks.train_policy, out / "manifest.json", trains=True, samples=True, cfg=cfg, key=key,
                      out_dir=str(out),
                      anchor_dir=anchor["out_dir"], reward_model_dir=reward_model["out_dir"])


@flow(name="perl-evaluate", log_prints=True)
def evaluate_flow(cfg: PerlConfig, data: dict, anchor: dict, reward_model: dict, policy: dict) -> dict:
    key = stage_key("evaluate", _section(cfg, "evaluation"), data_id(data),
                    (anchor["key"], reward_model["key"], policy["key"]))
    out = stage_dir(cfg, "evaluate", key)
    result = _run_stage("evaluate", tasks.evaluate, out / "DONE", cfg=cfg, key=key, out_dir=str(out),
                        policy_dir=policy["out_dir"], anchor_dir=anchor["out_dir"],
                        reward_model_dir=reward_model["out_dir"])
    _evaluation_artifacts(result, [anchor, reward_model, policy])
    return result


@flow(name="perl-register", log_prints=True)
def register_flow(cfg: PerlConfig, data: dict, anchor: dict, reward_model: dict, policy: dict, evaluation: dict) -> dict:
    import mlflow

    with tracking.stage_run("register"):
        result = tasks.register(cfg, anchor, reward_model, policy, evaluation, data["data_version"])
        mlflow.set_tags({"perl.promoted": str(result["promoted"]).lower(), "perl.gate_reason": result["reason"][:5000],
                         "perl.policy_version": result["policy_version"],
                         "perl.reward_model_version": result["reward_model_version"]})
    verdict = "promoted to champion" if result["promoted"] else "not promoted"
    create_markdown_artifact(
        f"## Promotion gate\n\n**{cfg.tracking.policy_name} v{result['policy_version']}**: {verdict}.\n\n"
        f"{result['reason']}\n", key="promotion-gate", description="registry decision")
    print(f"promotion gate: {verdict}: {result['reason']}")
    return result


# ---------------------------------------------------------------- Prefect artifacts
def _evaluation_artifacts(evaluation: dict, stages: list[dict]) -> None:
    metrics = evaluation["metrics"]
    rm_rows = [{"metric": k.split(".", 1)[1], "value": round(v, 4)} for k, v in metrics.items() if k.startswith("reward.")]
    if rm_rows:
        create_table_artifact(rm_rows, key="reward-model-metrics", description="reward model on the test split")
    report = Path(evaluation["out_dir"]) / "policy" / "policy_eval.md"
    if report.exists():
        create_markdown_artifact(report.read_text(), key="policy-evaluation", description="policy vs anchor")
    rows = []
    for stage, result in zip(("anchor", "reward_model", "policy"), stages):
        m = result["metrics"]
        trainable, total = m.get("trainable_params"), m.get("total_params")
        rows.append({"stage": stage, "trainable_params": int(trainable) if trainable is not None else None,
                     "total_params": int(total) if total is not None else None,
                     "trainable_pct": round(100 * trainable / total, 3) if trainable and total else None,
                     "steps": m.get("steps"), "seconds": round(m.get("train_seconds", m.get("seconds", 0.0)), 1),
                     "cached": result.get("cached", False)})
    create_table_artifact(rows, key="efficiency", description="trainable parameters and training time per stage")


# ---------------------------------------------------------------- the pipeline
@flow(name="perl-pipeline", log_prints=True)
def perl_pipeline(cfg: PerlConfig = PerlConfig()) -> dict:
    """The whole PERL pipeline in one parent MLflow run. Fails before training if a server is unreachable."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # set by accelerate launch (torchrun) for N > 1 processes
        raise UserError("run the pipeline as one process, not under `accelerate launch`: it launches each training "
                        "stage in N processes itself with --set launch.num_processes=N")
    tracking.check_servers(cfg)
    with tracking.pipeline_run(cfg, run_name=f"perl-{cfg.preset}") as parent:
        data = data_flow(cfg)
        anchor = anchor_flow(cfg, data)
        reward_model = reward_model_flow(cfg, data, anchor)
        policy = policy_flow(cfg, data, anchor, reward_model)
        evaluation = evaluate_flow(cfg, data, anchor, reward_model, policy)
        registration = register_flow(cfg, data, anchor, reward_model, policy, evaluation)
    return {"run_id": parent.info.run_id, "experiment_id": parent.info.experiment_id,
            "tracking_uri": tracking.tracking_uri(cfg), "data_version": data["data_version"],
            "stages": {name: {"key": r.get("key"), "cached": r.get("cached", False), "out_dir": r.get("out_dir")}
                       for name, r in zip(STAGES, (data, anchor, reward_model, policy, evaluation))},
            "metrics": evaluation["metrics"], "registry": registration}
