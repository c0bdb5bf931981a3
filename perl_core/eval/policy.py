"""Policy evaluation, written as files (JSON, Markdown, PNG) into `out_dir`.

:func:`evaluate_policy` samples the anchor and the policy on held-out prompts with the same
seed and compares them: RM reward (bootstrap CIs, paired gain), win rate under the RM with
ties apart, KL(policy || anchor), the gold oracle where the data has one, response length,
distinct-n and a sample table. RM reward up while gold score down raises the reward-hacking flag.

It returns a flat ``{name: float}`` dict that orchestration can log as metrics.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from perl_core import data as data_api
from perl_core import metrics as M
from perl_core.artifacts import read_manifest
from perl_core.config import EvaluationConfig, PerlConfig
from perl_core.data.synthetic import gold_score
from perl_core.errors import UserError
from perl_core.eval import reporting as R
from perl_core.modeling import encode_prompt, prompts_within
from perl_core.policy.generation import PolicyGenerator, decode_responses, sample_responses
from perl_core.policy.rl import token_logprobs
from perl_core.reward.stage import load_reward_scorer


@torch.no_grad()
def sample_with_logprobs(generator, prompts: Sequence[str], seed: int, gen_cfg, batch_size: int = 32):
    """Sample like :meth:`PolicyGenerator.generate` (same seed -> same text) but keep the token-level
    samples, their summed log-probs under the generator's tempered model pi_T (the distribution
    sampled from, `perl_core.policy.rl.token_logprobs`), and their lengths in tokens.

    Returns ``(texts, samples_per_batch, logp_sums, lengths)``.
    """
    torch.manual_seed(seed)
    texts, batches, logps, lengths = [], [], [], []
    for start in range(0, len(prompts), batch_size):
        ids = [encode_prompt(generator.tokenizer, p) for p in prompts[start:start + batch_size]]
        with generator.autocast():
            samples = sample_responses(generator.model, generator.tokenizer, ids,
                                       max_new_tokens=gen_cfg.max_new_tokens, temperature=gen_cfg.temperature,
                                       top_p=gen_cfg.top_p)
            logp, _ = token_logprobs(generator.model, samples)
        texts += decode_responses(generator.tokenizer, samples)
        batches.append(samples)
        logps.append(logp.sum(-1).cpu())
        lengths.append(samples.response_mask.sum(-1).float())
    return texts, batches, torch.cat(logps).numpy(), torch.cat(lengths).numpy()


@torch.no_grad()
def logprobs_of(generator, batches) -> np.ndarray:
    """Summed log-probs of already sampled responses (another model's samples) under `generator.model`,
    at the temperature they were sampled with."""
    with generator.autocast():
        return torch.cat([token_logprobs(generator.model, s)[0].sum(-1).cpu() for s in batches]).numpy()


def _with_ci(metrics: dict, name: str, values, ev: EvaluationConfig) -> None:
    mean, low, high = M.bootstrap_ci(values, n=ev.bootstrap_samples, confidence=ev.confidence, seed=ev.seed)
    metrics.update({f"{name}": mean, f"{name}_ci_low": low, f"{name}_ci_high": high})


def _with_paired_ci(metrics: dict, name: str, a, b, ev: EvaluationConfig) -> None:
    mean, low, high = M.paired_bootstrap_ci(a, b, n=ev.bootstrap_samples, confidence=ev.confidence, seed=ev.seed)
    metrics.update({f"{name}": mean, f"{name}_ci_low": low, f"{name}_ci_high": high})


def policy_report(prompts: Sequence[str], anchor_responses: Sequence[str], policy_responses: Sequence[str],
                  anchor_rewards, policy_rewards, kl, lengths: tuple, ev: EvaluationConfig,
                  anchor_gold=None, policy_gold=None) -> tuple[dict[str, float], list[dict]]:
    """Everything :func:`evaluate_policy` reports, from already computed per-prompt arrays.

    Unprefixed names describe the policy, ``anchor_*`` the anchor, ``*_gain`` the paired
    difference policy - anchor. `lengths` is (anchor, policy) response lengths in tokens.
    """
    m: dict[str, float] = {"n_prompts": float(len(prompts))}
    _with_ci(m, "reward_mean", policy_rewards, ev)
    _with_ci(m, "anchor_reward_mean", anchor_rewards, ev)
    _with_paired_ci(m, "reward_gain", policy_rewards, anchor_rewards, ev)
    wr = M.win_rate(policy_rewards, anchor_rewards)
    m.update(win_rate=wr["win"], tie_rate=wr["tie"], loss_rate=wr["loss"])
    _with_ci(m, "kl_mean", kl, ev)
    anchor_len, policy_len = lengths
    m.update(response_length_mean=float(np.mean(policy_len)), anchor_response_length_mean=float(np.mean(anchor_len)))
    for n in (1, 2):
        m[f"distinct_{n}"] = M.distinct_n(policy_responses, n)
        m[f"anchor_distinct_{n}"] = M.distinct_n(anchor_responses, n)
    has_gold = policy_gold is not None and anchor_gold is not None
    if has_gold:
        _with_ci(m, "gold_score_mean", policy_gold, ev)
        _with_ci(m, "anchor_gold_score_mean", anchor_gold, ev)
        _with_paired_ci(m, "gold_gain", policy_gold, anchor_gold, ev)
        gwr = M.win_rate(policy_gold, anchor_gold)
        m.update(gold_win_rate=gwr["win"], gold_tie_rate=gwr["tie"], gold_loss_rate=gwr["loss"])
        # the proxy says better while the oracle says worse: the policy exploits the RM
        m["reward_hacking"] = float(m["reward_gain"] > 0 and m["gold_gain"] < 0)
        m["reward_hacking_significant"] = float(m["reward_gain_ci_low"] > 0 and m["gold_gain_ci_high"] < 0)

    samples = []
    for i in range(min(ev.n_samples_table, len(prompts))):
        row = {"prompt": prompts[i], "anchor_response": anchor_responses[i], "policy_response": policy_responses[i],
               "anchor_reward": float(anchor_rewards[i]), "policy_reward": float(policy_rewards[i]), "kl": float(kl[i])}
        if has_gold:
            row.update(anchor_gold=float(anchor_gold[i]), policy_gold=float(policy_gold[i]))
        samples.append(row)
    return m, samples


def _policy_markdown(paths: dict, m: dict, samples: list[dict], confidence: float) -> str:
    pct = f"{confidence:.0%}"

    def ci(name: str) -> str:
        return f"{R.fmt(m[name])} [{R.fmt(m[name + '_ci_low'])}, {R.fmt(m[name + '_ci_high'])}]"

    rows = [["RM reward (mean, " + pct + " CI)", ci("anchor_reward_mean"), ci("reward_mean"), ci("reward_gain")],
            ["win / tie / loss under the RM", "", f"{m['win_rate']:.3f} / {m['tie_rate']:.3f} / {m['loss_rate']:.3f}", ""]]
    if "gold_score_mean" in m:
        rows += [["gold-oracle score", ci("anchor_gold_score_mean"), ci("gold_score_mean"), ci("gold_gain")],
                 ["win / tie / loss under the gold oracle", "",
                  f"{m['gold_win_rate']:.3f} / {m['gold_tie_rate']:.3f} / {m['gold_loss_rate']:.3f}", ""]]
    rows += [["KL(policy ‖ anchor), nats per response", "0", ci("kl_mean"), ""],
             ["response length (tokens)", R.fmt(m["anchor_response_length_mean"]), R.fmt(m["response_length_mean"]), ""],
             ["distinct-1 / distinct-2", f"{m['anchor_distinct_1']:.3f} / {m['anchor_distinct_2']:.3f}",
              f"{m['distinct_1']:.3f} / {m['distinct_2']:.3f}", ""]]
    lines = ["# Policy evaluation", "",
             f"Policy `{paths['policy']}` against anchor `{paths['anchor']}`, scored by reward model "
             f"`{paths['reward_model']}`, on {int(m['n_prompts'])} held-out prompts (same sampling seed for both).", "",
             R.markdown_table(["", "anchor", "policy", "gain (paired)"], rows), ""]
    if m.get("prompts_skipped_too_long"):
        lines += [f"{int(m['prompts_skipped_too_long'])} prompts of the split are longer than "
                  "policy.max_prompt_length and were not sampled from (RL skips them too).", ""]
    if "reward_hacking" in m:
        if m["reward_hacking"]:
            lines.append("**Reward-hacking flag: RM reward rose while the gold-oracle score fell"
                         + (" (both intervals exclude 0).**" if m["reward_hacking_significant"] else ".**"))
        else:
            lines.append("Reward-hacking flag: not raised (the RM and the gold oracle do not disagree in direction).")
        lines.append("")
    if samples:
        headers = ["prompt", "anchor response", "policy response", "RM anchor", "RM policy"]
        if "policy_gold" in samples[0]:
            headers += ["gold anchor", "gold policy"]
        table = [[s["prompt"][-160:], s["anchor_response"], s["policy_response"], s["anchor_reward"], s["policy_reward"]]
                 + ([s["anchor_gold"], s["policy_gold"]] if "policy_gold" in s else []) for s in samples]
        lines += ["## Samples", "", R.markdown_table(headers, table), ""]
    lines += ["![RM reward](policy_rewards.png)", ""]
    if "gold_score_mean" in m:
        lines += ["![gold score](policy_gold.png)", ""]
    return "\n".join(lines)


@torch.no_grad()
def rm_scores(scorer, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """Reward-model scores of generated text, which unlike training data may be empty (EOS sampled
    first) or longer than the RM reads: an empty response is scored as prompt + end token (the
    one rule of `perl_core.scoring`, as in RL), an over-long one loses its oldest prompt tokens,
    never response tokens."""
    return scorer.score(list(prompts), list(responses), batch_size=batch_size, truncation="left").numpy()


def gold_oracle(cfg: PerlConfig) -> Optional[Callable[[str, str], float]]:
    """The dataset's gold scorer when it has one (the embedded synthetic task), else None."""
    if cfg.data.source != "synthetic":
        return None

    return gold_score


def evaluate_policy(cfg: PerlConfig, policy_dir: str | Path, anchor_dir: str | Path, reward_model_dir: str | Path,
                    out_dir: str | Path, split: str = "test") -> dict[str, float]:
    """Compare the policy with its anchor on up to `evaluation.n_prompts` held-out prompts.

    Both sample with `evaluation.seed` and `policy.generation`. KL(policy || anchor) is the
    Monte-Carlo estimate on the policy's own samples, sum over response tokens of
    log pi_T(y_t) - log pi_anchor,T(y_t), both tempered by the sampling temperature T as in RL
    (nats per response; unbiased for the tempered distributions when top_p is 1).
    Writes `policy_eval.{json,md}` and PNG histograms into `out_dir`.
    """

    ev, gen = cfg.evaluation, cfg.policy.generation
    read_manifest(policy_dir, expect_kind="policy")
    read_manifest(anchor_dir, expect_kind="anchor")
    prompts = list(data_api.load_prompts(cfg.data, split))  # looked up at call time: tests stand in for the data
    if not prompts:
        raise UserError(f"the {split} split has no prompts to evaluate the policy on")

    # one model in memory at a time: the policy first, since KL is measured on its samples
    # policy and anchor sample and score under policy.train.precision: one precision on both sides of the KL
    precision = cfg.policy.train.precision
    policy = PolicyGenerator.load(policy_dir, precision=precision)
    # the same filter RL trains under: longer prompts would overrun the positions the RM and the
    # policy were sized for (perl_core.policy.roles)
    limit = cfg.policy.max_prompt_length
    fitting = [p for p, _ in prompts_within(policy.tokenizer, prompts, limit)]
    if not fitting:
        raise UserError(f"no prompt of the {split} split fits policy.max_prompt_length={limit} tokens")
    skipped = len(prompts) - len(fitting)
    prompts = fitting[: ev.n_prompts]
    policy_responses, policy_samples, policy_logp, policy_len = sample_with_logprobs(policy, prompts, ev.seed, gen)
    del policy
    anchor = PolicyGenerator.load(anchor_dir, precision=precision)
    anchor_responses, _, _, anchor_len = sample_with_logprobs(anchor, prompts, ev.seed, gen)
    kl = policy_logp - logprobs_of(anchor, policy_samples)
    del anchor

    scorer = load_reward_scorer(reward_model_dir, cfg.policy.ensemble_aggregation, cfg.policy.ensemble_lambda,
                                precision=cfg.reward.train.precision)
    policy_rewards = rm_scores(scorer, prompts, policy_responses)
    anchor_rewards = rm_scores(scorer, prompts, anchor_responses)
    del scorer
    oracle = gold_oracle(cfg)
    anchor_gold = policy_gold = None
    if oracle is not None:
        anchor_gold = np.array([oracle(p, r) for p, r in zip(prompts, anchor_responses)])
        policy_gold = np.array([oracle(p, r) for p, r in zip(prompts, policy_responses)])

    m, samples = policy_report(prompts, anchor_responses, policy_responses, anchor_rewards, policy_rewards, kl,
                               (anchor_len, policy_len), ev, anchor_gold, policy_gold)
    m["prompts_skipped_too_long"] = float(skipped)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    R.histograms({"anchor": anchor_rewards, "policy": policy_rewards}, out / "policy_rewards.png",
                 "RM reward on held-out prompts", "reward")
    if oracle is not None:
        R.histograms({"anchor": anchor_gold, "policy": policy_gold}, out / "policy_gold.png",
                     "gold-oracle score on held-out prompts", "gold score")
    paths = {"policy": str(policy_dir), "anchor": str(anchor_dir), "reward_model": str(reward_model_dir)}
    R.write_json(out / "policy_eval.json", {**paths, "split": split, "generation": gen.model_dump(),
                                            "evaluation": ev.model_dump(), "metrics": m, "samples": samples})
    (out / "policy_eval.md").write_text(_policy_markdown(paths, m, samples, ev.confidence))
    return {k: v for k, v in m.items() if not (isinstance(v, float) and math.isnan(v))}
