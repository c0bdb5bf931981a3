"""Side by side with Hugging Face TRL (the optional `bench` extra: `pip install -e .[bench]`).

Each function here is a benchmark *workload*: :func:`bench.isolation.run_isolated` runs
it in a fresh Python process and adds the memory block. Our side and TRL's side receive the same
`PerlConfig` (backbone, data, batch, sequence length, LoRA settings, learning rate, schedule, step
count, seed), so the only difference is the library doing the training.

Reward model: ours is `perl_core.reward.train.train_reward_model`; TRL's is `trl.RewardTrainer` with
a `peft.LoraConfig` (task SEQ_CLS, the score head in `modules_to_save`, as ours). Both are
scored afterwards on the same validation pairs by the same function.

Policy RL: ours is `perl_core.policy.stage.train_policy` (RLOO, k samples per prompt, one backbone);
TRL 1.16's `RLOOTrainer(model, reward_funcs, args, train_dataset, processing_class,
peft_config)` takes *reward functions*, not a reward-model argument: we pass one callable that
scores with our `RewardScorer` (the same trained RM our side uses, adapters merged). Step time is
seconds per RL step (generate + score + update) at the same prompts x k samples per step.

Memory is fair only if both sides have the same libraries imported when the baseline is taken:
every workload here first imports trl, datasets and accelerate, then records its own baseline
(`workload_baseline_rss_mb`), and the ratio uses the peak during the training steps - that baseline
(`workload_peak_mb`; the whole run's peak - baseline is `workload_process_peak_mb`).
TRL is imported lazily, so the core package works without the extra.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from bench.isolation import (_rss_bytes, median_step_seconds, process_peak_bytes, step_ended,
                             steps_peak_bytes)

MB = 1024 * 1024


def trl_version() -> Optional[str]:
    """The installed TRL's version, or None without the `bench` extra."""
    try:
        import trl
    except ImportError:
        return None
    return trl.__version__


def trl_available() -> bool:
    return trl_version() is not None


def _preload() -> int:
    """Import what either side may import, then return the resident set size (the workload baseline).

    The union matters: importing TRL's trainer classes alone adds ~180 MB of resident memory, and
    our data, tokenizer and generation modules load lazily. A module one side imports after its
    baseline would count as that side's peak memory (docs/evaluation.md, "What the memory numbers
    are made of")."""
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import trl  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401
    from trl import RewardConfig, RewardTrainer, RLOOConfig, RLOOTrainer  # noqa: F401

    from perl_core import data, modeling, reward  # noqa: F401
    from perl_core.policy import generation, rl, roles  # noqa: F401
    from perl_core.data import versioning  # noqa: F401
    return _rss_bytes()


def _finish(result: dict, baseline: int) -> dict:
    """The memory the comparison uses: the peak during the training steps (`bench.isolation.MemoryTimeline`)
    above the workload's own baseline, and the whole run's beside it."""
    steps = steps_peak_bytes()
    result["workload_baseline_rss_mb"] = baseline / MB
    result["workload_process_peak_mb"] = (process_peak_bytes() - baseline) / MB
    result["workload_peak_mb"] = (steps - baseline) / MB if steps is not None else result["workload_process_peak_mb"]
    return result


class _StepTimer:
    """A `transformers.TrainerCallback` recording wall time per optimizer step."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def __init__(self):
                self.seconds: list[float] = []
                self._t0 = 0.0

            def on_step_begin(self, args, state, control, **kwargs):
                self._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                self.seconds.append(time.perf_counter() - self._t0)
                step_ended(self.seconds[-1])

        return Timer()


def _common_args(tc, out_dir: str) -> dict:
    """TrainingArguments shared by both TRL trainers, mirroring our `TrainConfig`.

    TRL's own defaults differ from ours (gradient checkpointing on, bf16 on, dropout kept);
    they are set to what our side does, so the comparison is of the libraries, not the settings.
    """
    return dict(
        output_dir=out_dir, max_steps=tc.max_steps, learning_rate=tc.learning_rate, weight_decay=tc.weight_decay,
        gradient_accumulation_steps=tc.grad_accum, lr_scheduler_type=tc.schedule if tc.schedule != "constant" else
        "constant_with_warmup", warmup_steps=int(tc.warmup_ratio * tc.max_steps), max_grad_norm=tc.max_grad_norm,
        seed=tc.seed, gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, report_to="none",
        save_strategy="no", eval_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
        disable_dropout=True,
    )


def _median(times: Sequence[float], warmup: int = 2) -> float:
    return median_step_seconds(times, warmup=min(warmup, max(0, len(times) - 1)))


# ---------------------------------------------------------------- reward model
def ours_reward_workload(config: dict) -> dict:
    """Our reward model (the real `train_reward_model`), with the same preloaded libraries as TRL's side."""
    from bench.reward import reward_workload

    baseline = _preload()
    result = reward_workload(config)
    result["library"] = "perl"
    return _finish(result, baseline)


def trl_reward_workload(config: dict) -> dict:
    """`trl.RewardTrainer` + peft LoRA on the same backbone, pairs, batch, max_length and steps."""
    import torch
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    baseline = _preload()
    from perl_core import data as data_api
    from perl_core.config import PerlConfig
    from perl_core.metrics import pairwise_accuracy
    from perl_core.modeling import (load_sequence_scorer, load_tokenizer, parameter_counts, peft_lora_config,
                                    resolve_backbone)
    from perl_core.reward.train import head_name, score_sequences
    from perl_core.training import eval_subset, set_seed

    cfg = PerlConfig.model_validate(config)
    rcfg, tc = cfg.reward, cfg.reward.train
    if rcfg.objective != "pairwise":
        raise ValueError("the TRL comparison trains pairwise reward models (RewardTrainer's format)")
    corpus = data_api.corpus(cfg.data) if rcfg.backbone.name.startswith("scratch:") else None
    base = resolve_backbone(rcfg.backbone, cfg.artifacts_dir, corpus)
    tokenizer = load_tokenizer(base)
    keep = ("prompt", "chosen", "rejected")
    train_rows = [{k: r[k] for k in keep} for r in data_api.load_rows(cfg.data, "pairwise", "train")]
    val_rows = data_api.load_rows(cfg.data, "pairwise", "validation")
    # the same seeded validation sample train_reward_model scores
    val_rows = [val_rows[i] for i in eval_subset(len(val_rows), rcfg.eval_examples, tc.seed)]

    eos = tokenizer.eos_token or ""

    def ids(text: str) -> list[int]:  # how RewardTrainer tokenises: prompt + response + eos, one string
        return tokenizer(text + eos)["input_ids"][: rcfg.max_length]

    # Ours batches by length (perl_core.reward.train.length_buckets); TRL's equivalent is the Trainer's
    # LengthGroupedSampler. Without it TRL samples random batches, whose widest batch in a short run
    # is narrower than the data's longest pair, and peak memory (set by the widest batch) is not
    # comparable. The "length" column is what that sampler reads.
    for r in train_rows:
        r["length"] = max(len(ids(r["prompt"] + r["chosen"])), len(ids(r["prompt"] + r["rejected"])))

    set_seed(tc.seed)
    model = load_sequence_scorer(base, tokenizer.pad_token_id, rcfg.backbone.dtype)
    head = head_name(model)
    timer = _StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        args = RewardConfig(per_device_train_batch_size=tc.batch_size, max_length=rcfg.max_length,
                            train_sampling_strategy="group_by_length", length_column_name="length",
                            remove_unused_columns=False, **_common_args(tc, tmp))
        trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                                processing_class=tokenizer,
                                peft_config=peft_lora_config(model, rcfg.lora, "SEQ_CLS", [head]),
                                callbacks=[timer])
        counts = parameter_counts(trainer.model)
        started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - started

    # quality: the same validation pairs, tokenised the way RewardTrainer tokenised its training
    # text (prompt + response + eos as one string), scored by the same function our side uses
    trained = trainer.model.eval()
    with torch.no_grad():
        chosen, rejected = [], []
        for start in range(0, len(val_rows), 32):
            batch = val_rows[start:start + 32]
            chosen.append(score_sequences(trained, [ids(r["prompt"] + r["chosen"]) for r in batch], tokenizer.pad_token_id))
            rejected.append(score_sequences(trained, [ids(r["prompt"] + r["rejected"]) for r in batch],
                                            tokenizer.pad_token_id))
    batch = tc.batch_size * tc.grad_accum
    median = _median(timer.seconds)
    return _finish({
        "library": "trl", "tuning": "lora", "backbone": rcfg.backbone.name,
        "trainable_params": counts["trainable"], "total_params": counts["total"], "steps": len(timer.seconds),
        "batch_size": batch, "median_step_seconds": median, "examples_per_second": batch / median,
        "validation_metric": "pairwise_accuracy",
        "validation_value": pairwise_accuracy(torch.cat(chosen), torch.cat(rejected)),
        "train_seconds": train_seconds,
    }, baseline)


# ---------------------------------------------------------------- policy RL (RLOO)
def ours_rloo_workload(config: dict, anchor_dir: str, reward_model_dir: str) -> dict:
    """Our RLOO (`train_policy`, LoRA, one backbone) for the configured steps; seconds per RL step."""
    from perl_core.config import PerlConfig
    from perl_core.policy.stage import train_policy

    baseline = _preload()
    cfg = PerlConfig.model_validate(config)
    steps: list[float] = []
    gold: list[float] = []
    rewards: list[float] = []

    def record(metrics: dict[str, float], step: int) -> None:
        if "rl/step_seconds" in metrics:
            steps.append(metrics["rl/step_seconds"])
            step_ended(metrics["rl/step_seconds"])
            rewards.append(metrics["rl/reward"])
            if "rl/gold_score" in metrics:
                gold.append(metrics["rl/gold_score"])

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = train_policy(cfg, Path(tmp) / "policy", anchor_dir, reward_model_dir, callback=record)
        train_seconds = time.perf_counter() - started
        quality = _policy_quality(cfg, Path(tmp) / "policy", reward_model_dir)
    return _finish(_rl_result("perl", cfg, steps, rewards, gold, result.metrics.get("trainable_params"),
                              train_seconds, quality), baseline)


def trl_rloo_workload(config: dict, anchor_dir: str, reward_model_dir: str) -> dict:
    """`trl.RLOOTrainer` + peft LoRA on the same anchor, prompts, k, lengths and steps, rewarded by our RM."""
    import torch
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    baseline = _preload()
    from perl_core import data as data_api
    from perl_core.config import PerlConfig
    from perl_core.modeling import load_causal_lm, load_tokenizer, peft_lora_config, prompts_within
    from perl_core.reward.train import RewardScorer
    from perl_core.training import set_seed

    cfg = PerlConfig.model_validate(config)
    pc, tc, gen = cfg.policy, cfg.policy.train, cfg.policy.generation
    tokenizer = load_tokenizer(anchor_dir, padding_side="left")
    prompts = [p for p, _ in prompts_within(tokenizer, data_api.load_prompts(cfg.data, "train"), pc.max_prompt_length)]
    scorer = RewardScorer.load(reward_model_dir)
    rm_calls: list[float] = []

    def perl_reward_model(prompts, completions, text, **kwargs) -> list[float]:
        from perl_core.eval.policy import rm_scores

        t0 = time.perf_counter()
        scores = rm_scores(scorer, list(text), completion_texts(completions))
        rm_calls.append(time.perf_counter() - t0)
        return [float(s) for s in scores]

    set_seed(tc.seed)
    model = load_causal_lm(anchor_dir)
    timer = _StepTimer()
    common = _common_args(tc, "")
    with tempfile.TemporaryDirectory() as tmp:
        common["output_dir"] = tmp
        args = RLOOConfig(
            # TRL counts completions per device batch; ours counts prompts (each with k samples)
            per_device_train_batch_size=tc.batch_size * pc.k, num_generations=pc.k,
            max_completion_length=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p, top_k=0,
            beta=pc.kl_coef, normalize_advantages=False, num_iterations=1, **common)
        trainer = RLOOTrainer(model=model, reward_funcs=perl_reward_model, args=args,
                              train_dataset=Dataset.from_list(trl_prompts(tokenizer, prompts)),
                              processing_class=tokenizer, peft_config=peft_lora_config(model, pc.lora, "CAUSAL_LM"),
                              callbacks=[timer])
        counts, train_seconds, quality = train_and_judge(trainer, cfg, reward_model_dir, tokenizer, scorer)
        rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return _finish(_rl_result("trl", cfg, timer.seconds, rewards, [], counts["trainable"], train_seconds, quality,
                              extra={"rm_seconds_total": sum(rm_calls)}), baseline)


def trl_prompts(tokenizer, prompts: Sequence[str]) -> list[dict]:
    """TRL's training rows for our prompts. A chat model gets the turns ours renders, as messages (TRL
    applies the same chat template with the generation prompt); `text` is our prompt, which TRL hands
    the reward callable as a keyword and which our reward model reads."""
    from perl_core.modeling import prompt_messages, uses_chat_template

    chat = uses_chat_template(tokenizer)
    return [{"prompt": prompt_messages(p) if chat else p, "text": p} for p in prompts]


def completion_texts(completions) -> list[str]:
    """TRL's completions as text: a chat model's are messages, the answer the last one's content."""
    return [c[-1]["content"] if isinstance(c, list) else c for c in completions]


def train_and_judge(trainer, cfg, reward_model_dir, tokenizer, scorer) -> tuple[dict, float, dict]:
    """Train a TRL trainer (timed), then judge its policy, adapter merged, as ours is judged:
    (parameter counts, training seconds, quality)."""
    from perl_core.modeling import parameter_counts

    counts = parameter_counts(trainer.model)
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    trainer.model.eval()
    merged = trainer.model.merge_and_unload() if hasattr(trainer.model, "merge_and_unload") else trainer.model
    return counts, train_seconds, _policy_quality(cfg, None, reward_model_dir, model=merged, tokenizer=tokenizer,
                                                  scorer=scorer)


def _rl_result(library: str, cfg, steps, rewards, gold, trainable, train_seconds, quality, extra=None) -> dict:
    pc = cfg.policy
    median = _median(steps)
    return {"library": library, "tuning": pc.tuning, "algorithm": "rloo", "k": pc.k,
            "prompts_per_step": pc.train.batch_size, "samples_per_step": pc.train.batch_size * pc.k,
            "max_new_tokens": pc.generation.max_new_tokens, "steps": len(steps), "trainable_params": trainable,
            "median_step_seconds": median, "samples_per_second": pc.train.batch_size * pc.k / median,
            "train_reward_last": rewards[-1] if rewards else None, "train_seconds": train_seconds,
            **quality, **(extra or {})}


def _policy_quality(cfg, policy_dir, reward_model_dir, *, model=None, tokenizer=None, scorer=None,
                    n_prompts: int = 64) -> dict:
    """Mean RM reward (and gold score when the data has an oracle) of greedy-free samples on
    held-out prompts, seed fixed: the same measurement for both libraries' policies."""
    import numpy as np

    from perl_core import data as data_api
    from perl_core.eval.policy import gold_oracle, rm_scores
    from perl_core.policy.generation import PolicyGenerator
    from perl_core.reward.train import RewardScorer

    if model is None:
        generator = PolicyGenerator.load(policy_dir)
    else:
        generator = PolicyGenerator(model, tokenizer, {"config": {}}, Path("."))
    scorer = scorer or RewardScorer.load(reward_model_dir)
    prompts = list(data_api.load_prompts(cfg.data, "validation"))[:n_prompts]
    gen = cfg.policy.generation
    responses = generator.generate(prompts, seed=cfg.evaluation.seed, max_new_tokens=gen.max_new_tokens,
                                   temperature=gen.temperature, top_p=gen.top_p)
    out = {"quality_metric": "validation_rm_reward", "validation_rm_reward": float(np.mean(rm_scores(scorer, prompts, responses)))}
    oracle = gold_oracle(cfg)
    if oracle is not None:
        out["validation_gold_score"] = float(np.mean([oracle(p, r) for p, r in zip(prompts, responses)]))
    return out
