"""The reward stage's entry points: one reward model or an ensemble, decided by config or by the folder's manifest."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from perl_core.artifacts import ENSEMBLE_KIND, REWARD_KINDS, StageResult, read_manifest
from perl_core.callbacks import MetricsCallback, null_callback
from perl_core.config import PerlConfig
from perl_core.reward.ensemble import EnsembleScorer, train_reward_ensemble
from perl_core.reward.train import RewardScorer, train_reward_model


def train_reward_stage(cfg: PerlConfig, out_dir: str | Path, callback: MetricsCallback = null_callback,
                       resume: bool = False, base_model: Optional[str] = None) -> StageResult:
    """The pipeline's reward stage: one reward model, or an ensemble when `reward.ensemble.size` is set."""
    train = train_reward_model if cfg.reward.ensemble.size is None else train_reward_ensemble
    return train(cfg, out_dir, callback=callback, resume=resume, base_model=base_model)


def read_reward_manifest(path: str | Path) -> dict:
    """The manifest of a reward model or a reward-model ensemble; anything else is refused by name."""
    return read_manifest(path, expect_kind=REWARD_KINDS)


def load_reward_scorer(path: str | Path, aggregation: Optional[str] = None, lam: Optional[float] = None,
                       device: Optional[torch.device] = None, precision: str = "auto") -> RewardScorer | EnsembleScorer:
    """A reward model's `RewardScorer`, or an ensemble's `EnsembleScorer` aggregating as given."""
    if read_reward_manifest(path)["kind"] == ENSEMBLE_KIND:
        return EnsembleScorer.load(path, device, aggregation, lam, precision)
    return RewardScorer.load(path, device, precision)
