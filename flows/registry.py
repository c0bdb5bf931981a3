"""The MLflow model registry: reward model and policy as MLflow models, a promotion gate, rollback.

Each registered version is a pyfunc "model from code" (`flows/mlflow_model.py`, nothing
pickled) carrying the project's own folder (adapter + tokenizer + manifest naming its base)
and, when that base is a local folder, the anchor it adapts. Load it either way:

    mlflow.pyfunc.load_model("models:/perl-reward-model@champion").predict(df)   # prompt, response -> score
                                                   # (a reward-model ensemble: score and member_std)
    RewardScorer.load(registry.download("perl-reward-model", "champion"))          # the project's loader

New versions get the alias `candidate`. The gate moves `champion` only when the candidate
beats the champion on `tracking.promotion_metric`; the policy and the reward model it was
trained against move together (the policy's version tag `perl.reward_model_version`).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from perl_core.artifacts import ENSEMBLE_KIND, MANIFEST, REWARD_KINDS, read_manifest
from perl_core.errors import UserError

CODE_FILE = Path(__file__).resolve().parent / "mlflow_model.py"
HISTORY_TAG = "perl.champion_history"
METRIC_TAG = "metric."


# ---------------------------------------------------------------- loading back
def relink(model_dir: str | Path, anchor_dir: Optional[str | Path]) -> Path:
    """A registered copy names its anchor by the path it was trained at; point it at the bundled copy.

    The manifest is what `RewardScorer.load` (`base_model`) and `PolicyGenerator.load` (`anchor`)
    read; `adapter_config.json` is fixed too so plain `PeftModel.from_pretrained` agrees.
    """
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    original = bundled_base(manifest)
    if anchor_dir is None or not original or Path(original).exists() or not Path(anchor_dir).exists():
        return model_dir
    out = Path(tempfile.mkdtemp(prefix="perl-relinked-")) / model_dir.name
    shutil.copytree(model_dir, out)
    manifest = {k: (str(anchor_dir) if v == original else v) for k, v in manifest.items()}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    adapter_cfg = out / "adapter_config.json"
    if adapter_cfg.exists():
        conf = json.loads(adapter_cfg.read_text())
        conf["base_model_name_or_path"] = str(anchor_dir)
        adapter_cfg.write_text(json.dumps(conf, indent=2))
    return out


def bundled_base(manifest: dict) -> Optional[str]:
    """The folder a registered model needs besides its own: the policy's anchor, the RM's base."""
    return manifest.get("anchor") or manifest.get("base_model")


def download(name: str, alias_or_version: str = "champion", dst: Optional[str | Path] = None) -> Path:
    """A registered model as a local PERL folder that `RewardScorer.load` / `PolicyGenerator.load` read."""
    import mlflow
    from mlflow.models import Model

    ref = f"models:/{name}/{alias_or_version}" if str(alias_or_version).isdigit() else f"models:/{name}@{alias_or_version}"
    root = Path(mlflow.artifacts.download_artifacts(ref, dst_path=str(dst) if dst else None))
    paths = Model.load(str(root / "MLmodel")).flavors["python_function"]["artifacts"]
    anchor = root / paths["anchor"]["path"] if "anchor" in paths else None
    return relink(root / paths["model"]["path"], anchor)


class PerlPyfunc:
    """Instantiated by `flows/mlflow_model.py`; the bundled manifest says reward_model, reward_ensemble or policy."""

    def load_context(self, context) -> None:
        anchor = context.artifacts.get("anchor")
        model_dir = relink(context.artifacts["model"], anchor)
        kind = read_manifest(model_dir)["kind"]
        if kind in REWARD_KINDS:
            from perl_core.ensemble import load_reward_scorer

            self.model = load_reward_scorer(str(model_dir))
        else:
            from perl_core.generation import PolicyGenerator

            self.model = PolicyGenerator.load(str(model_dir))
        self.kind = kind

    def predict(self, context, model_input, params: Optional[dict[str, Any]] = None):
        import pandas as pd

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        prompts = [str(p) for p in frame["prompt"]]
        if self.kind == ENSEMBLE_KIND:  # the aggregate and the members' spread
            lam = (params or {}).get("ensemble_lambda")
            score, spread = self.model.score_and_spread(prompts, [str(r) for r in frame["response"]],
                                                        aggregation=(params or {}).get("aggregation"),
                                                        lam=None if lam is None else float(lam))
            return pd.DataFrame({"score": score.tolist(), "member_std": spread.tolist()})
        if self.kind == "reward_model":
            scores = self.model.score(prompts, [str(r) for r in frame["response"]])
            return pd.DataFrame({"score": [float(s) for s in scores]})
        params = params or {}
        responses = self.model.generate(prompts, seed=int(params.get("seed", 0)),
                                        max_new_tokens=int(params.get("max_new_tokens", 32)),
                                        temperature=float(params.get("temperature", 1.0)),
                                        top_p=float(params.get("top_p", 1.0)))
        return pd.DataFrame({"response": list(responses)})


def _signature(kind: str):
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
    params = ParamSchema([ParamSpec("seed", "long", 0), ParamSpec("max_new_tokens", "long", 32),
                          ParamSpec("temperature", "double", 1.0), ParamSpec("top_p", "double", 1.0)])
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
                   tags: Optional[dict[str, str]] = None) -> tuple[str, bool]:
    """Log `model_dir` as a pyfunc model in the active run and register it with alias `candidate`.

    Returns (version, created). Idempotent on `key`: the version that already carries it is returned.
    """
    import mlflow

    existing = find_version(name, key)
    if existing is not None:
        return str(existing.version), False
    manifest = read_manifest(model_dir, expect_kind=kind)
    artifacts = {"model": str(model_dir)}
    base = bundled_base(manifest)
    if base and Path(base).is_dir():
        artifacts["anchor"] = str(base)
    with warnings.catch_warnings():  # "no input example": one would load the model at logging time
        warnings.simplefilter("ignore", UserWarning)
        info = mlflow.pyfunc.log_model(
            name=kind, python_model=str(CODE_FILE), artifacts=artifacts, signature=_signature(kind),
            registered_model_name=name, pip_requirements=["perl-rlhf", "torch", "transformers", "peft", "pandas"],
        )
    version = str(info.registered_model_version)
    client = _client()
    version_tags = {"perl.stage_key": key, "perl.kind": kind, "perl.base_model": str(base),
                    "perl.tuning": str(manifest.get("tuning")), **(tags or {})}
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
