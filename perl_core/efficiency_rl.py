"""The policy-RL efficiency workload: full-tuning RL (separate policy, anchor and reward-model
copies) against PERL (one backbone: policy adapter, reward adapter + head, anchor = adapters off).

Both settings run the real loop (`perl_core.rl.rl_loop` on `perl_core.policy_models.build_roles`)
with the same backbone, prompts, batch, k and generation length, each in a fresh process
(`perl_core.efficiency.run_isolated`) so peak memory is not shared between them. The anchor and
the reward model are stand-ins with the production artifact layout (an anchor folder, a LoRA
reward adapter + score head on it): their weights do not change the cost of a step.

    python benchmarks/policy_efficiency.py [--quick]
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional


def prepare_artifacts(backbone_dir: str, out: Path, lora_rank: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """An anchor folder (the backbone as is) and a reward model (LoRA adapter + head on it) under `out`."""
    import shutil

    import torch

    from perl_core.artifacts import write_manifest
    from perl_core.config import LoraConfig, PerlConfig
    from perl_core.modeling import attach_lora, load_sequence_scorer, load_tokenizer
    from perl_core.reward import save_reward_model

    anchor, rm_dir = out / "anchor", out / "reward_model"
    if not (anchor / "manifest.json").exists():
        shutil.copytree(backbone_dir, anchor, dirs_exist_ok=True)
        write_manifest(anchor, kind="anchor", base_model=str(backbone_dir), tuning="none", config={})
    if not (rm_dir / "manifest.json").exists():
        tok = load_tokenizer(str(anchor))
        torch.manual_seed(seed)
        rm = attach_lora(load_sequence_scorer(str(anchor), tok.pad_token_id), LoraConfig(rank=lora_rank), "SEQ_CLS",
                         modules_to_save=["score"])
        with torch.no_grad():
            for name, p in rm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        save_reward_model(rm, tok, rm_dir, PerlConfig(), base=str(anchor), head="score", metrics={})
    return anchor, rm_dir


def policy_workload(tuning: str, anchor_dir: str, reward_model_dir: str, prompts: list[str], steps: int = 12,
                    batch_size: int = 8, k: int = 4, max_new_tokens: int = 32, lora_rank: int = 8,
                    learning_rate: Optional[float] = None, seed: int = 0) -> dict:
    """Run `steps` RL steps in this process; return step times (split) and parameter counts."""
    from perl_core.config import build_config
    from perl_core.policy_models import build_roles
    from perl_core.rl import rl_loop

    cfg = build_config({"policy": {
        "tuning": tuning, "algorithm": "rloo", "k": k, "lora": {"rank": lora_rank},
        "generation": {"max_new_tokens": max_new_tokens},
        "train": {"batch_size": batch_size, "max_steps": steps, "seed": seed, "warmup_ratio": 0.0,
                  "learning_rate": learning_rate or (1e-3 if tuning == "lora" else 1e-5)}}}).policy
    roles = build_roles(cfg, Path(anchor_dir), Path(reward_model_dir), sample_texts=prompts[:32])
    rows: list[dict] = []
    rl_loop(roles, roles.tokenizer, prompts, cfg, callback=lambda m, s: rows.append(m))
    warm = rows[2:] if len(rows) > 3 else rows  # allocator and kernel warm-up

    def med(key: str) -> float:
        return float(statistics.median(r[f"rl/{key}"] for r in warm))

    counts = roles.parameter_counts()
    return {
        "tuning": tuning, "layout": "one backbone" if roles.one_backbone else "separate policy, anchor, reward model",
        "steps": steps, "prompts_per_step": batch_size, "k": k, "max_new_tokens": max_new_tokens,
        "trainable_params": counts["trainable_params"],
        "resident_params": sum(p.numel() for m in _models(roles) for p in m.parameters()),
        "median_step_seconds": med("step_seconds"), "median_generate_seconds": med("generate_seconds"),
        "median_score_seconds": med("score_seconds"), "median_update_seconds": med("update_seconds"),
        "median_response_length": med("response_length"), "median_tokens_per_second": med("tokens_per_second"),
    }


def _models(roles) -> list:
    """Every distinct module holding weights in this process (policy, anchor copy, reward model)."""
    models = [roles.policy]
    if roles.anchor is not None:
        models.append(roles.anchor)
    if getattr(roles, "scorer", None) is not None:
        models.append(roles.scorer.model)
    if getattr(roles, "reward_head", None) is not None:
        models.append(roles.reward_head)
    return models
