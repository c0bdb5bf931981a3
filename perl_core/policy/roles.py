"""The three roles of policy RL (policy, anchor, reward model) and where their weights live.

* LoRA policy, reward model = a LoRA adapter on the anchor (PERL's default): ONE backbone.
  The anchor's weights carry the trainable policy adapter, the frozen reward adapter (+ its
  score head, a plain linear layer read as `perl_core.scoring` reads every reward model), and
  with adapters disabled they ARE the anchor.
* LoRA policy, any other reward model (e.g. an encoder): the backbone carries the policy
  adapter (anchor = adapters off); the reward model is loaded once, frozen, merged.
* `full` (the baseline PERL is compared with): separate policy, anchor and reward-model copies.

A reward-model ensemble (`perl_core.reward.ensemble`; its roles here: `build_ensemble_roles`) lays out member 0 as above and the others beside
it: on one backbone, each member is a reward adapter (`reward_i`) with its own head.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file
from torch import nn

from perl_core.artifacts import read_manifest
from perl_core.config import ConfigError, PolicyConfig
from perl_core.devices import enable_gradient_checkpointing, run_device
from perl_core.reward.ensemble import aggregate, centre, member_adapter, member_std, read_ensemble
from perl_core.policy.generation import Samples
from perl_core.modeling import (attach_lora, fit_embeddings, load_causal_lm, load_tokenizer, parameter_counts,
                                response_end_id)
from perl_core.packing import can_pack, pack, read_packed_scores
from perl_core.reward.train import RewardScorer
from perl_core.policy.rl import sample_groups, token_logprobs
from perl_core.scoring import read_scores
from perl_core.training import set_seed

# PEFT saves an adapter named "default" at the top of the folder and any other name in a
# subfolder; the policy is the artifact, so it gets the default slot.
POLICY_ADAPTER = "default"
REWARD_ADAPTER = "reward"


def with_final_eos(samples: Samples, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The RM was trained on `prompt + response + end` (`response_end_id`: eos or the chat template's
    end-of-turn); responses cut by max_new_tokens get that token here."""
    n = samples.sequences.shape[0]
    ids = torch.cat([samples.sequences, torch.full((n, 1), pad_id, dtype=torch.long)], dim=1)
    mask = torch.cat([samples.attention_mask, torch.zeros((n, 1), dtype=torch.long)], dim=1)
    cut = ~samples.finished
    ids[cut, -1] = eos_id
    mask[cut, -1] = 1
    return ids, mask


def check_reward_tokenizer(rm_tokenizer, texts: list[str], reward_model_dir: Path) -> None:
    """Reject a reward model that cannot read the policy's text (unknown tokens) before any work starts."""
    unk = rm_tokenizer.unk_token_id
    for text in texts:
        ids = rm_tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids or (unk is not None and unk in ids):
            bad = [c for c in dict.fromkeys(text) if unk in rm_tokenizer(c, add_special_tokens=False)["input_ids"]]
            raise ConfigError(
                f"reward model {reward_model_dir}: its tokenizer cannot read the policy's text "
                f"(unknown tokens for {bad[:10] or 'the text'} in {text[:60]!r}); train the reward model on "
                "this data or use a reward model whose tokenizer covers it")


class Roles:
    """Policy (trainable), anchor log-probs and reward-model scores, however the weights are laid out."""

    one_backbone = False

    def __init__(self, policy: nn.Module, tokenizer, anchor: Optional[nn.Module], scorer, tuning: str):
        self.policy, self.tokenizer, self.anchor, self.scorer, self.tuning = policy, tokenizer, anchor, scorer, tuning
        self.hidden_size = policy.config.hidden_size

    def anchor_logprobs(self, samples: Samples) -> torch.Tensor:
        if self.anchor is not None:
            return token_logprobs(self.anchor, samples)[0]
        with self.policy.disable_adapter():
            return token_logprobs(self.policy, samples)[0]

    def reward(self, samples: Samples, prompts: list[str], responses: list[str]) -> torch.Tensor:
        # a separate reward model reads the decoded text in its own format (an empty response as
        # prompt + end token, like every other path: perl_core.scoring)
        return self.scorer.score(prompts, responses).float().cpu()

    def reward_and_spread(self, samples: Samples, prompts: list[str],
                          responses: list[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The reward, and per sample the spread of a reward-model ensemble's members (None for one reward model)."""
        return self.reward(samples, prompts, responses), None

    def save_policy(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.tuning == "lora":
            self.policy.save_pretrained(out_dir, selected_adapters=[POLICY_ADAPTER], safe_serialization=True)
        else:
            self.policy.save_pretrained(out_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(out_dir)

    def parameter_counts(self) -> dict[str, int]:
        counts = parameter_counts(self.policy)
        return {"trainable_params": counts["trainable"], "policy_params": counts["total"]}


class OneBackbone(Roles):
    """PERL's layout: policy adapter (trainable), reward adapter + head (frozen), anchor = adapters off."""

    one_backbone = True

    def __init__(self, policy: nn.Module, tokenizer, reward_head: nn.Linear, reward_adapter: str = REWARD_ADAPTER):
        super().__init__(policy, tokenizer, anchor=None, scorer=None, tuning="lora")
        self.reward_head, self.reward_adapter = reward_head, reward_adapter

    @torch.no_grad()
    def reward(self, samples: Samples, prompts: list[str], responses: list[str]) -> torch.Tensor:
        end = response_end_id(self.tokenizer)
        body = self.policy.get_base_model().base_model
        # the k samples of a prompt packed in one row, the prompt computed once (perl_core.packing)
        groups = sample_groups(samples, end_id=end) if can_pack(body) else None
        was_training = self.policy.training
        try:
            self.policy.eval()  # the reward model scores without its LoRA dropout, as when it was evaluated
            self.policy.set_adapter(self.reward_adapter, inference_mode=True)
            # the RM's sequence classifier is the transformer body (reward adapter on) + its score head
            if groups is not None:
                return read_packed_scores(body, self.reward_head,
                                          pack(groups, self.tokenizer.pad_token_id, body.config.hidden_size))
            return read_scores(body, self.reward_head, *with_final_eos(samples, end, self.tokenizer.pad_token_id))
        finally:
            self.policy.train(was_training)
            self.policy.set_adapter(POLICY_ADAPTER)  # also makes the policy adapter trainable again


def load_reward_adapter(model, reward_model_dir: Path, head: str, hidden_size: int,
                        adapter_name: str = REWARD_ADAPTER) -> nn.Linear:
    """Put the RM's LoRA weights on `model` as the frozen adapter `adapter_name` and return its score head."""
    # peft's own loader keeps every saved LoRA setting (rank/alpha patterns, rsLoRA, DoRA); the
    # causal LM has no score head, so peft leaves the head's weights unused and we read them here
    try:
        loaded = model.load_adapter(str(reward_model_dir), adapter_name=adapter_name, is_trainable=False)
    except (RuntimeError, ValueError) as err:  # shape mismatches, target modules the anchor lacks
        raise ConfigError(f"reward model {reward_model_dir}: its LoRA weights do not fit the anchor "
                          f"(was it trained on a different base?): {str(err).splitlines()[0]}") from None
    state = load_file(str(reward_model_dir / "adapter_model.safetensors"))
    head_state = {k.rsplit(".", 1)[-1]: v for k, v in state.items() if f".{head}." in k and "lora_" not in k}
    if "weight" not in head_state or not any("lora_" in k for k in state):
        raise ConfigError(f"reward model {reward_model_dir}: adapter_model.safetensors must hold LoRA weights and the "
                          f"score head {head!r}; found keys like {sorted(state)[:4]}")
    unused = [k for k in loaded.unexpected_keys if "lora_" in k]
    if unused:
        raise ConfigError(f"reward model {reward_model_dir}: LoRA weights {unused[:3]} do not fit the anchor; "
                          "was it trained on a different base?")
    weight = head_state["weight"]
    reward_head = nn.Linear(hidden_size, weight.shape[0], bias="bias" in head_state)
    reward_head.load_state_dict(head_state)
    reward_head.requires_grad_(False)
    model.set_adapter(POLICY_ADAPTER)
    return reward_head


def shares_backbone(rm_manifest: dict, anchor_dir: Path) -> bool:
    base = rm_manifest.get("base_model")
    return (rm_manifest.get("tuning") == "lora" and base is not None and Path(base).exists()
            and Path(base).resolve() == anchor_dir.resolve())


def placed(roles: Roles, cfg: PolicyConfig) -> Roles:
    """`roles` on the run's device (`RewardScorer.load` places a separate reward model), the policy
    checkpointing its layers under `policy.train.gradient_checkpointing`."""
    device = run_device()
    for model in (roles.policy, roles.anchor, getattr(roles, "reward_head", None)):
        if model is not None:
            model.to(device)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(roles.policy, lora=cfg.tuning == "lora")
    return roles


def build_roles(cfg: PolicyConfig, anchor_dir: Path, reward_model_dir: Path, sample_texts: list[str] = (),
                dtype: str = "float32", reward_adapter: str = REWARD_ADAPTER) -> Roles:
    """The roles of `cfg` on :func:`perl_core.devices.run_device`: fp32 weights whose forwards
    `policy.train.precision` autocasts (sampling, scoring and the update, in `rl_loop`)."""
    anchor_dir, reward_model_dir = Path(anchor_dir), Path(reward_model_dir)
    set_seed(cfg.train.seed)  # the fresh adapter's initialisation is part of the run's seed
    rm_manifest = read_manifest(reward_model_dir, expect_kind="reward_model")
    tokenizer = load_tokenizer(str(anchor_dir), padding_side="left")
    if cfg.tuning == "lora" and shares_backbone(rm_manifest, anchor_dir):
        rm_tokenizer = load_tokenizer(str(reward_model_dir))
        if rm_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"reward model {reward_model_dir} adapts the anchor but its tokenizer differs from "
                              f"{anchor_dir}'s; retrain the reward model from this anchor")
        if rm_tokenizer.chat_template != tokenizer.chat_template:
            raise ConfigError(f"reward model {reward_model_dir} and anchor {anchor_dir} were trained with different "
                              "chat templates (data.chat_template differed between the stages); retrain the reward "
                              "model from this anchor with the same setting")
        policy = attach_lora(fit_embeddings(load_causal_lm(str(anchor_dir), dtype), tokenizer), cfg.lora,
                             task_type="CAUSAL_LM", adapter_name=POLICY_ADAPTER)
        head = load_reward_adapter(policy, reward_model_dir, rm_manifest.get("head", "score"),
                                   policy.config.hidden_size, reward_adapter)
        return placed(OneBackbone(policy, tokenizer, head, reward_adapter), cfg)

    scorer = RewardScorer.load(reward_model_dir, precision=cfg.train.precision)
    check_reward_tokenizer(scorer.tokenizer, list(sample_texts), reward_model_dir)
    longest = cfg.max_prompt_length + cfg.generation.max_new_tokens + 1
    if scorer.encoder is False and longest > scorer.max_length:
        raise ConfigError(f"reward model {reward_model_dir} reads at most {scorer.max_length} tokens, but "
                          f"policy.max_prompt_length + policy.generation.max_new_tokens + EOS = {longest}; "
                          "lower policy.max_prompt_length or retrain the reward model with a larger max_length")
    if cfg.tuning == "lora":
        policy = attach_lora(fit_embeddings(load_causal_lm(str(anchor_dir), dtype), tokenizer), cfg.lora,
                             task_type="CAUSAL_LM", adapter_name=POLICY_ADAPTER)
        return placed(Roles(policy, tokenizer, anchor=None, scorer=scorer, tuning="lora"), cfg)
    policy = fit_embeddings(load_causal_lm(str(anchor_dir), dtype), tokenizer)
    anchor = fit_embeddings(load_causal_lm(str(anchor_dir), dtype), tokenizer).requires_grad_(False).eval()
    return placed(Roles(policy, tokenizer, anchor=anchor, scorer=scorer, tuning="full"), cfg)


# ---------------------------------------------------------------- a reward-model ensemble
class EnsembleRoles(Roles):
    """Policy and anchor laid out as for member 0; the reward aggregates every member's, each scored
    through its own single-reward-model path (`members[i].reward`)."""

    def __init__(self, first: Roles, members: list[Roles], offsets: torch.Tensor, aggregation: str, lam: float):
        super().__init__(first.policy, first.tokenizer, first.anchor, first.scorer, first.tuning)
        self.one_backbone = first.one_backbone
        self.members, self.offsets, self.aggregation, self.lam = members, offsets, aggregation, lam

    @torch.no_grad()
    def reward_and_spread(self, samples: Samples, prompts: list[str],
                          responses: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raw = torch.stack([m.reward(samples, prompts, responses).float().cpu() for m in self.members])
        centred = centre(raw, self.offsets)
        return aggregate(centred, self.aggregation, self.lam), member_std(centred)

    def reward(self, samples: Samples, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return self.reward_and_spread(samples, prompts, responses)[0]


def build_ensemble_roles(cfg: PolicyConfig, anchor_dir: Path, ensemble_dir: Path, sample_texts: list[str] = (),
                         dtype: str = "float32") -> EnsembleRoles:
    """`build_roles` for an ensemble: member 0 decides the layout, the others join it."""
    spec = read_ensemble(ensemble_dir)
    anchor_dir = Path(anchor_dir)
    first = build_roles(cfg, anchor_dir, spec.member_dirs[0], sample_texts, dtype, reward_adapter=member_adapter(0))
    members = [first]
    for i, member_dir in enumerate(spec.member_dirs[1:], start=1):
        if not first.one_backbone:
            members.append(Roles(first.policy, first.tokenizer, first.anchor,
                                 RewardScorer.load(member_dir, precision=cfg.train.precision),
                                 first.tuning))
            continue
        if not shares_backbone(read_manifest(member_dir), anchor_dir):
            raise ConfigError(f"ensemble {ensemble_dir}: {member_dir.name} does not adapt the anchor {anchor_dir} "
                              f"that {spec.member_dirs[0].name} adapts; train every member from the same anchor")
        head = load_reward_adapter(first.policy, member_dir, spec.manifest.get("head", "score"), first.hidden_size,
                                   member_adapter(i)).to(first.reward_head.weight.device)
        members.append(OneBackbone(first.policy, first.tokenizer, head, member_adapter(i)))
    return EnsembleRoles(first, members, spec.offsets, cfg.ensemble_aggregation, cfg.ensemble_lambda)
