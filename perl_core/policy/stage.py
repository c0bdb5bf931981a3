"""The policy stage: RL the anchor against the reward model and write the policy artifact.

The roles come from `perl_core.policy.roles` (or `perl_core.reward.ensemble` for a reward-model ensemble),
the loop and its math from `perl_core.policy.rl`.
"""
from __future__ import annotations

from pathlib import Path

from perl_core import parallel
from perl_core.artifacts import ENSEMBLE_KIND, StageResult, read_manifest, write_manifest
from perl_core.callbacks import MetricsCallback, SamplesCallback, null_callback, null_samples
from perl_core.config import PerlConfig
from perl_core import data as data_api
from perl_core.data import versioning
from perl_core.data.synthetic import gold_score
from perl_core.devices import autocast_dtype, run_device
from perl_core.errors import UserError
from perl_core.policy.rl import rl_loop
from perl_core.policy.roles import build_ensemble_roles, build_roles
from perl_core.policy.vllm_engine import policy_sampler
from perl_core.reward.stage import read_reward_manifest


def _summary(history: list[dict[str, float]], last: int = 10) -> dict[str, float]:
    """Means over the last `last` steps (RL metrics are noisy step to step)."""
    tail = history[-last:]
    return {f"final_{k}": sum(h[k] for h in tail) / len(tail) for k in tail[0]} if tail else {}


def train_policy(cfg: PerlConfig, out_dir: str | Path, anchor_dir: str | Path, reward_model_dir: str | Path,
                 callback: MetricsCallback = null_callback, resume: bool = False,
                 samples_callback: SamplesCallback = null_samples) -> StageResult:
    """RL the anchor against the reward model; writes the policy (PEFT adapter or full model) to `out_dir`."""
    autocast_dtype(cfg.policy.train.precision, run_device(), "policy.train.precision")  # refuse before any work
    parallel.per_process(cfg.policy.train.batch_size, "policy.train.batch_size")
    if cfg.policy.generation.engine == "vllm" and parallel.world_size() > 1:
        raise UserError("policy.generation.engine=vllm samples through one vLLM server: run the policy stage in "
                        "one process (or use engine hf under accelerate launch)")
    out_dir, anchor_dir, reward_model_dir = Path(out_dir), Path(anchor_dir), Path(reward_model_dir)
    anchor_manifest = read_manifest(anchor_dir, expect_kind="anchor")
    rm_manifest = read_reward_manifest(reward_model_dir)
    prompts = data_api.load_prompts(cfg.data, "train")  # looked up at call time: tests stand in for the data
    build = build_ensemble_roles if rm_manifest["kind"] == ENSEMBLE_KIND else build_roles
    roles = build(cfg.policy, anchor_dir, reward_model_dir, sample_texts=prompts[:64])
    gold = gold_score if cfg.data.source == "synthetic" else None
    # reward functions read the prompts' data rows; the reward model is still loaded when none lists it
    # (the roles share its backbone) but then never scores
    rows = None
    if not all(term.function is None for term in cfg.policy.rewards):
        rows = data_api.load_prompt_rows(cfg.data, "train")
    with policy_sampler(cfg.policy, roles.policy, roles.tokenizer, anchor_dir, out_dir) as sampler:
        result = rl_loop(roles, roles.tokenizer, prompts, cfg.policy, callback=callback,
                         checkpoint_dir=out_dir / "checkpoints", resume=resume, gold_score=gold,
                         samples_callback=samples_callback, prompt_rows=rows, sampler=sampler)
    # final_kl_coef, like every final_* metric, is the mean over the last steps (`_summary`);
    # the coefficient the run ended on is `last_kl_coef`
    metrics = _summary(result.history) | {"steps": result.step, "seconds": result.seconds,
                                          "last_kl_coef": result.kl_coef, **roles.parameter_counts()}
    if not parallel.is_main():  # the main process writes the policy; the others wait for it
        parallel.barrier()
        return StageResult(out_dir, metrics, {"policy": out_dir})
    roles.save_policy(out_dir)
    write_manifest(out_dir, kind="policy", base_model=str(anchor_dir), tuning=cfg.policy.tuning,
                   config=cfg.policy.model_dump(mode="json"), data_version=versioning.recorded_version(), metrics=metrics,
                   anchor=str(anchor_dir.resolve()), reward_model=str(reward_model_dir.resolve()),
                   backbone=anchor_manifest.get("base_model"), reward_model_base=rm_manifest.get("base_model"),
                   one_backbone=roles.one_backbone)
    parallel.barrier()
    return StageResult(out_dir, metrics, {"policy": out_dir})
