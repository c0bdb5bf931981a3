"""RL rollouts through `generate` (hf) and through a vLLM server (vllm) on identical work.

`engine_workload` trains one policy (`train_policy`: the caller's config, anchor and reward model)
with one `policy.generation.engine` and returns, as means over its steps, the RL step time, the
sampling time and samples/s, the scoring and update times (with vllm: the trainer beside the idle
server, which shows whether the server's threads leave the cores alone), the log-prob guard's gap,
the wall time of the whole stage (with vllm: the server's start-up included), and the RL result at
equal steps: the reward model's score and the gold score of the sampled responses, means over the
last `window` steps. `engines_comparison` runs it once per engine, each in a fresh process, and
gives the ratios vllm / hf; `engine_rows` are the efficiency report's rows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

from bench.isolation import ratio, run_isolated, step_ended

ENGINES = ("hf", "vllm")
# what a row reports, as means over the steps (from the stage's rl/<key> metrics)
STEP_KEYS = ("step_seconds", "generate_seconds", "score_seconds", "update_seconds", "logprob_gap")


def vllm_missing(config: dict) -> Optional[str]:
    """Why a vLLM run cannot start here (None when it can): no server to reach and no environment to start one."""
    from perl_core.policy.vllm_engine import default_python

    vllm = config["policy"]["generation"]["vllm"]
    if vllm.get("url") or vllm.get("python") or default_python() is not None:
        return None
    return "no vLLM environment: `make vllm-env` builds it (or set policy.generation.vllm.python / .url)"


def engine_workload(config: dict, anchor_dir: str, reward_model_dir: str, engine: str, out_dir: str,
                    window: int = 3) -> dict:
    """Train the policy with `engine` into `out_dir/policy_<engine>` and summarise its steps."""
    import shutil
    import time

    from perl_core.config import PerlConfig
    from perl_core.policy.stage import train_policy

    cfg = PerlConfig.model_validate(config)
    cfg.policy.generation.engine = engine
    history: list[dict] = []

    def record(metrics: dict[str, float], step: int) -> None:
        if "rl/step_seconds" in metrics:
            history.append(metrics)
            step_ended(metrics["rl/step_seconds"])

    folder = Path(out_dir) / f"policy_{engine}"
    shutil.rmtree(folder, ignore_errors=True)  # a benchmark's own output: every run trains from the anchor
    started = time.perf_counter()
    train_policy(cfg, folder, anchor_dir, reward_model_dir, callback=record)
    stage_seconds = time.perf_counter() - started

    def mean(key: str, part: Sequence[dict] = history) -> Optional[float]:
        values = [m[f"rl/{key}"] for m in part if f"rl/{key}" in m]
        return sum(values) / len(values) if values else None

    samples = cfg.policy.train.batch_size * cfg.policy.k
    row = {"engine": engine, "steps": len(history), "samples_per_step": samples, "stage_seconds": stage_seconds,
           **{key: mean(key) for key in STEP_KEYS},
           "logprob_gap_max": max(m["rl/logprob_gap_max"] for m in history),
           "first_step_seconds": history[0]["rl/step_seconds"],
           "final_reward": mean("reward", history[-window:]), "final_gold": mean("gold_score", history[-window:])}
    row["samples_per_second"] = samples / row["generate_seconds"]
    return row


def engines_comparison(config: dict, anchor_dir, reward_model_dir, out_dir, engines: Sequence[str] = ENGINES,
                       window: int = 3, log: Callable[[str], None] = print) -> dict:
    """`engine_workload` once per engine, each in a fresh process; vllm / hf ratios when both ran."""
    missing = vllm_missing(config) if "vllm" in engines else None
    if missing:
        return {"skipped": missing}
    out: dict = {"engines": {}}
    for engine in engines:
        log(f"rollout engines: {engine}")
        try:
            out["engines"][engine] = run_isolated("bench.engines:engine_workload", {
                "config": config, "anchor_dir": str(anchor_dir), "reward_model_dir": str(reward_model_dir),
                "engine": engine, "out_dir": str(out_dir), "window": window})
        except RuntimeError as err:  # e.g. a backbone vLLM cannot serve: the report says so and goes on
            out.setdefault("failed", {})[engine] = str(err).splitlines()[-1][:300]
    if {"hf", "vllm"} <= out["engines"].keys():
        hf, vllm = out["engines"]["hf"], out["engines"]["vllm"]
        out["vllm_over_hf"] = {key: ratio(vllm[key], hf[key]) for key in
                               ("step_seconds", "generate_seconds", "samples_per_second", "score_seconds",
                                "update_seconds", "stage_seconds")}
    return out


def engine_rows(result: dict) -> list[dict]:
    """The efficiency report's rows: one per engine that ran, each with its ratio to hf."""
    engines = result.get("engines") or {}
    hf = engines.get("hf")
    rows = []
    for name, r in engines.items():
        rows.append({"engine": name, "step_seconds": r["step_seconds"], "generate_seconds": r["generate_seconds"],
                     "samples_per_second": r["samples_per_second"], "score_seconds": r["score_seconds"],
                     "update_seconds": r["update_seconds"], "logprob_gap_max": r["logprob_gap_max"],
                     "final_reward": r["final_reward"], "final_gold": r["final_gold"],
                     "step_ratio_to_hf": ratio(r["step_seconds"], hf["step_seconds"]) if hf else None,
                     "samples_per_second_ratio_to_hf":
                         ratio(r["samples_per_second"], hf["samples_per_second"]) if hf else None})
    return rows
