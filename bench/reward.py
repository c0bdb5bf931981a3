"""LoRA vs full-tuning reward models: same data, same backbone, each setting in a fresh process.

:func:`reward_benchmark` reports trainable parameters, peak memory (see `isolation.py` for what
is measured and which number the ratio uses), median step time, examples/s and the final
validation metric. PERL's claim on a ~30M backbone: LoRA/full peak memory <= 0.5, step time
<= 0.65, validation metric within 1 point. Measured, never asserted.

    python benchmarks/reward_efficiency.py [--quick] [--set reward.lora.rank=4 ...]
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from bench.isolation import (cost_summary, machine, median_step_seconds, peak_memory_mb, run_isolated,
                             step_ended, tuning_settings)
from perl_core.config import PerlConfig

# The measurement setting, between the preset (data, LoRA settings) and the caller's overrides
# (which win): a ~30M backbone, 60 steps of 8 pairs, one evaluation at the end on 200 pairs.
MEASURE = ["reward.backbone.name=scratch:llama-small", "reward.backbone.vocab_size=4096",
           "reward.train.max_steps=60", "reward.train.batch_size=8", "reward.train.learning_rate=0.001",
           "reward.max_length=128", "reward.eval_examples=200", "reward.objective=pairwise",
           "reward.truncation=left"]
# --quick: the report's shape in CI, not its numbers
QUICK = MEASURE + ["reward.backbone.name=scratch:llama-micro", "reward.backbone.vocab_size=512",
                   "reward.train.max_steps=4", "reward.train.batch_size=4", "reward.eval_examples=16"]
# full tuning moves every weight: its own, smaller learning rate (the config's is the LoRA setting's)
FULL_LEARNING_RATE = 1e-4
ORDER = ("lora", "full")  # which setting runs first matters on a shared machine (load drifts)


def reward_settings(preset: str = "default", overrides: Sequence[str] = (), quick: bool = False,
                    full_learning_rate: float = FULL_LEARNING_RATE) -> dict[str, PerlConfig]:
    """The two settings: LoRA as configured, and full tuning differing only in `tuning` and its learning rate."""
    return tuning_settings(preset, QUICK if quick else MEASURE, overrides, "reward", full_learning_rate,
                           ("lora", "full"))


def reward_benchmark(preset: str = "default", overrides: Sequence[str] = (), quick: bool = False,
                     full_learning_rate: float = FULL_LEARNING_RATE, order: Sequence[str] = ORDER,
                     log: Callable[[str], None] = lambda msg: None) -> dict:
    """Prepare the data and the backbone once, then train each setting in a fresh process."""
    from perl_core import data as data_api
    from perl_core.modeling import resolve_backbone

    if sorted(order) != ["full", "lora"]:
        raise ValueError(f"order must name lora and full once each, got {list(order)}")
    settings = reward_settings(preset, overrides, quick, full_learning_rate)
    cfg = settings["lora"]
    data_api.prepare_dataset(cfg)  # a fresh clone has no data/ yet; skipped when up to date
    corpus = data_api.corpus(cfg.data) if cfg.reward.backbone.name.startswith("scratch:") else None
    # both settings load the very same files
    backbone = resolve_backbone(cfg.reward.backbone, cfg.artifacts_dir, corpus)
    results = {}
    for tuning in order:
        setting = settings[tuning]
        setting.reward.backbone.name = backbone
        log(f"reward benchmark: {tuning}")
        results[tuning] = run_isolated("bench.reward:reward_workload",
                                       {"config": setting.model_dump(mode="json")})
        results[tuning]["config"] = setting.model_dump(mode="json")
    lora, full = results["lora"], results["full"]
    summary = {
        **cost_summary(lora, full),
        "validation_metric": lora["validation_metric"],
        "validation_gap_points": 100 * (lora["validation_value"] - full["validation_value"]),
        "targets": {"memory_ratio": 0.5, "step_time_ratio": 0.65, "validation_gap_points": -1.0},
    }
    return {"settings": results, "summary": summary,
            "request": {"preset": preset, "overrides": list(overrides), "quick": quick,
                        "full_learning_rate": full_learning_rate, "order": list(order)},
            "machine": machine()}


def reward_table(report: dict) -> str:
    from perl_core.eval.reporting import markdown_table

    rows = []
    for tuning, r in report["settings"].items():
        rows.append([tuning, f"{r['trainable_params']:,}", f"{peak_memory_mb(r):.0f}", f"{r['memory']['peak_rss_mb']:.0f}",
                     f"{r['median_step_seconds']:.3f}", f"{r['examples_per_second']:.1f}",
                     f"{r['validation_metric']}={r['validation_value']:.4f}"])
    s = report["summary"]
    columns = ["tuning", "trainable_params", "peak_mb", "peak_rss_mb", "median_step_s", "examples_per_s", "validation"]
    return "\n".join([
        markdown_table(columns, rows),
        f"\nLoRA/full peak memory ({s['memory_ratio_basis']}): {s['memory_ratio']:.3f} (target <= 0.5); "
        f"absolute peak RSS: {s['absolute_peak_rss_ratio']:.3f}",
        f"LoRA/full median step time: {s['step_time_ratio']:.3f} (target <= 0.65)",
        f"LoRA - full {s['validation_metric']}: {s['validation_gap_points']:+.2f} points (target >= -1)"])


# ---------------------------------------------------------------- the workload (in the fresh process)
def validation_scores(cfg: PerlConfig, model_dir: Path) -> dict[str, list[dict]]:
    """The saved reward model's score of each validation row its training evaluated (the `reward.eval_examples`
    sample), per row as evaluations save them: the report's intervals of the quality and of LoRA - full."""
    from perl_core.reward.ensemble import validation_rows
    from perl_core.reward.train import RewardScorer, score_rows

    rows, numbers = validation_rows(cfg)
    scorer, objective = RewardScorer.load(model_dir), cfg.reward.objective
    prompts = [r["prompt"] for r in rows]
    if objective == "pairwise":  # [chosen..., rejected...]
        scores = torch.cat([scorer.score(prompts, [r["chosen"] for r in rows]),
                            scorer.score(prompts, [r["rejected"] for r in rows])])
    else:
        scores = scorer.score(prompts, [r["response"] for r in rows])
    return {objective: score_rows(rows, scores, objective, numbers)}



def reward_workload(config: dict, out_dir: Optional[str] = None) -> dict:
    """Train one reward model (`train_reward_model`, the real code path) on `config` and report its cost.

    Examples are what the objective counts: preference pairs (two sequences each) for
    pairwise, single responses for pointwise.
    """
    from perl_core.reward.train import train_reward_model

    cfg = PerlConfig.model_validate(config)
    steps: list[float] = []

    def record(metrics: dict[str, float], step: int) -> None:
        if "train/step_seconds" in metrics:
            steps.append(metrics["train/step_seconds"])
            step_ended(metrics["train/step_seconds"])

    with tempfile.TemporaryDirectory() as tmp:
        result = train_reward_model(cfg, Path(out_dir or tmp), callback=record)
        # per-row validation scores: the report's interval of the quality and of LoRA - full
        validation_rows = validation_scores(cfg, result.artifacts["reward_model"])
    metric = "pairwise_accuracy" if cfg.reward.objective == "pairwise" else "roc_auc"
    median = median_step_seconds(steps)
    batch = cfg.reward.train.batch_size * cfg.reward.train.grad_accum
    return {
        "tuning": cfg.reward.tuning,
        "backbone": cfg.reward.backbone.name,
        "trainable_params": int(result.metrics["trainable_params"]),
        "total_params": int(result.metrics["total_params"]),
        "steps": int(result.metrics["steps"]),
        "batch_size": batch,
        "median_step_seconds": median,
        "examples_per_second": batch / median,
        "validation_metric": metric,
        "validation_value": float(result.metrics[f"validation/{metric}"]),
        "validation_rows": validation_rows,
        "train_seconds": float(result.metrics["train_seconds"]),
    }
