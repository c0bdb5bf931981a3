"""GRPO side by side with TRL's `GRPOTrainer` (the optional `bench` extra): identical work, one run.

Both sides get the same `PerlConfig` (anchor, prompts, batch of B prompts x k samples, max_new_tokens,
temperature, LoRA, learning rate, schedule, seed) and the same objective: the dapo loss, mu update
passes per sampled batch under the clipped ratio (epsilon_low, epsilon_high), group-relative
advantages divided by the group's std, and the KL to the anchor as GRPO's k3 term in the loss with
coefficient kl_coef (`policy.kl_in=loss`; TRL's `beta`). Ours is `train_policy` (LoRA, one backbone:
the anchor is the adapter switched off, the reward model a second adapter and head); TRL's is
`GRPOTrainer(peft_config=...)` (its reference model is the adapter switched off too) rewarded by one
callable that scores with our `RewardScorer` (the same reward model, adapters merged).

TRL counts optimizer steps: with mu passes it generates every mu steps, so it runs mu x max_steps
steps and a batch's time is the sum of its mu steps (its step callbacks). Throughput: B*k*max_steps
samples over the wall time of the whole training call (`samples_per_second_wall`: ours includes
building the roles, TRL's `train()` excludes building the trainer), and B*k over the median batch
time after two warm-up batches (`samples_per_second`). Memory as in `bench.trl_compare`: the peak during
the training steps above a baseline taken with both libraries imported. Quality: the trained
policy's mean reward-model score and gold score on the same held-out prompts, seed fixed.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench import trl_compare as T
from bench.isolation import step_ended


def _preload() -> int:
    from trl import GRPOConfig, GRPOTrainer  # noqa: F401 - in the baseline of both sides

    from perl_core.policy import rewards  # noqa: F401
    return T._preload()


def grpo_overrides(mu: int = 2) -> list[str]:
    """What turns a preset into the compared objective (on our side; TRL's arguments mirror it)."""
    return ["policy.algorithm=grpo", "policy.loss_type=dapo", f"policy.train.updates_per_batch={mu}",
            "policy.kl_in=loss", "policy.scale_advantages=true"]


def _result(library: str, cfg, batch_seconds, train_seconds, trainable, quality, extra=None) -> dict:
    pc = cfg.policy
    median = T._median(batch_seconds)
    return {"library": library, "tuning": pc.tuning, "algorithm": "grpo", "loss_type": pc.loss_type,
            "updates_per_batch": pc.train.updates_per_batch, "k": pc.k, "prompts_per_step": pc.train.batch_size,
            "samples_per_step": pc.train.batch_size * pc.k, "max_new_tokens": pc.generation.max_new_tokens,
            "batches": len(batch_seconds), "median_batch_seconds": median,
            "samples_per_second": pc.train.batch_size * pc.k / median, "train_seconds": train_seconds,
            # the whole training call's wall time, every batch and all overheads included (ours: building the roles too)
            "samples_per_second_wall": pc.train.batch_size * pc.k * pc.train.max_steps / train_seconds,
            "batch_seconds": list(batch_seconds),
            "trainable_params": trainable, **quality, **(extra or {})}


def ours_grpo_workload(config: dict, anchor_dir: str, reward_model_dir: str) -> dict:
    """Our GRPO (`train_policy`, LoRA on one backbone) for the configured batches."""
    from perl_core.config import PerlConfig
    from perl_core.policy.stage import train_policy

    baseline = _preload()
    cfg = PerlConfig.model_validate(config)
    seconds: list[float] = []
    parts: dict[str, list[float]] = {"generate": [], "score": [], "update": []}

    def record(metrics: dict[str, float], step: int) -> None:
        if "rl/step_seconds" in metrics:
            seconds.append(metrics["rl/step_seconds"])
            step_ended(metrics["rl/step_seconds"])
            for part, values in parts.items():
                values.append(metrics[f"rl/{part}_seconds"])

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = train_policy(cfg, Path(tmp) / "policy", anchor_dir, reward_model_dir, callback=record)
        train_seconds = time.perf_counter() - started
        quality = T._policy_quality(cfg, Path(tmp) / "policy", reward_model_dir)
    # where a batch's time goes: sampling, the reward and anchor forwards, the mu update passes
    split = {f"median_{part}_seconds": T._median(values) for part, values in parts.items()}
    return T._finish(_result("perl", cfg, seconds, train_seconds, result.metrics.get("trainable_params"), quality,
                             split), baseline)


def trl_grpo_workload(config: dict, anchor_dir: str, reward_model_dir: str) -> dict:
    """`trl.GRPOTrainer` + peft LoRA on the same anchor, prompts, k, lengths, loss, mu and batches."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    baseline = _preload()
    from perl_core import data as data_api
    from perl_core.config import PerlConfig
    from perl_core.eval.policy import rm_scores
    from perl_core.modeling import load_causal_lm, load_tokenizer, peft_lora_config, prompts_within
    from perl_core.reward.train import RewardScorer
    from perl_core.training import set_seed

    cfg = PerlConfig.model_validate(config)
    pc, tc, gen = cfg.policy, cfg.policy.train, cfg.policy.generation
    mu = tc.updates_per_batch
    tokenizer = load_tokenizer(anchor_dir, padding_side="left")
    prompts = [p for p, _ in prompts_within(tokenizer, data_api.load_prompts(cfg.data, "train"), pc.max_prompt_length)]
    scorer = RewardScorer.load(reward_model_dir)

    def perl_reward_model(prompts, completions, text, **kwargs) -> list[float]:
        return [float(s) for s in rm_scores(scorer, list(text), T.completion_texts(completions))]

    set_seed(tc.seed)
    model = load_causal_lm(anchor_dir)
    timer = T._StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        common = T._common_args(tc, tmp) | {"max_steps": tc.max_steps * mu,
                                            "warmup_steps": int(tc.warmup_ratio * tc.max_steps * mu)}
        args = GRPOConfig(
            # TRL counts completions per device batch; ours counts prompts (each with k samples)
            per_device_train_batch_size=tc.batch_size * pc.k, num_generations=pc.k,
            max_completion_length=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p, top_k=0,
            beta=pc.kl_coef, loss_type=pc.loss_type, num_iterations=mu, epsilon=pc.epsilon_low,
            epsilon_high=pc.epsilon_high, scale_rewards="group" if pc.scale_advantages else "none", **common)
        trainer = GRPOTrainer(model=model, reward_funcs=perl_reward_model, args=args,
                              train_dataset=Dataset.from_list(T.trl_prompts(tokenizer, prompts)),
                              processing_class=tokenizer, peft_config=peft_lora_config(model, pc.lora, "CAUSAL_LM"),
                              callbacks=[timer])
        counts, train_seconds, quality = T.train_and_judge(trainer, cfg, reward_model_dir, tokenizer, scorer)
    steps = timer.seconds
    batches = [sum(steps[i:i + mu]) for i in range(0, len(steps) - mu + 1, mu)]  # a generation and its mu updates
    return T._finish(_result("trl", cfg, batches, train_seconds, counts["trainable"], quality), baseline)


def grpo_comparison(config: dict, anchor_dir: str, reward_model_dir: str, log=print, trl_first: bool = False) -> dict:
    """Ours, then TRL's (or TRL's first), each in a fresh process; the ratios ours / TRL's."""
    from bench.isolation import run_isolated

    out = {"trl_version": T.trl_version()}
    kwargs = {"config": config, "anchor_dir": str(anchor_dir), "reward_model_dir": str(reward_model_dir)}
    sides = [("perl", "ours_grpo_workload"), ("trl", "trl_grpo_workload")]
    for side, target in sides[::-1] if trl_first else sides:
        log(f"GRPO, {side}")
        out[side] = run_isolated(f"bench.trl_grpo:{target}", kwargs)
    ours, theirs = out["perl"], out["trl"]
    out["throughput_ratio"] = ours["samples_per_second_wall"] / theirs["samples_per_second_wall"]
    out["median_batch_throughput_ratio"] = ours["samples_per_second"] / theirs["samples_per_second"]
    out["memory_ratio"] = ours["workload_peak_mb"] / theirs["workload_peak_mb"]
    return out
