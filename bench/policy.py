"""The policy-RL benchmark: full-tuning RL (separate policy, anchor and reward-model copies)
against PERL (one backbone: policy adapter, reward adapter + head, anchor = adapters off).

Both settings run the real loop (`perl_core.policy.rl.rl_loop` on `perl_core.policy.roles.build_roles`)
with the same backbone, prompts, batch, k and generation length, each in a fresh process
(`isolation.run_isolated`) so peak memory is not shared between them. The anchor and the reward
model are stand-ins with the production artifact layout (an anchor folder, a LoRA reward adapter
+ score head on it): their weights do not change the cost of a step. Reports peak memory, median
step time split into generate / score / update, trainable and resident parameters. Targets on a
~30M backbone: PERL/full memory <= 0.5, step time <= 0.85. Measured, never asserted.

    python benchmarks/policy_efficiency.py [--quick] [--set policy.kl_coef=0.1 ...]
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

from bench.isolation import cost_summary, machine, peak_memory_mb, run_isolated, step_ended, tuning_settings
from perl_core.config import PerlConfig

# The measurement setting, between the preset and the caller's overrides (which win): the anchor
# is a random ~30M backbone (sft.backbone: the anchor's), 10 RLOO steps of 8 prompts x k=4.
MEASURE = ["sft.backbone.name=scratch:llama-small", "sft.backbone.vocab_size=4096", "policy.algorithm=rloo",
           "policy.k=4", "policy.generation.max_new_tokens=32", "policy.train.batch_size=8",
           "policy.train.max_steps=10", "policy.train.warmup_ratio=0.0", "policy.train.learning_rate=0.001"]
QUICK = MEASURE + ["sft.backbone.name=scratch:llama-micro", "sft.backbone.vocab_size=512", "policy.k=2",
                   "policy.generation.max_new_tokens=8", "policy.train.batch_size=2", "policy.train.max_steps=3"]
FULL_LEARNING_RATE = 1e-5  # full tuning moves every weight: its own, smaller step
N_PROMPTS = 256


def policy_settings(preset: str = "default", overrides: Sequence[str] = (), quick: bool = False,
                    full_learning_rate: float = FULL_LEARNING_RATE) -> dict[str, PerlConfig]:
    """The two settings: PERL (LoRA) as configured, and full tuning differing only in `tuning` and its learning rate."""
    return tuning_settings(preset, QUICK if quick else MEASURE, overrides, "policy", full_learning_rate,
                           ("full", "lora"))


def policy_benchmark(preset: str = "default", overrides: Sequence[str] = (), quick: bool = False,
                     work_dir: Optional[str | Path] = None, full_learning_rate: float = FULL_LEARNING_RATE,
                     log: Callable[[str], None] = lambda msg: None) -> dict:
    """Build the stand-in anchor and reward model in `work_dir` (a temporary folder by default), then
    run each setting in a fresh process."""
    from perl_core import data as data_api
    from perl_core.modeling import resolve_backbone

    settings = policy_settings(preset, overrides, quick, full_learning_rate)
    cfg = settings["lora"]
    data_api.prepare_dataset(cfg)  # a fresh clone has no data/ yet; skipped when up to date
    prompts = data_api.load_prompts(cfg.data, "train")[:N_PROMPTS]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work_dir or tmp)
        backbone = resolve_backbone(cfg.sft.backbone, work / "backbones" if quick else cfg.artifacts_dir,
                                    data_api.corpus(cfg.data))
        anchor, rm = prepare_artifacts(backbone, work, cfg.reward.lora.rank)
        results = {}
        for tuning, setting in settings.items():
            log(f"policy benchmark: {tuning}")
            tree = setting.model_dump(mode="json")
            results[tuning] = run_isolated("bench.policy:policy_workload", {
                "config": tree, "anchor_dir": str(anchor), "reward_model_dir": str(rm), "prompts": prompts})
            results[tuning]["config"] = tree
    lora, full = results["lora"], results["full"]
    summary = {
        **cost_summary(lora, full, parts=("generate", "score", "update")),
        "targets": {"memory_ratio": 0.5, "step_time_ratio": 0.85},
    }
    return {"settings": results, "summary": summary, "backbone": backbone,
            "request": {"preset": preset, "overrides": list(overrides), "quick": quick,
                        "full_learning_rate": full_learning_rate, "work_dir": str(work_dir) if work_dir else None},
            "machine": machine()}


def policy_table(report: dict) -> str:
    from perl_core.eval.reporting import markdown_table

    rows = []
    for name, r in report["settings"].items():
        rows.append([f"{name} ({r['layout']})", f"{r['trainable_params']:,}", f"{r['resident_params']:,}",
                     f"{peak_memory_mb(r):.0f}", f"{r['memory']['peak_rss_mb']:.0f}",
                     f"{r['median_step_seconds']:.3f}", f"{r['median_generate_seconds']:.3f}",
                     f"{r['median_score_seconds']:.3f}", f"{r['median_update_seconds']:.3f}",
                     f"{r['median_tokens_per_second']:.0f}"])
    s = report["summary"]
    columns = ["setting", "trainable", "resident", "peak_mb", "peak_rss_mb", "step_s", "generate_s", "score_s",
               "update_s", "tokens/s"]
    return "\n".join([
        markdown_table(columns, rows),
        f"\nPERL/full peak memory ({s['memory_ratio_basis']}): {s['memory_ratio']:.3f} (target <= 0.5); "
        f"absolute peak RSS: {s['absolute_peak_rss_ratio']:.3f}",
        f"PERL/full median step time: {s['step_time_ratio']:.3f} (target <= 0.85); generate "
        f"{s['generate_time_ratio']:.3f}, score {s['score_time_ratio']:.3f}, update {s['update_time_ratio']:.3f}"])


def prepare_artifacts(backbone_dir: str, out: Path, lora_rank: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """An anchor folder (the backbone as is) and a reward model (LoRA adapter + head on it) under `out`."""
    import shutil

    import torch

    from perl_core.artifacts import write_manifest
    from perl_core.config import LoraConfig
    from perl_core.modeling import attach_lora, load_sequence_scorer, load_tokenizer
    from perl_core.reward.train import save_reward_model

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


# ---------------------------------------------------------------- in the fresh process
def policy_workload(config: dict, anchor_dir: str, reward_model_dir: str, prompts: list[str]) -> dict:
    """Run `config`'s policy RL (its `policy` section, all of it) in this process; return step times
    (split) and parameter counts."""
    from perl_core.artifacts import ENSEMBLE_KIND
    from perl_core.reward.stage import read_reward_manifest
    from perl_core.policy.roles import build_ensemble_roles, build_roles
    from perl_core.policy.rl import rl_loop

    cfg = PerlConfig.model_validate(config).policy
    # a reward-model ensemble (its members' adapters on the same backbone) builds its roles as the policy stage does
    build = build_ensemble_roles if read_reward_manifest(Path(reward_model_dir))["kind"] == ENSEMBLE_KIND else build_roles
    roles = build(cfg, Path(anchor_dir), Path(reward_model_dir), sample_texts=prompts[:32])
    rows: list[dict] = []
    def record(metrics: dict, step: int) -> None:
        rows.append(metrics)
        step_ended(metrics["rl/step_seconds"])

    rl_loop(roles, roles.tokenizer, prompts, cfg, callback=record)
    warm = rows[2:] if len(rows) > 3 else rows  # allocator and kernel warm-up

    def med(key: str) -> float:
        return float(statistics.median(r[f"rl/{key}"] for r in warm))

    counts = roles.parameter_counts()
    return {
        "tuning": cfg.tuning, "layout": "one backbone" if roles.one_backbone else "separate policy, anchor, reward model",
        "steps": cfg.train.max_steps, "prompts_per_step": cfg.train.batch_size, "k": cfg.k,
        "max_new_tokens": cfg.generation.max_new_tokens,
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
    for member in getattr(roles, "members", [roles]):  # an ensemble: every member's scorer or head
        if getattr(member, "scorer", None) is not None and all(member.scorer.model is not m for m in models):
            models.append(member.scorer.model)
        if getattr(member, "reward_head", None) is not None:
            models.append(member.reward_head)
    return models
