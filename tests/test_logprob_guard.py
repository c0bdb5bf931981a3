"""RL's log-prob guard on the hf engine (scratch:llama-micro): the sampler's log-probs are the learner's
when it samples from the policy, and far from them when it samples from a stale copy of the adapter,
which stops the run naming the step. Also: sampling the anchor (`disable_adapter`) folds no adapter."""
import copy

import pytest
import torch

from perl_core.artifacts import write_manifest
from perl_core.config import build_config
from perl_core.errors import UserError
from perl_core.modeling import build_scratch_backbone, encode_prompt, load_causal_lm
from perl_core.policy.generation import HFSampler, sample_responses
from perl_core.policy.rl import gap_threshold, logprob_gap, rl_loop, token_logprobs
from perl_core.policy.roles import build_roles
from stand_ins import stand_in_reward_model

PROMPTS = [f"Customer: a {s} {d} please\nAgent:" for s in ("small", "large", "medium") for d in ("latte", "mocha")]


def policy_cfg(**train):
    return build_config({"policy": {"algorithm": "rloo", "k": 2, "lora": {"rank": 4}, "kl_coef": 0.05,
                                    "generation": {"max_new_tokens": 6, "temperature": 0.7},
                                    "train": {"batch_size": 3, "max_steps": 2, "learning_rate": 0.02,
                                              "warmup_ratio": 0.0, **train}}}).policy


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    anchor = build_scratch_backbone("llama-micro", PROMPTS, root / "anchor", vocab_size=300)
    write_manifest(anchor, kind="anchor", base_model=str(anchor), tuning="none", config={})
    return anchor, stand_in_reward_model(anchor, root / "rm")


def perturb_adapter(model, seed=1, scale=0.5):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and ".default" in name:
                p.normal_(0, scale)


def test_sampled_logprobs_are_the_learners_and_a_stale_copy_is_far(dirs):
    roles = build_roles(policy_cfg(), *dirs, sample_texts=PROMPTS)
    stale = copy.deepcopy(roles.policy)  # the adapter as it was (fresh: the anchor)
    perturb_adapter(roles.policy)  # the policy moved on
    ids = [encode_prompt(roles.tokenizer, p) for p in PROMPTS]
    torch.manual_seed(0)
    fresh = sample_responses(roles.policy, roles.tokenizer, ids, max_new_tokens=6, temperature=0.7)
    torch.manual_seed(0)
    old = sample_responses(stale, roles.tokenizer, ids, max_new_tokens=6, temperature=0.7)
    with torch.no_grad():
        fresh_gap = logprob_gap(fresh, token_logprobs(roles.policy, fresh)[0])
        old_gap = logprob_gap(old, token_logprobs(roles.policy, old)[0])
    assert fresh.response_mask.sum() > 0 and fresh_gap["logprob_gap_max"] < 1e-4
    assert old_gap["logprob_gap_max"] > 0.1 and old_gap["logprob_gap"] > 0.01
    assert gap_threshold(policy_cfg(), torch.device("cpu")) == 0.02  # fp32
    assert gap_threshold(policy_cfg(precision="bf16"), torch.device("cpu")) == 0.1


def test_rl_with_a_stale_sampler_stops_naming_the_step_and_version(dirs):
    cfg = policy_cfg()
    roles = build_roles(cfg, *dirs, sample_texts=PROMPTS)
    perturb_adapter(roles.policy)
    history = []
    result = rl_loop(roles, roles.tokenizer, PROMPTS, cfg, callback=lambda m, s: history.append(m))
    assert result.step == 2 and all(m["rl/logprob_gap_max"] < 1e-4 for m in history)

    class Stale(HFSampler):  # samples from a copy of the adapter taken before training, never updated
        def __init__(self, policy, *args):
            super().__init__(copy.deepcopy(policy), *args)

        def sync(self, step):
            pass

    roles = build_roles(cfg, *dirs, sample_texts=PROMPTS)
    perturb_adapter(roles.policy)
    sampler = Stale(roles.policy, roles.tokenizer, cfg.generation)
    perturb_adapter(roles.policy, seed=2)  # the learner's adapter is no longer the sampler's
    with pytest.raises(UserError, match=r"RL step 1: the sampler is not sampling from the policy.*hf sampler "
                                        r"\(adapter version 0\)"):
        rl_loop(roles, roles.tokenizer, PROMPTS, cfg, sampler=sampler)


def test_sampling_the_anchor_under_disable_adapter_folds_no_adapter(dirs):
    roles = build_roles(policy_cfg(), *dirs, sample_texts=PROMPTS)
    perturb_adapter(roles.policy)
    ids = [encode_prompt(roles.tokenizer, p) for p in PROMPTS]
    anchor = load_causal_lm(str(dirs[0]))
    with roles.policy.disable_adapter():
        adapters_off = sample_responses(roles.policy, roles.tokenizer, ids, max_new_tokens=6, temperature=0)
    plain = sample_responses(anchor, roles.tokenizer, ids, max_new_tokens=6, temperature=0)
    with_adapter = sample_responses(roles.policy, roles.tokenizer, ids, max_new_tokens=6, temperature=0)
    assert torch.equal(adapters_off.sequences, plain.sequences)
    assert not torch.equal(with_adapter.sequences, plain.sequences)  # the adapter does change what is sampled
