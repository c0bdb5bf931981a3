"""The MLflow model registry: reward model and policy as MLflow models, a promotion gate, rollback.

Each registered version is a pyfunc "model from code" (`flows/mlflow_model.py`, nothing
pickled) carrying the project's own folder (adapter + tokenizer + manifest naming its base),
`perl_core` as code and pinned requirements. The anchor it adapts is stored once, by the
anchor stage's run; a version references it (`model_config["anchor_uri"]`, tag
`perl.anchor_uri`) and loading downloads it. Load it either way:

    mlflow.pyfunc.load_model("models:/perl-reward-model@champion").predict(df)   # prompt, response -> score
                                                   # (a reward-model ensemble: score and member_std)
    RewardScorer.load(registry.download("perl-reward-model", "champion"))          # the project's loader

New versions get the alias `candidate`. The gate moves `champion` only when the candidate
beats the champion on `tracking.promotion_metric`; the policy and the reward model it was
trained against move together (the policy's version tag `perl.reward_model_version`).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Optional

import perl_core
from perl_core.artifacts import ENSEMBLE_KIND, read_manifest
from perl_core.errors import UserError

CODE_FILE = Path(__file__).resolve().parent / "mlflow_model.py"
HISTORY_TAG = "perl.champion_history"
METRIC_TAG = "metric."
# What a registered model imports when it loads and predicts (mlflow_model.py and perl_core's
# scoring/generation path). Each is pinned to the installed version: an environment built from
# the model's own requirements.txt then matches the one it was trained in.
SERVING_PACKAGES = ("mlflow", "torch", "transformers", "tokenizers", "peft", "accelerate", "safetensors", "numpy",
                    "scipy", "pandas", "pydantic", "pyyaml")


# ---------------------------------------------------------------- loading back
def __getattr__(name: str):
    # Versions registered before the pyfunc moved into mlflow_model.py import it from here.
    if name == "PerlPyfunc":
        from flows.mlflow_model import PerlModel

        return PerlModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def download(name: str, alias_or_version: str = "champion", dst: Optional[str | Path] = None) -> Path:
    """A registered model as a local PERL folder that `RewardScorer.load` / `PolicyGenerator.load` read."""
    import mlflow
    from mlflow.models import Model

    from flows.mlflow_model import anchor_folder, relink

    ref = f"models:/{name}/{alias_or_version}" if str(alias_or_version).isdigit() else f"models:/{name}@{alias_or_version}"
    root = Path(mlflow.artifacts.download_artifacts(ref, dst_path=str(dst) if dst else None))
    conf = Model.load(str(root / "MLmodel")).flavors["python_function"]
    paths = {k: str(root / v["path"]) for k, v in conf.get("artifacts", {}).items()}
    return relink(paths["model"], anchor_folder(paths, conf.get("config")))


def stage_artifact_uri(result: dict, stage: str) -> Optional[str]:
    """Where `tracking.log_stage_result` logged a stage's folder: `runs:/<run that produced it>/<stage>`."""
    run_id = result.get("produced_by_run")
    return f"runs:/{run_id}/{stage}" if run_id else None


def pinned_requirements() -> list[str]:
    """`SERVING_PACKAGES` at their installed versions (a local label such as torch's `+cpu` dropped)."""
    return [f"{name}=={installed_version(name).split('+')[0]}" for name in SERVING_PACKAGES]


def _holds_manifest(uri: str) -> bool:
    import mlflow

    try:
        return any(Path(a.path).name == "manifest.json" for a in mlflow.artifacts.list_artifacts(uri))
    except Exception:  # the run or its artifacts are gone
        return False


def _signature(kind: str, manifest: dict):
    """Inputs, outputs and params; a policy's params default to how it was trained and evaluated."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    if kind == ENSEMBLE_KIND:
        from perl_core.config import PolicyConfig

        defaults = PolicyConfig()
        return ModelSignature(inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "response")]),
                              outputs=Schema([ColSpec("double", "score"), ColSpec("double", "member_std")]),
                              params=ParamSchema([ParamSpec("aggregation", "string", defaults.ensemble_aggregation),
                                                  ParamSpec("ensemble_lambda", "double", defaults.ensemble_lambda)]))
    if kind == "reward_model":
        return ModelSignature(inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "response")]),
                              outputs=Schema([ColSpec("double", "score")]))
    from perl_core.policy.generation import generation_defaults

    trained = generation_defaults(manifest)
    params = ParamSchema([ParamSpec("seed", "long", 0),
                          ParamSpec("max_new_tokens", "long", trained["max_new_tokens"]),
                          ParamSpec("temperature", "double", trained["temperature"]),
                          ParamSpec("top_p", "double", trained["top_p"])])
    return ModelSignature(inputs=Schema([ColSpec("string", "prompt")]),
                          outputs=Schema([ColSpec("string", "response")]), params=params)


# ---------------------------------------------------------------- registering
def _client():
    import mlflow

    return mlflow.MlflowClient()


def find_version(name: str, key: str):
    """The version already registered for this stage key (a re-run registers nothing new)."""
    try:
        found = _client().search_model_versions(f"name = '{name}' and tags.`perl.stage_key` = '{key}'")
    except Exception:  # the registered model does not exist yet
        return None
    return max(found, key=lambda v: int(v.version)) if found else None


def register_model(kind: str, name: str, model_dir: str | Path, key: str, metrics: dict[str, float],
                   tags: Optional[dict[str, str]] = None, anchor_dir: Optional[str | Path] = None,
                   anchor_uri: Optional[str] = None) -> tuple[str, bool]:
    """Log `model_dir` as a pyfunc model in the active run and register it with alias `candidate`.

    `anchor_dir` was logged once at `anchor_uri` (see `stage_artifact_uri`): a model built on it
    references that URI. Any other local base folder is carried inside the version.
    Returns (version, created). Idempotent on `key`: the version that already carries it is returned.
    """
    import mlflow

    from flows.mlflow_model import ANCHOR_URI, bundled_base

    existing = find_version(name, key)
    if existing is not None:
        return str(existing.version), False
    manifest = read_manifest(model_dir, expect_kind=kind)
    artifacts, model_config = {"model": str(model_dir)}, {}
    base = bundled_base(manifest)
    if base and Path(base).is_dir():
        on_anchor = anchor_dir is not None and Path(base).resolve() == Path(anchor_dir).resolve()
        if on_anchor and anchor_uri and _holds_manifest(anchor_uri):
            model_config[ANCHOR_URI] = anchor_uri
        else:
            artifacts["anchor"] = str(base)
    with warnings.catch_warnings():  # "no input example": one would load the model at logging time
        warnings.simplefilter("ignore", UserWarning)
        info = mlflow.pyfunc.log_model(
            name=kind, python_model=str(CODE_FILE), artifacts=artifacts, model_config=model_config or None,
            code_paths=[str(Path(perl_core.__file__).resolve().parent)], signature=_signature(kind, manifest),
            registered_model_name=name, pip_requirements=pinned_requirements(),
        )
    version = str(info.registered_model_version)
    client = _client()
    version_tags = {"perl.stage_key": key, "perl.kind": kind, "perl.base_model": str(base),
                    "perl.tuning": str(manifest.get("tuning")), **(tags or {})}
    if ANCHOR_URI in model_config:
        version_tags["perl.anchor_uri"] = model_config[ANCHOR_URI]
    version_tags.update({f"{METRIC_TAG}{k}": repr(float(v)) for k, v in metrics.items()})
    for tag, value in version_tags.items():
        client.set_model_version_tag(name, version, tag, value)
    client.set_registered_model_alias(name, "candidate", version)
    return version, True


# ---------------------------------------------------------------- the gate
@dataclass
class GateDecision:
    promoted: bool
    reason: str
    candidate: str
    champion: Optional[str]
    candidate_value: Optional[float]
    champion_value: Optional[float]


def alias_version(name: str, alias: str) -> Optional[str]:
    try:
        return str(_client().get_model_version_by_alias(name, alias).version)
    except Exception:
        return None


def metric_of(name: str, version: str, metric: str) -> Optional[float]:
    tags = _client().get_model_version(name, version).tags
    value = tags.get(f"{METRIC_TAG}{metric}")
    return float(value) if value is not None else None


def promotion_gate(name: str, candidate: str, metric: str, mode: str = "max") -> GateDecision:
    """Does `candidate` beat the current champion on `metric`? Says why either way; moves nothing."""
    champion = alias_version(name, "champion")
    cand_value = metric_of(name, candidate, metric)
    if cand_value is None:
        return GateDecision(False, f"candidate v{candidate} has no value for {metric!r}; nothing promoted",
                            candidate, champion, None, None)
    if champion is None:
        return GateDecision(True, f"no champion yet: v{candidate} ({metric}={cand_value:.4f}) becomes champion",
                            candidate, None, cand_value, None)
    if champion == candidate:
        return GateDecision(False, f"v{candidate} is already champion", candidate, champion, cand_value, cand_value)
    champ_value = metric_of(name, champion, metric)
    if champ_value is None:
        return GateDecision(True, f"champion v{champion} has no {metric!r}; v{candidate} ({cand_value:.4f}) replaces it",
                            candidate, champion, cand_value, None)
    better = cand_value > champ_value if mode == "max" else cand_value < champ_value
    word = "higher" if mode == "max" else "lower"
    verdict = "beats" if better else "does not beat"
    reason = (f"candidate v{candidate} {verdict} champion v{champion} on {metric} "
              f"({cand_value:.4f} vs {champ_value:.4f}; {word} is better)")
    return GateDecision(better, reason + ("" if better else "; champion kept"), candidate, champion,
                        cand_value, champ_value)


def _history(name: str) -> list[str]:
    raw = _client().get_registered_model(name).tags.get(HISTORY_TAG)
    return json.loads(raw) if raw else []


def set_champion(name: str, version: str, reason: str) -> None:
    client = _client()
    history = _history(name)
    if not history or history[-1] != version:
        history.append(version)
    client.set_registered_model_alias(name, "champion", version)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    client.set_model_version_tag(name, version, "perl.promotion_reason", reason)


def promote_pair(policy_name: str, reward_model_name: str, policy_version: str, reason: str) -> Optional[str]:
    """Champion the policy and the reward model it was trained against. Returns that RM version."""
    set_champion(policy_name, policy_version, reason)
    rm_version = _client().get_model_version(policy_name, policy_version).tags.get("perl.reward_model_version")
    if rm_version:
        set_champion(reward_model_name, rm_version, f"paired with {policy_name} v{policy_version}: {reason}")
    return rm_version


def rollback(policy_name: str, reward_model_name: str) -> tuple[str, str]:
    """Move `champion` back to the previous champion (policy and its reward model). Returns (from, to)."""
    history = _history(policy_name)
    if len(history) < 2:
        raise UserError(f"{policy_name}: no previous champion to roll back to (champion history: {history or 'empty'})")
    current, previous = history[-1], history[-2]
    client = _client()
    client.set_registered_model_tag(policy_name, HISTORY_TAG, json.dumps(history[:-1]))
    client.set_model_version_tag(policy_name, current, "perl.rolled_back", "true")
    client.set_registered_model_alias(policy_name, "champion", previous)
    rm_version = client.get_model_version(policy_name, previous).tags.get("perl.reward_model_version")
    if rm_version:
        rm_history = [v for v in _history(reward_model_name) if v != rm_version] + [rm_version]
        client.set_registered_model_alias(reward_model_name, "champion", rm_version)
        client.set_registered_model_tag(reward_model_name, HISTORY_TAG, json.dumps(rm_history))
    return current, previous


def list_versions(name: str) -> list[dict]:
    """Every version with its aliases and metrics, newest first."""
    client = _client()
    try:
        model = client.get_registered_model(name)
    except Exception:
        return []
    aliases: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for v in client.search_model_versions(f"name = '{name}'"):
        rows.append({"version": str(v.version), "aliases": sorted(aliases.get(str(v.version), [])),
                     "run_id": v.run_id, "tags": dict(v.tags),
                     "metrics": {k[len(METRIC_TAG):]: float(t) for k, t in v.tags.items() if k.startswith(METRIC_TAG)}})
    return sorted(rows, key=lambda r: -int(r["version"]))
