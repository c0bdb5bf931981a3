"""What every stage leaves behind: a folder with a `manifest.json`, and a `StageResult` for its caller.

The manifest makes a model traceable: which base it adapts, which anchor and reward model it
was trained against, which data version it learned from, and the exact config.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from perl_core.errors import UserError

MANIFEST = "manifest.json"
ENSEMBLE_KIND = "reward_ensemble"  # several reward models in one folder (perl_core.ensemble)
REWARD_KINDS = ("reward_model", ENSEMBLE_KIND)


@dataclass
class StageResult:
    out_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, Path] = field(default_factory=dict)


def write_manifest(out_dir: str | Path, *, kind: str, base_model: str, tuning: str, config: dict,
                   data_version: Optional[dict] = None, metrics: Optional[dict] = None, **extra: Any) -> Path:
    """`kind` is reward_model | reward_ensemble | anchor | policy. Extra keys (anchor, reward_model, head, ...) are kept as given."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "kind": kind,
        "base_model": base_model,
        "tuning": tuning,
        "data_version": data_version or {},
        "config": config,
        "metrics": metrics or {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return path


def read_manifest(model_dir: str | Path, expect_kind: Optional[str] = None) -> dict:
    path = Path(model_dir) / MANIFEST
    if not path.exists():
        raise UserError(f"{model_dir} is not a PERL artifact: {MANIFEST} is missing")
    manifest = json.loads(path.read_text())
    if expect_kind and manifest.get("kind") != expect_kind:
        raise UserError(f"{path}: expected a {expect_kind} artifact, found kind={manifest.get('kind')!r}")
    return manifest
