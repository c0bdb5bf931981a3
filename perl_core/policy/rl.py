"""Policy RL against the reward model, anchored by KL: REINFORCE with a baseline, RLOO and GRPO.

One step, top to bottom (PERL, arXiv 2403.10704, with REINFORCE / RLOO as in Ahmadian et al. 2024):

    y_1..y_k ~ pi(. | x)                        for each of B prompts x   (one batched `generate`)
    r_i      = RM(x, y_i)                       normalised by running moments, optionally clipped
                                                (an ensemble: mean, min or mean - lambda*std over its members;
                                                with policy.rewards, sum_j w_j r_ij: perl_core.policy.rewards)
    KL_i     = sum_t log pi(y_it | .) - log pi_anchor(y_it | .)       (per-token log-ratios)
    R_i      = r_i - beta * KL_i                the KL-regularised reward
    A_i      = R_i - mean_{j != i} R_j          rloo: leave-one-out over the k samples
             = R_i - b                          reinforce: b a moving average or a learned value
    loss     = - mean_i  A_i * sum_t log pi(y_it | .)
    beta    <- beta * (1 + clip(KL / target_kl - 1, -0.2, 0.2) * B*k / kl_horizon)    (adaptive_kl)

GRPO (Shao et al. 2024), with DAPO's (Yu et al. 2025) and Dr. GRPO's (Liu et al. 2025) corrections:

    A_i      = (R_i - mean_g R) / (std_g R + 1e-4)     over the k samples g of a prompt (scale_advantages;
                                                       without it centred only)
    rho_it   = pi(y_it | .) / pi_old(y_it | .)          pi_old: the policy's log-probs of the sampled tokens
                                                       before the batch's first update pass, kept for all mu
    o_it     = min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i)  [ - beta * k3_it  (kl_in=loss) ]
    k3_it    = exp(q_it - l_it) - (q_it - l_it) - 1    q, l: the anchor's and the policy's log-probs
    loss     = - mean_i (1/|y_i|) sum_t o_it           grpo
             = - sum_it o_it / sum_i |y_i|             dapo
             = - sum_it o_it / (B*k * max_new_tokens)  dr_grpo
    repeated mu = updates_per_batch times per batch, an optimizer step each; the learning-rate schedule
    advances once per batch (so `max_steps` and the warm-up count batches, as for rloo). With kl_in=reward
    R_i = r_i - beta * KL_i as above; with kl_in=loss R_i = r_i. At mu = 1 rho = 1 with gradient grad log pi:
    the on-policy policy gradient with each prompt's mean as baseline.

pi and pi_anchor are the tempered distributions softmax(logits / T), T = `generation.temperature`:
the policy samples from pi_T, so its gradient and the KL are taken for pi_T (:func:`token_logprobs`).
Only the policy's LoRA adapter trains (every weight in `full` mode, the baseline). The roles
(policy, anchor, reward model) live in `perl_core.policy.roles`: in PERL's default they are
ONE backbone (adapter on, adapters off, reward adapter + head).

Every forward of a step (sampling, scoring, update) runs under `policy.train.precision`; with
`policy.train.gradient_checkpointing` the policy recomputes its layers in the update's backward
(sampling still uses the KV cache).

With `policy.train.micro_batch_size` the B*k samples go through the reward model, the anchor and
the policy's forward/backward in chunks, each chunk's loss weighted by its share of the mean: the
same gradient, with memory set by the chunk instead of B*k (sampling stays one `generate`).

Under `accelerate launch --num_processes N` (perl_core.parallel) each process samples for its B/N
prompts of the step's batch (RLOO's leave-one-out stays within a prompt's k samples, so within a
process) and DistributedDataParallel averages the update's gradients, the mean over all B*k
samples. What is computed over the whole batch is computed over all processes' samples: the
reward moments, the reinforce moving-average baseline and the adaptive-KL controller's mean KL.
Sampling draws from a stream of its own per process, seeded by (seed, step, rank): N processes
draw other samples than one process would, so a run matches a one-process run in distribution,
not sample for sample; on the same samples the update is the same (tests/test_ddp.py).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from perl_core import parallel
from perl_core.callbacks import MetricsCallback, SamplesCallback, null_callback, null_samples
from perl_core.config import PolicyConfig, RewardTerm
from perl_core.devices import autocast, grad_scaler
from perl_core.errors import UserError
from perl_core.policy.generation import HFSampler, Samples, decode_responses
from perl_core.policy.rewards import combine, function_rewards, resolve
from perl_core.modeling import prompts_within
from perl_core.packing import can_pack, pack, packed_token_logits, plain_logits
from perl_core.scoring import position_ids
from perl_core.training import (checkpoint_due, make_optimizer, make_scheduler, optimizer_step, require_finite,
                                resume_from, set_seed, write_checkpoint)


# ---------------------------------------------------------------- the math
def sample_groups(samples: Samples, end_id: Optional[int] = None) -> Optional[list[tuple[list[int], list[list[int]]]]]:
    """The samples as (prompt, [responses]) groups, consecutive samples of one prompt together: the form
    `perl_core.packing.pack` computes each prompt once in. A response is its tokens up to and including
    the first end token; with `end_id`, a response cut by max_new_tokens gets that token appended (what
    a reward model reads: `roles.with_final_eos`). None when a prompt or a response is empty."""
    p = samples.prompt_width
    seq, mask = samples.sequences.cpu(), samples.attention_mask.cpu()
    lengths = samples.response_mask.sum(-1).cpu().tolist()
    groups: list[tuple[list[int], list[list[int]]]] = []
    for i in range(seq.shape[0]):
        prompt = seq[i, :p][mask[i, :p] == 1].tolist()
        response = seq[i, p:p + lengths[i]].tolist()
        if end_id is not None and not bool(samples.finished[i]):
            response.append(end_id)
        if not prompt or not response:
            return None
        if groups and groups[-1][0] == prompt:
            groups[-1][1].append(response)
        else:
            groups.append((prompt, [response]))
    return groups


def token_logprobs(model: nn.Module, samples: Samples, with_hidden: bool = False):
    """log pi_T(y_t | x, y_<t) and the entropy of pi_T at every response position, [N, T] each.

    pi_T = softmax(logits / T) with T = `samples.temperature`: the distribution the tokens were
    drawn from, so the policy gradient, the KL (policy and anchor both under T, as TRL does) and
    the entropy are those of what was sampled (top-p truncation is not modelled). Each token sees
    the positions and context it had in `generate`, so these are exactly the sampled tokens' values.
    A causal LM that can be packed reads the k samples of a prompt as one row, the prompt computed
    once (`perl_core.packing`); otherwise the left-padded batch goes through as sampled.
    """
    p = samples.prompt_width
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    groups = sample_groups(samples) if can_pack(inner) and plain_logits(inner) else None
    if groups is not None:
        logits, last_prompt_hidden = packed_token_logits(
            inner, pack(groups, pad_id=0, hidden_size=inner.config.hidden_size), samples.responses.shape[1])
        logits = logits.float()
    else:
        samples = samples.to(next(model.parameters()).device)
        out = model(input_ids=samples.sequences, attention_mask=samples.attention_mask,
                    position_ids=position_ids(samples.attention_mask), output_hidden_states=with_hidden,
                    use_cache=False)
        logits = out.logits[:, p - 1:-1].float()  # the logits at t-1 predict token t
        last_prompt_hidden = out.hidden_states[-1][:, p - 1] if with_hidden else None
    device = logits.device
    logp_all = F.log_softmax(logits / samples.temperature, dim=-1)
    logp = logp_all.gather(-1, samples.responses.to(device).unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():  # a metric: keeping its graph would hold two more [N, T, vocab] tensors through backward
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    mask = samples.response_mask.to(device).float()
    if with_hidden:
        return logp * mask, entropy * mask, last_prompt_hidden
    return logp * mask, entropy * mask


def kl_penalised_reward(reward: torch.Tensor, policy_logp: torch.Tensor, anchor_logp: torch.Tensor,
                        kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """R = r - beta * KL, with KL the summed per-token log-ratio of the sampled response (masked inputs)."""
    kl = (policy_logp - anchor_logp).sum(-1)
    return reward - kl_coef * kl, kl


def clip_reward(reward: torch.Tensor, limit: Optional[float]) -> torch.Tensor:
    """clip(r, -limit, limit) (policy.reward_clip); no limit leaves r as it is."""
    return reward if limit is None else reward.clamp(-limit, limit)


def moving_average(baseline: Optional[float], value: float, decay: float) -> float:
    """b <- decay * b + (1 - decay) * value: the reinforce baseline; the first value starts it."""
    return value if baseline is None else decay * baseline + (1 - decay) * value


def policy_loss(advantage: torch.Tensor, policy_logp: torch.Tensor) -> torch.Tensor:
    """- mean_i A_i * sum_t log pi(y_it | .): REINFORCE, the advantage held constant."""
    return -(advantage.detach() * policy_logp.sum(-1)).mean()


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """A_i = R_i - (sum_j R_j - R_i) / (k - 1) within each prompt's group of k consecutive samples."""
    grouped = rewards.view(-1, k)
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).view(-1)


def group_advantages(rewards: torch.Tensor, k: int, scale: bool) -> torch.Tensor:
    """A_i = R_i - mean_g R over each prompt's k consecutive samples, divided by (std_g R + 1e-4) when `scale`."""
    grouped = rewards.view(-1, k)
    centred = grouped - grouped.mean(-1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(-1, keepdim=True) + 1e-4)
    return centred.view(-1)


def clipped_objective(logp: torch.Tensor, old_logp: torch.Tensor, advantage: torch.Tensor,
                      eps_low: float, eps_high: float) -> torch.Tensor:
    """o_it = min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), rho = exp(logp - old_logp), per token [N, T]."""
    ratio = torch.exp(logp - old_logp.detach())
    a = advantage.detach().unsqueeze(-1)
    return torch.min(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)


def k3_kl(logp: torch.Tensor, anchor_logp: torch.Tensor) -> torch.Tensor:
    """exp(q - l) - (q - l) - 1 per token: GRPO's non-negative, unbiased estimate of KL(pi || anchor)."""
    log_ratio = anchor_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def grpo_loss(objective: torch.Tensor, mask: torch.Tensor, loss_type: str, *, n_samples: float,
              n_tokens: float, max_new_tokens: int) -> torch.Tensor:
    """- the per-token objective aggregated as `loss_type` (module docstring); `mask` the response tokens.
    The normalisers are the whole batch's (n_samples responses, n_tokens tokens), so micro-batches'
    losses add up to the batch's."""
    kept = objective * mask
    if loss_type == "grpo":
        return -(kept.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / n_samples
    if loss_type == "dapo":
        return -kept.sum() / n_tokens
    return -kept.sum() / (n_samples * max_new_tokens)  # dr_grpo


def clip_count(logp: torch.Tensor, old_logp: torch.Tensor, advantage: torch.Tensor, mask: torch.Tensor,
               cfg: PolicyConfig) -> tuple[float, float]:
    """(tokens whose clipped term is the one in effect, tokens): the clip fraction's parts."""
    with torch.no_grad():
        ratio, a = torch.exp(logp - old_logp), advantage.unsqueeze(-1)
        out = ((ratio < 1 - cfg.epsilon_low) & (a < 0)) | ((ratio > 1 + cfg.epsilon_high) & (a > 0))
        return float((out.float() * mask).sum()), float(mask.sum())


def adapt_kl_coef(kl_coef: float, kl: float, target: float, n_samples: int, horizon: int) -> float:
    """Ziegler et al.'s proportional controller: beta grows when KL is above target, shrinks below."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_samples / horizon)


@dataclass
class RunningMoments:
    """Mean/variance of RM rewards over the whole run (Chan et al.'s parallel update), for normalisation."""

    mean: float = 0.0
    var: float = 1.0
    count: int = 0

    def update(self, x: torch.Tensor) -> None:
        n, m, v = x.numel(), float(x.mean()), float(x.var(unbiased=False))
        total = self.count + n
        delta = m - self.mean
        self.var = (self.var * self.count + v * n + delta ** 2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / math.sqrt(self.var + 1e-8)


def logprob_gap(samples: Samples, policy_logp: torch.Tensor) -> Optional[dict[str, float]]:
    """|sampler's - learner's log-prob| per sampled token, its mean and max (None when the sampler gave none)."""
    if samples.logprobs is None:
        return None
    mask = samples.response_mask.bool().cpu()
    gap = (samples.logprobs.cpu() - policy_logp.detach().float().cpu()).abs()[mask]
    if gap.numel() == 0:
        return {"logprob_gap": 0.0, "logprob_gap_max": 0.0}
    return {"logprob_gap": float(gap.mean()), "logprob_gap_max": float(gap.max())}


def gap_threshold(cfg: PolicyConfig, device: torch.device) -> Optional[float]:
    """policy.max_logprob_gap, or its automatic value: 0.02 in fp32, 0.1 under 16-bit autocast, none with top_p < 1."""
    if cfg.max_logprob_gap is not None:
        return cfg.max_logprob_gap
    if cfg.generation.top_p < 1:
        return None
    from perl_core import devices  # looked up at call time, as autocast does

    return 0.1 if devices.autocast_dtype(cfg.train.precision, device, "policy.train.precision") else 0.02


def check_logprob_gap(gap: Optional[dict[str, float]], threshold: Optional[float], step: int, sampler) -> None:
    if gap is None or threshold is None or not gap["logprob_gap_max"] > threshold:
        return
    raise UserError(f"RL step {step}: the sampler is not sampling from the policy: a sampled token's log-prob differs "
                    f"by {gap['logprob_gap_max']:.4g} (mean {gap['logprob_gap']:.4g}) between the {sampler.engine} "
                    f"sampler (adapter version {sampler.version}) and the learner, above policy.max_logprob_gap="
                    f"{threshold:g}; the sampler's weights are stale or not the policy's")


# ---------------------------------------------------------------- micro-batches
def row_chunks(n: int, size: Optional[int]) -> list[slice]:
    """Consecutive row ranges of at most `size` rows covering 0..n-1 (one range when size is None)."""
    size = size or n
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def sample_rows(samples: Samples, rows: slice) -> Samples:
    """The samples of `rows`, with the batch's padding (so every row's forward is the one it has in the whole batch)."""
    return replace(samples, sequences=samples.sequences[rows], attention_mask=samples.attention_mask[rows],
                   response_mask=samples.response_mask[rows], finished=samples.finished[rows],
                   logprobs=None if samples.logprobs is None else samples.logprobs[rows])


class PolicyLogprobs(nn.Module):
    """`token_logprobs` of `policy` as a module's forward: the update's forward, which
    DistributedDataParallel wraps under N processes so that its backward averages the gradients."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, samples: Samples, with_hidden: bool = False):
        return token_logprobs(self.policy, samples, with_hidden=with_hidden)


def chunked_logprobs(logprobs: nn.Module, samples: Samples, chunks: list[slice], with_hidden: bool = False):
    """`logprobs` (a `PolicyLogprobs`) of `chunks` in turn, concatenated: the whole batch's values, one
    chunk's activations at a time."""
    parts = [logprobs(sample_rows(samples, rows), with_hidden) for rows in chunks]
    return tuple(torch.cat(values) for values in zip(*parts))


# ---------------------------------------------------------------- one step, in four parts
@dataclass
class RLResult:
    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    kl_coef: float = 0.0


def prompt_batches(n_prompts: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The prompt indices of `step`: a fresh seeded permutation every epoch, so a resumed run sees the same ones."""
    per_epoch = max(1, n_prompts // batch_size)
    epoch, i = divmod(step, per_epoch)
    order = list(range(n_prompts))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    return order[i * batch_size:(i + 1) * batch_size] if n_prompts >= batch_size else order


@dataclass
class Rollout:
    """Step 1: k samples for each of this process's prompts of the batch (k consecutive rows per prompt)."""
    prompts: list[str]
    samples: Samples
    responses: list[str]
    chunks: list[slice]  # the rows each micro-batch of scoring and update takes


@dataclass
class Scores:
    """Step 2, without gradients: the reward model's reward (and its members' spread), each `policy.rewards`
    term's raw values, what `rl/reward` reports (their weighted sum), the anchor's log-probs, the gold score."""
    rm_reward: torch.Tensor
    member_std: Optional[torch.Tensor]
    raw: list[torch.Tensor]
    shown: torch.Tensor
    anchor_logp: torch.Tensor
    gold: Optional[list[float]] = None  # the gold oracle's score of each sample, when the task has one (a metric,
                                        # computed after the step's timings)


@dataclass
class Learner:
    """Step 3: the policy's log-probs of the sampled tokens (with the gradient when the update is one pass), the
    entropy, the value head's input; the regularised reward R, the KL, the advantage."""
    logp: torch.Tensor
    entropy: torch.Tensor
    hidden: list
    gap: Optional[dict[str, float]] = None  # the sampler's log-probs against these (rl/logprob_gap)
    total: torch.Tensor = None
    kl: torch.Tensor = None
    advantage: torch.Tensor = None
    value_loss: torch.Tensor = None


@dataclass
class RLState:
    """What a step hands the next and a checkpoint keeps: beta, the reinforce baseline, the reward moments."""
    kl_coef: float
    baseline: Optional[float] = None
    moments: RunningMoments = field(default_factory=RunningMoments)


class RLRun:
    """The run's fixed parts (roles, optimizer, the update's forward, reward terms) and :meth:`step`."""

    def __init__(self, roles, tokenizer, encoded: list, cfg: PolicyConfig, checkpoint_dir: Optional[Path],
                 prompt_rows: Optional[dict[str, dict]], gold_score: Optional[Callable[[str, str], float]], sampler=None):
        tc = cfg.train
        self.roles, self.tokenizer, self.encoded, self.cfg, self.checkpoint_dir = roles, tokenizer, encoded, cfg, checkpoint_dir
        self.prompt_rows, self.gold_score = prompt_rows, gold_score
        self.world = parallel.world_size()
        self.device = next(roles.policy.parameters()).device
        self.functions = resolve(cfg.rewards)  # a reward function that does not import stops the run before any work
        self.custom_rewards = cfg.rewards != [RewardTerm()]  # the default, the reward model alone, logs as it always has
        self.scaler = grad_scaler(tc.precision, self.device)
        self.sampler = sampler or HFSampler(roles.policy, tokenizer, cfg.generation)
        self.max_gap = gap_threshold(cfg, self.device)
        set_seed(tc.seed)
        self.value_head = nn.Linear(roles.hidden_size, 1) \
            if cfg.algorithm == "reinforce" and cfg.baseline == "value_head" else None
        if self.value_head is not None:
            self.value_head.to(self.device)
        self.trainable = nn.ModuleDict({"policy": roles.policy} | ({"value_head": self.value_head} if self.value_head else {}))
        self.optimizer = make_optimizer(self.trainable, tc)
        self.scheduler = make_scheduler(self.optimizer, tc)
        self.update_forward = parallel.data_parallel(PolicyLogprobs(roles.policy))
        self.value_forward = parallel.data_parallel(self.value_head) if self.value_head is not None else None

    def amp(self):  # every forward of the step (sampling, scoring, update) runs under policy.train.precision
        return autocast(self.cfg.train.precision, self.device, "policy.train.precision")

    def step(self, step: int, state: RLState) -> tuple[dict[str, float], Rollout, Scores]:
        """One RL step (the module docstring's equations): sample, score, advantages, update."""
        t0 = time.perf_counter()
        rollout = self.sample(step)                              # 1. y ~ pi(. | x), k per prompt
        t1 = time.perf_counter()
        scores = self.score(rollout, step)                       # 2. r = RM(x, y), the reward terms, log pi_anchor
        t2 = time.perf_counter()
        learner = self.advantages(rollout, scores, state, step)  # 3. log pi, R = r - beta KL, the advantage A
        loss, grad_norm, clipped = self.update(rollout, scores, learner, state, step)  # 4. the policy-gradient step(s)
        t3 = time.perf_counter()
        if self.gold_score is not None:
            scores.gold = [self.gold_score(p, r) for p, r in zip(rollout.prompts, rollout.responses)]
        metrics = self.metrics(rollout, scores, learner, state, loss, grad_norm, clipped,
                               {"generate_seconds": t1 - t0, "score_seconds": t2 - t1, "update_seconds": t3 - t2,
                                "step_seconds": t3 - t0})
        return metrics, rollout, scores

    def sample(self, step: int) -> Rollout:
        cfg, k = self.cfg, self.cfg.k
        # this process's prompts of the step's batch (all of them for one process)
        chosen = [self.encoded[i] for i in parallel.shard(prompt_batches(len(self.encoded), cfg.train.batch_size,
                                                                            cfg.train.seed, step))]
        if self.world > 1:  # each process its own sampling stream, the same after a resume
            torch.manual_seed(random.Random(f"{cfg.train.seed}-{step}-{parallel.rank()}").getrandbits(63))
        self.sampler.sync(step)  # the sampler first takes the policy's weights (vLLM: the adapter, by version)
        with self.amp():
            samples = self.sampler.sample([ids for _, ids in chosen for _ in range(k)])
        responses = decode_responses(self.tokenizer, samples)
        return Rollout([p for p, _ in chosen for _ in range(k)], samples, responses,
                       row_chunks(len(responses), cfg.train.micro_batch_size))

    def score(self, rollout: Rollout, step: int) -> Scores:
        cfg, roles, samples, prompts = self.cfg, self.roles, rollout.samples, rollout.prompts
        with torch.no_grad(), self.amp():
            scored = [roles.reward_and_spread(sample_rows(samples, rows), prompts[rows], rollout.responses[rows])
                      if cfg.uses_reward_model else (torch.zeros(rows.stop - rows.start), None) for rows in rollout.chunks]
            rm_reward = torch.cat([reward.float().to(self.device) for reward, _ in scored])
            member_std = None if scored[0][1] is None else torch.cat([spread.float().cpu() for _, spread in scored])
            anchor_logp = torch.cat([roles.anchor_logprobs(sample_rows(samples, rows)) for rows in rollout.chunks])
        require_finite(rm_reward.sum(), "reward-model reward", step + 1, self.checkpoint_dir)
        if self.custom_rewards:  # each term's raw values; what rl/reward reports is their weighted sum
            batch_rows = [dict((self.prompt_rows or {}).get(p, {}), finished=bool(f))
                          for p, f in zip(prompts, samples.finished.tolist())]
            raw = [rm_reward if fn is None else function_rewards(term, fn, prompts, rollout.responses, batch_rows)
                   .to(self.device) for term, fn in zip(cfg.rewards, self.functions)]
            shown = combine(raw, cfg.rewards)
        else:
            raw, shown = [rm_reward], rm_reward
        return Scores(rm_reward, member_std, raw, shown, anchor_logp)

    def advantages(self, rollout: Rollout, scores: Scores, state: RLState, step: int) -> Learner:
        """The learner's log-probs; the regularised reward and the advantage. In one pass, the forward that gives
        the KL also carries the gradient. Micro-batched, the KL needs every sample's log-probs before any
        advantage exists, so this pass runs without gradients and :meth:`update` runs each chunk again."""
        cfg, k = self.cfg, self.cfg.k
        with torch.set_grad_enabled(len(rollout.chunks) == 1), self.amp():
            logp, entropy, *hidden = chunked_logprobs(self.update_forward, rollout.samples, rollout.chunks,
                                                      self.value_head is not None)
        learner = Learner(logp, entropy, hidden, gap=logprob_gap(rollout.samples, logp))
        check_logprob_gap(learner.gap, self.max_gap, step + 1, self.sampler)  # every step: is it the policy's sample?
        state.moments.update(parallel.gather(scores.rm_reward))  # the moments of every process's rewards
        rm_part = state.moments.normalise(scores.rm_reward) if cfg.normalize_rewards else scores.rm_reward
        reward = clip_reward(combine([rm_part if fn is None else values for fn, values in zip(self.functions, scores.raw)],
                                     cfg.rewards), cfg.reward_clip)
        total, kl = kl_penalised_reward(reward, logp.detach(), scores.anchor_logp,
                                        state.kl_coef if cfg.kl_in == "reward" else 0.0)
        value_loss = torch.zeros(())
        if cfg.algorithm == "rloo":
            advantage = rloo_advantages(total, k)
        elif cfg.algorithm == "grpo":
            advantage = group_advantages(total, k, cfg.scale_advantages)
        elif self.value_head is not None:
            value = self.value_forward(hidden[0].detach().float()).squeeze(-1)
            value_loss = F.mse_loss(value, total)
            advantage = total - value.detach()
            require_finite(value_loss, "value loss", step + 1, self.checkpoint_dir)
            # a graph of its own: the value head reads detached hidden states
            (self.scaler.scale(value_loss) if self.scaler else value_loss).backward()
        else:
            batch_mean = float(parallel.gather(total).mean())  # over every process's samples
            advantage = total - (state.baseline if state.baseline is not None else batch_mean)
            state.baseline = moving_average(state.baseline, batch_mean, cfg.baseline_decay)
        learner.total, learner.kl, learner.advantage, learner.value_loss = total, kl, advantage, value_loss
        return learner

    def update(self, rollout: Rollout, scores: Scores, learner: Learner, state: RLState,
               step: int) -> tuple[float, float, list]:
        """`policy.train.updates_per_batch` passes (grpo; one for the on-policy algorithms), an optimizer step each."""
        cfg, tc, samples, chunks, advantage = self.cfg, self.cfg.train, rollout.samples, rollout.chunks, learner.advantage
        one_pass = len(chunks) == 1
        if cfg.algorithm == "grpo":  # the batch's normalisers; dapo's token count over every process's samples
            old_logp, mask = learner.logp.detach(), samples.response_mask.to(self.device).float()
            n_tokens = float(parallel.gather(mask.sum().reshape(1)).sum()) / self.world
            norms = dict(n_samples=len(advantage), n_tokens=n_tokens, max_new_tokens=cfg.generation.max_new_tokens)
        losses, grad_norms, clipped = [], [], []
        for update in range(tc.updates_per_batch):
            loss = 0.0
            for i, rows in enumerate(chunks):
                # under N processes the gradients are all-reduced once, in the last chunk's backward
                with parallel.no_sync(self.update_forward, sync=i == len(chunks) - 1):
                    if one_pass and update == 0:
                        logp = learner.logp
                    else:
                        with self.amp():
                            logp = self.update_forward(sample_rows(samples, rows))[0]
                    if cfg.algorithm == "grpo":
                        objective = clipped_objective(logp, old_logp[rows], advantage[rows], cfg.epsilon_low,
                                                      cfg.epsilon_high)
                        if cfg.kl_in == "loss":
                            objective = objective - state.kl_coef * k3_kl(logp, scores.anchor_logp[rows])
                        part = grpo_loss(objective, mask[rows], cfg.loss_type, **norms)
                        clipped.append(clip_count(logp, old_logp[rows], advantage[rows], mask[rows], cfg))
                    else:
                        # a mean over all N samples: a chunk adds its share, so the gradients sum to one pass's
                        part = policy_loss(advantage[rows], logp) * (len(logp) / len(advantage))
                    require_finite(part, "policy loss", step + 1, self.checkpoint_dir)
                    (self.scaler.scale(part) if self.scaler else part).backward()
                loss += float(part.detach())
            losses.append(loss)
            # the schedule advances once per batch: inner passes step the optimizer only
            last = update == tc.updates_per_batch - 1
            grad_norms.append(optimizer_step(self.trainable, self.optimizer, self.scheduler if last else None,
                                             self.scaler, tc.max_grad_norm, step + 1, self.checkpoint_dir))
        return sum(losses) / len(losses), sum(float(g) for g in grad_norms) / len(grad_norms), clipped

    def metrics(self, rollout: Rollout, scores: Scores, learner: Learner, state: RLState, loss: float,
                grad_norm: float, clipped: list, seconds: dict[str, float]) -> dict[str, float]:
        cfg, samples, world = self.cfg, rollout.samples, self.world
        n_tokens = float(samples.response_mask.sum())
        mean_kl = float(parallel.gather(learner.kl).mean())  # the controller's KL: every process's samples
        metrics = {
            "reward": float(scores.shown.mean()), "reward_std": float(scores.shown.std()),
            "kl_penalised_reward": float(learner.total.mean()), "kl": mean_kl, "kl_coef": state.kl_coef,
            "entropy": float(learner.entropy.sum()) / max(n_tokens, 1.0),
            "response_length": n_tokens / len(rollout.responses),
            "finished_fraction": float(samples.finished.float().mean()), "policy_loss": loss,
            "advantage_std": float(learner.advantage.std()), "grad_norm": float(grad_norm),
            "lr": self.scheduler.get_last_lr()[0], **seconds, "tokens_per_second": n_tokens / seconds["step_seconds"],
            **(learner.gap or {}),
        }
        if self.value_head is not None:
            metrics["value_loss"] = float(learner.value_loss.detach())
        if cfg.algorithm == "grpo":  # the share of tokens whose ratio left the clip range, over the mu passes
            metrics["clip_fraction"] = sum(c for c, _ in clipped) / max(sum(n for _, n in clipped), 1.0)
        if self.custom_rewards:
            metrics.update({f"reward/{term.label}": float(values.mean()) for term, values in zip(cfg.rewards, scores.raw)})
        if scores.member_std is not None:  # how much a reward-model ensemble's members disagree on these samples
            metrics["reward_member_std"] = float(scores.member_std.mean())
        if scores.gold is not None:
            metrics["gold_score"] = sum(scores.gold) / len(scores.gold)
        if world > 1:  # the batch's numbers: means over the processes' equal shares, the reward's over every sample
            keys = sorted(metrics)
            means = parallel.sum_across(torch.tensor([float(metrics[key]) for key in keys])) / world
            metrics = dict(zip(keys, means.tolist()))
            every_reward = parallel.gather(scores.shown)
            metrics.update(reward=float(every_reward.mean()), reward_std=float(every_reward.std()), kl=mean_kl)
        if cfg.adaptive_kl:
            state.kl_coef = adapt_kl_coef(state.kl_coef, mean_kl, cfg.target_kl, len(rollout.responses) * world,
                                          cfg.kl_horizon)
        return metrics


# ---------------------------------------------------------------- the loop
def rl_loop(roles, tokenizer, prompts: list[str], cfg: PolicyConfig, *, callback: MetricsCallback = null_callback,
            checkpoint_dir: Optional[Path] = None, resume: bool = False,
            gold_score: Optional[Callable[[str, str], float]] = None,
            samples_callback: SamplesCallback = null_samples,
            prompt_rows: Optional[dict[str, dict]] = None, sampler=None) -> RLResult:
    """Train `roles.policy` for `cfg.train.max_steps` steps on `prompts` (see the module docstring).

    `sampler` draws the step's samples (`generation.HFSampler` on the policy when none; the stage
    passes `vllm_engine.VLLMSampler` for `policy.generation.engine: vllm`); its log-probs are checked
    against the learner's every step (`check_logprob_gap`).

    Every `cfg.log_samples_every` steps and at the last one, the step's completions go to `samples_callback`.
    `prompt_rows` maps a prompt to its data row, which reward functions (`policy.rewards`) receive.
    """
    encoded = prompts_within(tokenizer, prompts, cfg.max_prompt_length)
    if not encoded:
        raise UserError(f"no prompt fits policy.max_prompt_length={cfg.max_prompt_length} tokens")
    tc = cfg.train
    parallel.per_process(tc.batch_size, "policy.train.batch_size")
    world, main = parallel.world_size(), parallel.is_main()
    if world > 1 and len(encoded) < tc.batch_size:  # a step would take every prompt, split unevenly
        raise UserError(f"only {len(encoded)} prompts fit policy.max_prompt_length={cfg.max_prompt_length}, fewer than "
                        f"policy.train.batch_size={tc.batch_size}: under {world} processes every step needs a whole "
                        "batch (each process takes batch_size / N of its prompts); lower the batch size or add prompts")
    run = RLRun(roles, tokenizer, encoded, cfg, checkpoint_dir, prompt_rows, gold_score, sampler)
    step, extra, _ = resume_from(checkpoint_dir, resume, run.trainable, run.optimizer, run.scheduler, run.scaler)
    state = RLState(extra["kl_coef"], extra["baseline"], RunningMoments(**extra["moments"])) if extra \
        else RLState(cfg.kl_coef)
    result = RLResult(step=step, history=extra.get("history", []))
    started = time.perf_counter()
    roles.policy.train()
    while step < tc.max_steps:
        metrics, rollout, scores = run.step(step, state)
        step += 1
        if main:
            callback({f"rl/{name}": v for name, v in metrics.items()}, step)
        every = cfg.log_samples_every
        if main and every and (step % every == 0 or step == tc.max_steps):  # the main process's completions
            terms = {term.label: values.tolist() for term, values in zip(cfg.rewards, scores.raw)} \
                if run.custom_rewards else None
            samples_callback(completion_rows(rollout.prompts, rollout.responses, scores.shown.tolist(), scores.gold, terms),
                             step)
        result.history.append(metrics)
        if checkpoint_due(checkpoint_dir, step, tc.checkpoint_every, step == tc.max_steps):
            write_checkpoint(checkpoint_dir, step, run.trainable, run.optimizer, run.scheduler, run.scaler,
                             extra={"kl_coef": state.kl_coef, "baseline": state.baseline, "moments": vars(state.moments),
                                    "history": result.history})  # the stage's summary averages the last steps
    roles.policy.eval()
    result.step, result.seconds, result.kl_coef = step, time.perf_counter() - started, state.kl_coef
    return result


def completion_rows(prompts: list[str], responses: list[str], rewards: list[float],
                    gold: Optional[list[float]] = None, terms: Optional[dict[str, list[float]]] = None) -> list[dict]:
    """One row per completion: the reward model's raw score (before normalisation) and the gold score if known;
    with policy.rewards the weighted sum of the raw terms, and each term (`reward/<name>`)."""
    rows = [{"prompt": p, "response": r, "reward": float(s)} for p, r, s in zip(prompts, responses, rewards)]
    for row, g in zip(rows, gold or []):
        row["gold_score"] = float(g)
    for name, values in (terms or {}).items():
        for row, value in zip(rows, values):
            row[f"reward/{name}"] = float(value)
    return rows
