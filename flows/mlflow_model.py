"""MLflow "model from code" for PERL's reward models and policies: nothing pickled in the registry.

A registered version carries this file, `perl_core` (its `code_paths`) and pinned requirements,
so it loads wherever those are installed: this file imports nothing else from the project (no
flows, no Prefect). The anchor a policy (or an anchor-initialised reward model) adapts is not
copied into the version: `model_config["anchor_uri"]` names the run artifact the anchor stage
logged once, and loading downloads it from there (the tracking server must be reachable).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import mlflow

from perl_core.artifacts import ENSEMBLE_KIND, MANIFEST, REWARD_KINDS, read_manifest

ANCHOR_URI = "anchor_uri"


def bundled_base(manifest: dict) -> Optional[str]:
    """The folder a registered model needs besides its own: the policy's anchor, the RM's base."""
    return manifest.get("anchor") or manifest.get("base_model")


def anchor_folder(artifacts: dict, model_config: Optional[dict]) -> Optional[str]:
    """The local anchor of a registered model: downloaded from its URI, or bundled (older versions, other bases)."""
    uri = (model_config or {}).get(ANCHOR_URI)
    if uri:
        return mlflow.artifacts.download_artifacts(uri)
    return artifacts.get("anchor")


def relink(model_dir: str | Path, anchor_dir: Optional[str | Path]) -> Path:
    """A registered copy names its anchor by the path it was trained at; point it at the downloaded copy.

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


class PerlModel(mlflow.pyfunc.PythonModel):
    """The bundled manifest says reward_model (prompt, response -> score), reward_ensemble (prompt, response ->
    score, member_std) or policy (prompt -> response)."""

    def load_context(self, context) -> None:
        anchor = anchor_folder(context.artifacts, context.model_config)
        model_dir = relink(context.artifacts["model"], anchor)
        self.kind = read_manifest(model_dir)["kind"]
        if self.kind in REWARD_KINDS:
            from perl_core.reward.stage import load_reward_scorer

            self.model = load_reward_scorer(str(model_dir))
        else:
            from perl_core.policy.generation import PolicyGenerator

            self.model = PolicyGenerator.load(str(model_dir))

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
        # a param the caller leaves out samples as the policy was trained and evaluated (its manifest's
        # generation settings, also the signature's defaults); seed 0 as `perl-rlhf policy generate`
        params = params or {}

        def given(name: str, cast):
            return None if params.get(name) is None else cast(params[name])

        responses = self.model.generate(prompts, seed=given("seed", int) or 0,
                                        max_new_tokens=given("max_new_tokens", int),
                                        temperature=given("temperature", float), top_p=given("top_p", float))
        return pd.DataFrame({"response": list(responses)})


mlflow.models.set_model(PerlModel())
