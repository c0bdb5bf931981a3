"""Exact-resume state: the checkpoint folders every long run writes (SFT, reward model, RL).

A checkpoint is a folder ``step-000123/`` holding safetensors (trainable weights, optimizer
tensors, torch RNG, and the best weights when they are not the latest ones) and one
``state.json`` (step, scheduler, Python/NumPy RNG, optimizer hyper-parameters, and the loop's
own ``extra`` state): nothing is pickled. It is written to a temporary folder and renamed
into place, so a run killed at any moment leaves either the whole checkpoint or none of it.
"""
from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from perl_core.errors import UserError

BEST = "best.safetensors"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise UserError(f"checkpoint does not fit this model: unknown parameters {missing[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def _set_rng_state(rng: dict, torch_states: dict[str, torch.Tensor]) -> None:
    py = rng["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = rng["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch_states["torch"])
    if "cuda" in torch_states and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch_states["cuda"])


def save_checkpoint(checkpoint_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, extra: Optional[dict] = None, best: Optional[dict[str, torch.Tensor]] = None,
                    keep: int = 2) -> Path:
    """Write `checkpoint_dir/step-XXXXXX/` atomically (a temp folder renamed into place), keep the last `keep`.

    `best`: the best weights so far, when they are not the model's current ones (`best.safetensors`).
    """
    checkpoint_dir = Path(checkpoint_dir)
    final = checkpoint_dir / f"step-{step:06d}"
    tmp = checkpoint_dir / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    if best is not None:
        save_file(best, str(tmp / BEST))
    opt_tensors, opt_meta = _optimizer_to_files(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng_tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng_tensors["cuda"] = torch.cuda.get_rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    meta = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict() if scheduler else None,
            "rng": _rng_state(), "extra": extra or {}}
    (tmp / "state.json").write_text(json.dumps(meta))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(checkpoint_dir.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(checkpoint_dir: Optional[Path]) -> Optional[Path]:
    if checkpoint_dir is None or not Path(checkpoint_dir).exists():
        return None
    done = sorted(p for p in Path(checkpoint_dir).glob("step-*") if (p / "state.json").exists())
    return done[-1] if done else None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG from `path`; returns the JSON state (step, extra)."""
    path = Path(path)
    meta = json.loads((path / "state.json").read_text())
    load_trainable_state(model, load_file(str(path / "trainable.safetensors")))
    _optimizer_from_files(optimizer, load_file(str(path / "optimizer.safetensors")), meta["optimizer"])
    if scheduler is not None and meta["scheduler"] is not None:
        scheduler.load_state_dict(meta["scheduler"])
    _set_rng_state(meta["rng"], load_file(str(path / "rng.safetensors")))
    return meta


def load_best_state(path: Path, best_step: int, model: nn.Module) -> dict[str, torch.Tensor]:
    """The best weights as of checkpoint `path` (loaded into `model` already): `best.safetensors`,
    or the model's own weights when the checkpoint's step is the best step."""
    path = Path(path)
    if (path / BEST).exists():
        return load_file(str(path / BEST))
    if best_step != json.loads((path / "state.json").read_text())["step"]:
        warnings.warn(f"{path} records best_step={best_step} but holds no {BEST} (an older checkpoint format): "
                      "the run continues with its latest weights standing in for the best ones", stacklevel=2)
    return trainable_state(model)
