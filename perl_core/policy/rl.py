"""Policy RL against the reward model, anchored by KL: REINFORCE with a baseline, and RLOO.

One step, top to bottom (PERL, arXiv 2403.10704, with REINFORCE / RLOO as in Ahmadian et al. 2024):

    y_1..y_k ~ pi(. | x)                        for each of B prompts x   (one batched `generate`)
    r_i      = RM(x, y_i)                       normalised by running moments, optionally clipped
                                                (an ensemble: mean, min or mean - lambda*std over its members)
    KL_i     = sum_t log pi(y_it | .) - log pi_anchor(y_it | .)       (per-token log-ratios)
    R_i      = r_i - beta * KL_i                the KL-regularised reward
    A_i      = R_i - mean_{j != i} R_j          rloo: leave-one-out over the k samples
             = R_i - b                          reinforce: b a moving average or a learned value
    loss     = - mean_i  A_i * sum_t log pi(y_it | .)
    beta    <- beta * (1 + clip(KL / target_kl - 1, -0.2, 0.2) * B*k / kl_horizon)    (adaptive_kl)

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
from perl_core.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from perl_core.config import PolicyConfig
from perl_core.devices import autocast, grad_scaler
from perl_core.errors import UserError
from perl_core.policy.generation import HFSampler, Samples, decode_responses
from perl_core.modeling import prompts_within
from perl_core.packing import can_pack, pack, packed_token_logits, plain_logits
from perl_core.scoring import position_ids
from perl_core.training import make_optimizer, make_scheduler, optimizer_step, require_finite, set_seed


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


# ---------------------------------------------------------------- the loop
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


def rl_loop(roles, tokenizer, prompts: list[str], cfg: PolicyConfig, *, callback: MetricsCallback = null_callback,
            checkpoint_dir: Optional[Path] = None, resume: bool = False,
            gold_score: Optional[Callable[[str, str], float]] = None,
            samples_callback: SamplesCallback = null_samples, sampler=None) -> RLResult:
    """Train `roles.policy` for `cfg.train.max_steps` steps on `prompts` (see the module docstring).

    `sampler` draws the step's samples (`generation.HFSampler` on the policy when none; the stage
    passes `vllm_engine.VLLMSampler` for `policy.generation.engine: vllm`); its log-probs are checked
    against the learner's every step (`check_logprob_gap`).

    Every `cfg.log_samples_every` steps and at the last one, the step's completions go to `samples_callback`.
    """
    from perl_core.policy.generation import decode_responses

    encoded = prompts_within(tokenizer, prompts, cfg.max_prompt_length)
    if not encoded:
        raise UserError(f"no prompt fits policy.max_prompt_length={cfg.max_prompt_length} tokens")
    tc, k = cfg.train, cfg.k
    parallel.per_process(tc.batch_size, "policy.train.batch_size")
    world, main = parallel.world_size(), parallel.is_main()
    if world > 1 and len(encoded) < tc.batch_size:  # a step would take every prompt, split unevenly
        raise UserError(f"only {len(encoded)} prompts fit policy.max_prompt_length={cfg.max_prompt_length}, fewer than "
                        f"policy.train.batch_size={tc.batch_size}: under {world} processes every step needs a whole "
                        "batch (each process takes batch_size / N of its prompts); lower the batch size or add prompts")
    device = next(roles.policy.parameters()).device

    def amp():  # every forward of the step (sampling, scoring, update) runs under policy.train.precision
        return autocast(tc.precision, device, "policy.train.precision")

    scaler = grad_scaler(tc.precision, device)
    sampler = sampler or HFSampler(roles.policy, tokenizer, cfg.generation)
    max_gap = gap_threshold(cfg, device)
    set_seed(tc.seed)
    value_head = nn.Linear(roles.hidden_size, 1) if cfg.algorithm == "reinforce" and cfg.baseline == "value_head" else None
    if value_head is not None:
        value_head.to(device)
    trainable = nn.ModuleDict({"policy": roles.policy} | ({"value_head": value_head} if value_head else {}))
    optimizer, scheduler = make_optimizer(trainable, tc), None
    scheduler = make_scheduler(optimizer, tc)
    update_forward = parallel.data_parallel(PolicyLogprobs(roles.policy))
    value_forward = parallel.data_parallel(value_head) if value_head is not None else None
    kl_coef, baseline, moments, step, extra = cfg.kl_coef, None, RunningMoments(), 0, {}
    if resume and (ckpt := latest_checkpoint(checkpoint_dir)) is not None:
        meta = load_checkpoint(ckpt, trainable, optimizer, scheduler)
        step, extra = meta["step"], meta["extra"]
        kl_coef, baseline = extra["kl_coef"], extra["baseline"]
        moments = RunningMoments(**extra["moments"])
        if scaler and extra.get("grad_scaler"):
            scaler.load_state_dict(extra["grad_scaler"])
    result = RLResult(step=step, history=extra.get("history", []))
    started = time.perf_counter()
    roles.policy.train()
    while step < tc.max_steps:
        t0 = time.perf_counter()
        # this process's prompts of the step's batch (all of them for one process)
        chosen = [encoded[i] for i in parallel.shard(prompt_batches(len(encoded), tc.batch_size, tc.seed, step))]
        batch_prompts = [p for p, _ in chosen for _ in range(k)]  # k consecutive samples per prompt
        if world > 1:  # each process its own sampling stream, the same after a resume
            torch.manual_seed(random.Random(f"{tc.seed}-{step}-{parallel.rank()}").getrandbits(63))

        # 1. sample k responses per prompt from the current policy (the sampler first takes its weights)
        sampler.sync(step)
        with amp():
            samples = sampler.sample([ids for _, ids in chosen for _ in range(k)])
        responses = decode_responses(tokenizer, samples)
        t1 = time.perf_counter()

        # 2. score: the reward model, and the anchor's log-probs for the KL (no gradients)
        chunks = row_chunks(len(responses), tc.micro_batch_size)
        with torch.no_grad(), amp():
            scored = [roles.reward_and_spread(sample_rows(samples, rows), batch_prompts[rows], responses[rows])
                      for rows in chunks]
            rm_reward = torch.cat([reward.float().to(device) for reward, _ in scored])
            member_std = None if scored[0][1] is None else torch.cat([spread.float().cpu() for _, spread in scored])
            anchor_logp = torch.cat([roles.anchor_logprobs(sample_rows(samples, rows)) for rows in chunks])
        require_finite(rm_reward.sum(), "reward-model reward", step + 1, checkpoint_dir)
        t2 = time.perf_counter()

        # 3. update: the KL-regularised reward, the baseline, the REINFORCE loss. In one pass, the
        #    forward that gives the KL also carries the gradient. Micro-batched, the KL needs every
        #    sample's log-probs before any advantage exists, so a no-grad pass comes first and each
        #    chunk runs again with gradients: only one chunk's activations are alive at a time.
        one_pass = len(chunks) == 1
        with torch.set_grad_enabled(one_pass), amp():
            policy_logp, entropy, *hidden = chunked_logprobs(update_forward, samples, chunks, value_head is not None)
        gap = logprob_gap(samples, policy_logp)  # the sampler's log-probs against the learner's, every step
        check_logprob_gap(gap, max_gap, step + 1, sampler)
        moments.update(parallel.gather(rm_reward))  # the moments of every process's rewards
        reward = clip_reward(moments.normalise(rm_reward) if cfg.normalize_rewards else rm_reward, cfg.reward_clip)
        total, kl = kl_penalised_reward(reward, policy_logp.detach(), anchor_logp, kl_coef)
        value_loss = torch.zeros(())
        if cfg.algorithm == "rloo":
            advantage = rloo_advantages(total, k)
        elif value_head is not None:
            value = value_forward(hidden[0].detach().float()).squeeze(-1)
            value_loss = F.mse_loss(value, total)
            advantage = total - value.detach()
            require_finite(value_loss, "value loss", step + 1, checkpoint_dir)
            # a graph of its own: the value head reads detached hidden states
            (scaler.scale(value_loss) if scaler else value_loss).backward()
        else:
            batch_mean = float(parallel.gather(total).mean())  # over every process's samples
            advantage = total - (baseline if baseline is not None else batch_mean)
            baseline = moving_average(baseline, batch_mean, cfg.baseline_decay)
        loss = 0.0
        for i, rows in enumerate(chunks):
            # under N processes the gradients are all-reduced once, in the last chunk's backward
            with parallel.no_sync(update_forward, sync=i == len(chunks) - 1):
                if one_pass:
                    logp = policy_logp
                else:
                    with amp():
                        logp = update_forward(sample_rows(samples, rows))[0]
                # the loss is a mean over all N samples: a chunk adds its share, so the gradients sum to one pass's
                part = policy_loss(advantage[rows], logp) * (len(logp) / len(advantage))
                require_finite(part, "policy loss", step + 1, checkpoint_dir)
                (scaler.scale(part) if scaler else part).backward()
            loss += float(part.detach())
        grad_norm = optimizer_step(trainable, optimizer, scheduler, scaler, tc.max_grad_norm, step + 1, checkpoint_dir)
        step += 1
        t3 = time.perf_counter()

        n_tokens = float(samples.response_mask.sum())
        mean_kl = float(parallel.gather(kl).mean())  # the controller's KL: every process's samples
        metrics = {
            "reward": float(rm_reward.mean()), "reward_std": float(rm_reward.std()),
            "kl_penalised_reward": float(total.mean()), "kl": mean_kl, "kl_coef": kl_coef,
            "entropy": float(entropy.sum()) / max(n_tokens, 1.0), "response_length": n_tokens / len(responses),
            "finished_fraction": float(samples.finished.float().mean()), "policy_loss": loss,
            "advantage_std": float(advantage.std()), "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
            "generate_seconds": t1 - t0, "score_seconds": t2 - t1, "update_seconds": t3 - t2,
            "step_seconds": t3 - t0, "tokens_per_second": n_tokens / (t3 - t0),
        }
        metrics.update(gap or {})
        if value_head is not None:
            metrics["value_loss"] = float(value_loss.detach())
        if member_std is not None:  # how much a reward-model ensemble's members disagree on these samples
            metrics["reward_member_std"] = float(member_std.mean())
        gold = [gold_score(p, r) for p, r in zip(batch_prompts, responses)] if gold_score is not None else None
        if gold is not None:
            metrics["gold_score"] = sum(gold) / len(gold)
        if world > 1:  # the batch's numbers: means over the processes' equal shares, the reward's over every sample
            keys = sorted(metrics)
            means = parallel.sum_across(torch.tensor([float(metrics[key]) for key in keys])) / world
            metrics = dict(zip(keys, means.tolist()))
            every_reward = parallel.gather(rm_reward)
            metrics.update(reward=float(every_reward.mean()), reward_std=float(every_reward.std()), kl=mean_kl)
        if cfg.adaptive_kl:
            kl_coef = adapt_kl_coef(kl_coef, mean_kl, cfg.target_kl, len(responses) * world, cfg.kl_horizon)
        if main:
            callback({f"rl/{name}": v for name, v in metrics.items()}, step)
        every = cfg.log_samples_every
        if main and every and (step % every == 0 or step == tc.max_steps):  # the main process's completions
            samples_callback(completion_rows(batch_prompts, responses, rm_reward.tolist(), gold), step)
        result.history.append(metrics)
        if checkpoint_dir and (step % tc.checkpoint_every == 0 or step == tc.max_steps):
            if main:
                save_checkpoint(checkpoint_dir, step, trainable, optimizer, scheduler,
                                extra={"kl_coef": kl_coef, "baseline": baseline, "moments": vars(moments),
                                       "grad_scaler": scaler.state_dict() if scaler else None,
                                       "history": result.history})  # the stage's summary averages the last steps
            parallel.barrier()  # no process resumes from a checkpoint before it is whole
    roles.policy.eval()
    result.step, result.seconds, result.kl_coef = step, time.perf_counter() - started, kl_coef
    return result


def completion_rows(prompts: list[str], responses: list[str], rewards: list[float],
                    gold: Optional[list[float]] = None) -> list[dict]:
    """One row per completion: the reward model's raw score (before normalisation) and the gold score if known."""
    rows = [{"prompt": p, "response": r, "reward": float(s)} for p, r, s in zip(prompts, responses, rewards)]
    for row, g in zip(rows, gold or []):
        row["gold_score"] = float(g)
    return rows
