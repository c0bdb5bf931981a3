"""What every stage leaves behind: a folder with a `manifest.json`, and a `StageResult` for its caller.

The manifest makes a model traceable: which base it adapts, which anchor and reward model it
was trained against, which data version it learned from, and the exact config.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from perl_core.errors import UserError

MANIFEST = "manifest.json"
ENSEMBLE_KIND = "reward_ensemble"  # several reward models in one folder (perl_core.reward.ensemble)
REWARD_KINDS = ("reward_model", ENSEMBLE_KIND)


@dataclass
class StageResult:
    out_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, Path] = field(default_factory=dict)


def file_hash(path: str | Path, algorithm: str) -> str:
    """Hex digest of a file's bytes with `algorithm` ("sha256", "md5": DVC's), read in 4 MiB blocks
    (GGUF and weight files are larger than memory should hold twice)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


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


def read_manifest(model_dir: str | Path, expect_kind: Optional[str | tuple[str, ...]] = None) -> dict:
    folder = Path(model_dir)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise UserError(f"{model_dir} " + ("is a file, not an artifact folder" if folder.exists()
                                          else "does not exist"))
    if not path.exists():
        raise UserError(f"{model_dir} is not a PERL artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is damaged ({err}); retrain the artifact or restore the folder") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: expected a JSON object with 'kind', got {type(manifest).__name__}")
    kinds = (expect_kind,) if isinstance(expect_kind, str) else expect_kind
    if kinds and manifest.get("kind") not in kinds:
        wanted = " or ".join(kinds)
        raise UserError(f"{path}: expected {'an' if wanted[0] in 'aeiou' else 'a'} {wanted} artifact, "
                        f"found kind={manifest.get('kind')!r}")
    return manifest


def check_model_files(model_dir: str | Path, manifest: dict) -> None:
    """The files a loader reads next to the manifest (tokenizer, model or adapter config, safetensors
    weights), and the base an adapter needs: a clear error now instead of a loader's traceback later."""
    folder = Path(model_dir)
    need = {"tokenizer_config.json": "the tokenizer",
            "adapter_config.json" if (folder / "adapter_config.json").exists() else "config.json": "the model config"}
    for name, what in need.items():
        try:
            json.loads((folder / name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{folder} is not a complete {manifest.get('kind', 'PERL')} artifact: {name} "
                            f"({what}) is missing; retrain it or restore the folder") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{folder / name} is damaged ({err}); retrain the artifact or restore the folder") from None
    if not any(folder.glob("*.safetensors")):
        raise UserError(f"{folder} is not a complete {manifest.get('kind', 'PERL')} artifact: no *.safetensors "
                        "weights; retrain it or restore the folder")
    if (folder / "adapter_config.json").exists():
        base = manifest.get("anchor") or manifest.get("base_model")
        if base and Path(base).is_absolute() and not Path(base).exists():
            raise UserError(f"{folder / MANIFEST}: the adapter's base model {base} is missing; "
                            "restore that folder or retrain this artifact")
