"""Policy RL on scratch:llama-micro: log-probs, KL, the one-backbone layout, RLOO, resume, guards."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from perl_core.artifacts import read_manifest, write_manifest
from perl_core.callbacks import collect
from perl_core.config import ConfigError, PolicyConfig, build_config
from stand_ins import samples_from_text, stand_in_reward_model
from perl_core.errors import NonFiniteError
from perl_core.policy.generation import PolicyGenerator, sample_responses
from perl_core.modeling import build_scratch_backbone, encode_prompt, load_causal_lm
from perl_core.policy.roles import OneBackbone, build_roles, check_reward_tokenizer, with_final_eos
from perl_core import devices
from perl_core.policy import rl, stage
from perl_core.checkpoints import latest_checkpoint
from perl_core.policy.rl import (RunningMoments, adapt_kl_coef, clip_reward, kl_penalised_reward, moving_average, policy_loss,
                                 rl_loop, rloo_advantages, row_chunks, token_logprobs)
from perl_core.policy.stage import train_policy
from perl_core.training import make_optimizer

PROMPTS = [f"Customer: a {s} {d} with {m} milk please\nAgent:" for s in ("small", "large", "medium")
           for d in ("latte", "mocha") for m in ("oat", "soy")]
CORPUS = PROMPTS + [p + " Sure, one coffee coming up." for p in PROMPTS]


def policy_cfg(**over) -> PolicyConfig:
    # beta 0.05 and T = 1, not the embedded default's 0.2 and 0.7: the settings these checks were sized for
    tree = {"policy": {"algorithm": "rloo", "k": 2, "lora": {"rank": 4}, "kl_coef": 0.05,
                       "generation": {"max_new_tokens": 6, "temperature": 1.0},
                       "train": {"batch_size": 3, "max_steps": 3, "checkpoint_every": 2, "learning_rate": 0.02,
                                 "warmup_ratio": 0.0}}}
    for key, value in over.items():
        tree["policy"][key] = value
    return build_config(tree).policy


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A random llama-micro anchor and a stand-in LoRA reward model on it, in the reward stage's format."""
    root = tmp_path_factory.mktemp("rl")
    anchor = build_scratch_backbone("llama-micro", CORPUS, root / "anchor", vocab_size=300)
    write_manifest(anchor, kind="anchor", base_model=str(anchor), tuning="none", config={})
    return anchor, stand_in_reward_model(anchor, root / "rm")


def roles_for(dirs, cfg=None):
    anchor, rm = dirs
    return build_roles(cfg or policy_cfg(), anchor, rm, sample_texts=PROMPTS)


def samples_for(roles, n=4, seed=0):
    torch.manual_seed(seed)
    ids = [encode_prompt(roles.tokenizer, p) for p in PROMPTS[:n]]
    return sample_responses(roles.policy, roles.tokenizer, ids, max_new_tokens=6)


def test_sequence_logprobs_match_a_manual_unpadded_forward(dirs):
    roles = roles_for(dirs)
    samples = samples_for(roles)
    logp, _ = token_logprobs(roles.policy, samples)
    base = load_causal_lm(str(dirs[0]))
    for i in range(len(samples.sequences)):
        keep = samples.attention_mask[i].bool()
        ids = samples.sequences[i][keep]  # the row without padding, positions 0..L-1
        n_prompt = int(samples.attention_mask[i, :samples.prompt_width].sum())
        with torch.no_grad():
            manual = torch.log_softmax(base(ids[None]).logits[0].float(), -1)
        expected = [float(manual[t - 1, ids[t]]) for t in range(n_prompt, len(ids))]
        got = logp[i][samples.response_mask[i].bool()].tolist()
        assert got == pytest.approx(expected, abs=1e-4)


def manual_logprobs(model, samples, temperature):
    """log_softmax(logits / T) of each row's response tokens from an unpadded forward (positions 0..L-1)."""
    rows = []
    for i in range(len(samples.sequences)):
        keep = samples.attention_mask[i].bool()
        ids = samples.sequences[i][keep]
        n_prompt = int(samples.attention_mask[i, :samples.prompt_width].sum())
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[None]).logits[0].float() / temperature, -1)
        rows.append(torch.stack([logp[t - 1, ids[t]] for t in range(n_prompt, len(ids))]))
    return rows


def test_logprobs_are_of_the_tempered_distribution_that_was_sampled(dirs):
    from perl_core.config import GenerationConfig
    from perl_core.eval.policy import logprobs_of, sample_with_logprobs

    roles = roles_for(dirs)  # a fresh adapter: policy == anchor
    torch.manual_seed(0)
    ids = [encode_prompt(roles.tokenizer, p) for p in PROMPTS[:4]]
    samples = sample_responses(roles.policy, roles.tokenizer, ids, max_new_tokens=6, temperature=0.7)
    assert samples.temperature == 0.7
    with torch.no_grad():
        logp, entropy = token_logprobs(roles.policy, samples)
        anchor = roles.anchor_logprobs(samples)
    base = load_causal_lm(str(dirs[0]))
    tempered, plain = manual_logprobs(base, samples, 0.7), manual_logprobs(base, samples, 1.0)
    for i, keep in enumerate(samples.response_mask.bool()):
        torch.testing.assert_close(logp[i][keep], tempered[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(anchor[i][keep], tempered[i], atol=1e-4, rtol=1e-4)
        assert (logp[i][keep] - plain[i]).abs().max() > 1e-2  # T = 0.7 really differs from T = 1
    # evaluation's KL reads its samples the same way, for the policy and for the anchor
    generator = PolicyGenerator(base, roles.tokenizer, {"config": {}}, Path("."))
    _, batches, sums, _ = sample_with_logprobs(generator, PROMPTS[:4], 0, GenerationConfig(temperature=0.7,
                                                                                             max_new_tokens=6))
    expected = torch.stack([r.sum() for r in manual_logprobs(base, batches[0], 0.7)])
    torch.testing.assert_close(torch.from_numpy(sums), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(logprobs_of(generator, batches)), expected, atol=1e-4, rtol=1e-4)


def test_kl_is_zero_when_policy_is_anchor(dirs):
    roles = roles_for(dirs)  # a fresh LoRA adapter (B = 0) is the anchor exactly
    samples = samples_for(roles)
    with torch.no_grad():
        policy_logp, _ = token_logprobs(roles.policy, samples)
        anchor_logp = roles.anchor_logprobs(samples)
    total, kl = kl_penalised_reward(torch.ones(len(kl_rows := samples.sequences)), policy_logp, anchor_logp, 0.5)
    assert torch.equal(kl, torch.zeros(len(kl_rows)))
    assert torch.equal(total, torch.ones(len(kl_rows)))


def test_rloo_baseline_on_a_hand_example():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 4.0, 4.0])
    # prompt 1: baseline of sample 1 is (2+3+6)/3 = 11/3 -> 1 - 11/3 = -8/3; of sample 4: (1+2+3)/3 = 2 -> 4
    expected = torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0, -8 / 3, -8 / 3, 8 / 3, 8 / 3])
    assert torch.allclose(rloo_advantages(rewards, 4), expected)


def test_adaptive_kl_coef_on_hand_values():
    # KL 9 vs target 6: error +0.5, clipped to +0.2; 64 samples of a 2,000-sample horizon: x(1 + 0.2 * 0.032)
    assert adapt_kl_coef(0.1, kl=9.0, target=6.0, n_samples=64, horizon=2000) == pytest.approx(0.1 * 1.0064)
    # KL 5.4 vs 6: error -0.1, inside the clip: x(1 - 0.1 * 0.032)
    assert adapt_kl_coef(0.1, kl=5.4, target=6.0, n_samples=64, horizon=2000) == pytest.approx(0.1 * 0.9968)
    assert adapt_kl_coef(0.1, kl=6.0, target=6.0, n_samples=64, horizon=2000) == pytest.approx(0.1)
    assert PolicyConfig().kl_horizon == 2000  # the default the docs quote


def test_moving_average_baseline_on_hand_values():
    b = moving_average(None, 2.0, decay=0.9)  # the first batch's mean starts it
    assert b == 2.0
    b = moving_average(b, 4.0, decay=0.9)  # 0.9 * 2 + 0.1 * 4
    assert b == pytest.approx(2.2)
    b = moving_average(b, -1.0, decay=0.9)  # 0.9 * 2.2 + 0.1 * -1
    assert b == pytest.approx(1.88)


def test_running_moments_match_numpy_over_the_concatenation():
    import numpy as np

    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=n).astype(np.float32) for n in (3, 5, 1, 8)]
    moments = RunningMoments()
    for i, batch in enumerate(batches):
        moments.update(torch.from_numpy(batch))
        seen = np.concatenate(batches[:i + 1]).astype(np.float64)
        assert moments.count == seen.size
        assert moments.mean == pytest.approx(seen.mean(), rel=1e-6)
        assert moments.var == pytest.approx(seen.var(), rel=1e-5)  # population variance, as normalise divides by
    x = torch.tensor([seen.mean(), seen.mean() + seen.std()])
    assert moments.normalise(x).tolist() == pytest.approx([0.0, 1.0], abs=1e-5)


def test_reward_clip_on_hand_values():
    r = torch.tensor([-3.0, -0.5, 0.0, 2.5])
    assert clip_reward(r, 1.0).tolist() == [-1.0, -0.5, 0.0, 1.0]
    assert clip_reward(r, None).tolist() == [-3.0, -0.5, 0.0, 2.5]


def test_policy_loss_on_a_hand_example():
    advantage = torch.tensor([2.0, -1.0], requires_grad=True)
    # two responses of up to 3 tokens; the second one's last position is padding (log-prob 0 after masking)
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.5, -1.5, 0.0]], requires_grad=True)
    loss = policy_loss(advantage, logp)
    # sums -3.5 and -2; -(2 * -3.5 + -1 * -2) / 2 = 2.5
    assert float(loss) == pytest.approx(2.5)
    loss.backward()
    # d loss / d log pi(y_it) = -A_i / N at every token; the advantage is a constant (no gradient)
    assert logp.grad.tolist() == [[-1.0, -1.0, -1.0], [0.5, 0.5, 0.5]]
    assert advantage.grad is None


def test_one_backbone_reward_equals_the_reward_models_own_scorer(dirs):
    from perl_core.reward.train import RewardScorer

    roles = roles_for(dirs)
    assert isinstance(roles, OneBackbone)
    responses = [" Sure", " one large oat latte", " coffee coming up please", " no", " a mocha", " Sure, soy"]
    samples = samples_from_text(roles.tokenizer, PROMPTS[:6], responses)
    got = roles.reward(samples, PROMPTS[:6], responses)
    # independent path: the reward helper's loader (a separate merged model, right padding)
    expected = RewardScorer.load(dirs[1]).score(PROMPTS[:6], responses)
    assert expected.std() > 0.1  # the stand-in RM tells these apart
    assert torch.allclose(got, expected, atol=1e-4)


def test_rl_trains_only_the_policy_adapter_and_the_disabled_backbone_is_the_anchor(dirs):
    roles = roles_for(dirs)
    before = {n: p.detach().clone() for n, p in roles.policy.named_parameters()}
    head_before = roles.reward_head.weight.detach().clone()
    rows = []
    rl_loop(roles, roles.tokenizer, PROMPTS, policy_cfg(), callback=collect(rows))
    changed = {n for n, p in roles.policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n and ".default." in n for n in changed)
    assert torch.equal(roles.reward_head.weight, head_before)
    # with adapters off, the trained backbone is bit-for-bit the untouched anchor
    samples = samples_for(roles)
    untouched = load_causal_lm(str(dirs[0]))
    with torch.no_grad(), roles.policy.disable_adapter():
        got = roles.policy(input_ids=samples.sequences, attention_mask=samples.attention_mask).logits
    with torch.no_grad():
        expected = untouched(input_ids=samples.sequences, attention_mask=samples.attention_mask).logits
    assert torch.equal(got, expected)
    metrics = rows[-1][1]
    for key in ("reward", "kl", "kl_coef", "entropy", "response_length", "policy_loss", "generate_seconds",
                "score_seconds", "update_seconds", "tokens_per_second"):
        assert math.isfinite(metrics[f"rl/{key}"]), key
    assert metrics["rl/kl"] != 0.0  # the policy moved away from the anchor


def gradients_and_metrics(dirs, cfg, monkeypatch):
    """Every parameter's .grad as the optimizer steps, and the step metrics, for an rl_loop run with `cfg`."""
    grads = []

    def recording_optimizer(module, tc):
        optimizer = make_optimizer(module, tc)
        optimizer.register_step_pre_hook(lambda *_: grads.append(
            {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}))
        return optimizer

    monkeypatch.setattr(rl, "make_optimizer", recording_optimizer)
    roles = roles_for(dirs, cfg)
    rows = []
    rl_loop(roles, roles.tokenizer, PROMPTS, cfg, callback=collect(rows))
    return grads, [metrics for _, metrics in rows]


@pytest.mark.parametrize("over, micro_batch_size", [
    ({}, 2),  # rloo, 6 samples in 3 chunks of 2
    ({}, 4),  # rloo, chunks of 4 and 2: a chunk splits a prompt's group of k
    ({"algorithm": "reinforce", "baseline": "value_head"}, 5),  # chunks of 5 and 1, the value head trains too
])
def test_micro_batched_update_has_the_one_pass_gradient(dirs, monkeypatch, over, micro_batch_size):
    # no clipping: a clipped gradient would hide a wrongly scaled one
    train = {"batch_size": 3, "max_steps": 2, "learning_rate": 0.02, "warmup_ratio": 0.0, "max_grad_norm": 1e6}
    one_pass = policy_cfg(**over, train=train)
    micro = policy_cfg(**over, train=train | {"micro_batch_size": micro_batch_size})
    assert len(row_chunks(one_pass.train.batch_size * one_pass.k, micro_batch_size)) > 1
    expected, expected_metrics = gradients_and_metrics(dirs, one_pass, monkeypatch)
    got, got_metrics = gradients_and_metrics(dirs, micro, monkeypatch)
    assert len(got) == len(expected) == 2
    for step_got, step_expected in zip(got, expected):
        assert step_got.keys() == step_expected.keys()
        assert any(g.abs().max() > 1e-3 for g in step_expected.values())
        for name in step_expected:
            # packed rows (perl_core.packing) are as wide as a chunk's samples need: float sums in another order
            torch.testing.assert_close(step_got[name], step_expected[name], rtol=1e-5, atol=1e-6,
                                       msg=lambda detail, name=name: f"{name}: {detail}")
    for m_got, m_expected in zip(got_metrics, expected_metrics):
        for key in ("rl/reward", "rl/kl", "rl/entropy", "rl/policy_loss", "rl/advantage_std", "rl/grad_norm"):
            assert m_got[key] == pytest.approx(m_expected[key], rel=1e-4, abs=1e-6), key
    assert expected_metrics[1]["rl/kl"] != 0.0  # step 2's KL is not 0: its no-grad pass is exercised


def test_row_chunks_cover_every_row_once():
    assert row_chunks(6, None) == [slice(0, 6)]
    assert row_chunks(6, 4) == [slice(0, 4), slice(4, 6)]
    assert row_chunks(6, 6) == row_chunks(6, 10) == [slice(0, 6)]


class Stop(Exception):
    pass


def comparable_manifest(folder) -> dict:
    """The manifest less what differs between two identical runs: its timestamp and timings."""
    manifest = read_manifest(folder)
    del manifest["created"]
    return manifest | {"metrics": {k: v for k, v in manifest["metrics"].items() if "second" not in k}}


ALGORITHMS = {"rloo": {"algorithm": "rloo"}, "moving_average": {"algorithm": "reinforce", "baseline": "moving_average"},
              "value_head": {"algorithm": "reinforce", "baseline": "value_head"}}


@pytest.mark.parametrize("algorithm, stop_at, precision", [
    ("rloo", 4, "auto"), ("moving_average", 4, "auto"), ("value_head", 4, "auto"),
    ("rloo", "after the last checkpoint", "auto"), ("rloo", 4, "fp16")])
def test_resumed_policy_stage_writes_the_same_artifact(dirs, tmp_path, monkeypatch, algorithm, stop_at, precision):
    import perl_core.data

    if precision == "fp16":  # fp16 with loss scaling on the CPU (torch has both there) as a stand-in for a GPU
        real = devices.autocast_dtype

        def fp16_anywhere(p, d, s="train.precision"):
            return torch.float16 if p == "fp16" else real(p, d, s)
        monkeypatch.setattr(devices, "autocast_dtype", fp16_anywhere)
        monkeypatch.setattr(stage, "autocast_dtype", fp16_anywhere)  # the stage's check before any work
    monkeypatch.setattr(perl_core.data, "load_prompts", lambda cfg, split: PROMPTS, raising=False)
    monkeypatch.setattr("perl_core.data.versioning.recorded_version", lambda: {"md5": "test"})
    anchor, rm = dirs
    # the baseline (moving average or value head), the running reward moments and the adaptive kl_coef all
    # carry from step to step: the checkpoint must hold them
    cfg = build_config({"policy": policy_cfg(adaptive_kl=True, **ALGORITHMS[algorithm], train={
        "batch_size": 3, "max_steps": 5, "checkpoint_every": 2, "learning_rate": 0.02, "warmup_ratio": 0.0,
        "precision": precision}).model_dump()})
    used_kl_coef = []
    straight = train_policy(cfg, tmp_path / "straight", anchor, rm,
                            callback=lambda metrics, step: used_kl_coef.append(metrics["rl/kl_coef"]))
    # final_* metrics are means over the last (up to 10) steps, final_kl_coef too; last_kl_coef is where it ended
    assert straight.metrics["final_kl_coef"] == pytest.approx(sum(used_kl_coef[-10:]) / len(used_kl_coef[-10:]))
    assert straight.metrics["final_kl_coef"] != straight.metrics["last_kl_coef"]
    if stop_at == "after the last checkpoint":  # what a run killed after its last checkpoint leaves on disk
        shutil.copytree(tmp_path / "straight" / "checkpoints", tmp_path / "stopped" / "checkpoints")
    else:  # stopped before the checkpoint of step 4: it resumes from step 2

        def stop(metrics, step):
            if step == stop_at:
                raise Stop

        with pytest.raises(Stop):
            train_policy(cfg, tmp_path / "stopped", anchor, rm, callback=stop)
    resumed = train_policy(cfg, tmp_path / "stopped", anchor, rm, resume=True)
    adapter = "adapter_model.safetensors"
    assert (tmp_path / "stopped" / adapter).read_bytes() == (tmp_path / "straight" / adapter).read_bytes()
    # the manifest's summary averages the last steps, those before the interruption included
    assert comparable_manifest(tmp_path / "stopped") == comparable_manifest(tmp_path / "straight")
    assert resumed.metrics["final_kl_coef"] == straight.metrics["final_kl_coef"] != cfg.policy.kl_coef
    assert resumed.metrics["last_kl_coef"] == straight.metrics["last_kl_coef"]
    # fp16's loss scale is part of the state: it decides which steps are skipped
    scalers = [json.loads((latest_checkpoint(tmp_path / run / "checkpoints") / "state.json").read_text())
               ["extra"]["grad_scaler"] for run in ("straight", "stopped")]
    assert scalers[0] == scalers[1] and (scalers[0] is None) == (precision != "fp16")


def test_nan_reward_stops_the_run_and_keeps_the_last_good_checkpoint(dirs, tmp_path):
    roles = roles_for(dirs)
    real = roles.reward
    calls = []

    def flaky(samples, prompts, responses):
        calls.append(1)
        r = real(samples, prompts, responses)
        return r if len(calls) < 3 else r * float("nan")

    roles.reward = flaky
    with pytest.raises(NonFiniteError, match=r"reward-model reward became nan at step 3.*step-000002"):
        rl_loop(roles, roles.tokenizer, PROMPTS, policy_cfg(), checkpoint_dir=tmp_path)
    assert latest_checkpoint(tmp_path).name == "step-000002"


def test_bad_configs_are_rejected_with_their_setting():
    with pytest.raises(ConfigError, match=r"policy.k must be >= 2 for algorithm 'rloo'"):
        build_config({"policy": {"algorithm": "rloo", "k": 1}})
    with pytest.raises(ConfigError, match=r"policy.generation.max_new_tokens"):
        build_config({"policy": {"generation": {"max_new_tokens": 0}}})
    with pytest.raises(ConfigError, match=r"policy.train.grad_accum must be 1"):
        build_config({"policy": {"train": {"grad_accum": 2}}})
    with pytest.raises(ConfigError, match=r"policy.train.micro_batch_size: Input should be greater than or equal to 1"):
        build_config({"policy": {"train": {"micro_batch_size": 0}}})
    with pytest.raises(ConfigError, match=r"sft.train.micro_batch_size: unknown setting"):
        build_config({"sft": {"train": {"micro_batch_size": 4}}})  # only the RL update is micro-batched


def test_a_reward_model_that_cannot_read_the_policy_text_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    ascii_only = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    check_reward_tokenizer(ascii_only, ["coffee"], tmp_path)
    with pytest.raises(ConfigError, match=r"tokenizer cannot read the policy's text.*'é'"):
        check_reward_tokenizer(ascii_only, ["café"], tmp_path)


def test_cut_responses_get_their_eos_for_scoring(dirs):
    roles = roles_for(dirs)
    samples = samples_for(roles)
    assert not samples.finished.all()  # max_new_tokens cut at least one response, so the cut path runs
    ids, mask = with_final_eos(samples, eos_id=2, pad_id=0)
    for i, done in enumerate(samples.finished):
        assert (ids[i, -1] == 2) == (not done) and (mask[i, -1] == 1) == (not done)


def test_policy_artifact_round_trips_through_policy_generator(dirs, tmp_path):
    roles = roles_for(dirs)
    rl_loop(roles, roles.tokenizer, PROMPTS, policy_cfg(train={"max_steps": 1}))
    roles.save_policy(tmp_path)
    write_manifest(tmp_path, kind="policy", base_model=str(dirs[0]), tuning="lora",
                   config=policy_cfg().model_dump(), anchor=str(dirs[0]))
    assert (tmp_path / "adapter_model.safetensors").exists() and not (tmp_path / "reward").exists()
    gen = PolicyGenerator.load(tmp_path)
    a = gen.generate(PROMPTS[:3], seed=1)
    assert a == gen.generate(PROMPTS[:3], seed=1) and len(a) == 3
    # greedy decoding of the merged artifact equals greedy decoding of the in-memory policy
    torch.manual_seed(0)
    ids = [encode_prompt(roles.tokenizer, p) for p in PROMPTS[:3]]
    from perl_core.policy.generation import decode_responses

    live = decode_responses(roles.tokenizer, sample_responses(roles.policy, roles.tokenizer, ids, max_new_tokens=6,
                                                              temperature=0))
    assert gen.generate(PROMPTS[:3], temperature=0, max_new_tokens=6) == live


def test_sample_completions_reach_the_samples_callback_every_n_steps_and_at_the_end(dirs):
    roles = roles_for(dirs)
    metrics, tables = [], []
    cfg = policy_cfg(log_samples_every=2, train={"max_steps": 5, "batch_size": 3})
    rl_loop(roles, roles.tokenizer, PROMPTS, cfg, callback=collect(metrics), gold_score=lambda p, r: len(r) / 100,
            samples_callback=lambda rows, step: tables.append((step, rows)))
    assert [step for step, _ in tables] == [2, 4, 5]
    reward_at = {step: m["rl/reward"] for step, m in metrics}
    for step, rows in tables:
        assert len(rows) == 3 * 2 and all(set(r) == {"prompt", "response", "reward", "gold_score"} for r in rows)
        assert all(r["prompt"] in PROMPTS for r in rows)
        assert [r["prompt"] for r in rows[::2]] == [r["prompt"] for r in rows[1::2]]  # k=2 consecutive per prompt
        assert [r["gold_score"] for r in rows] == [len(r["response"]) / 100 for r in rows]
        assert sum(r["reward"] for r in rows) / len(rows) == pytest.approx(reward_at[step], abs=1e-6)

    tables.clear()
    rl_loop(roles, roles.tokenizer, PROMPTS, policy_cfg(log_samples_every=0, train={"max_steps": 1}),
            samples_callback=lambda rows, step: tables.append((step, rows)))
    assert tables == []


def test_policy_efficiency_quick_reports_both_layouts(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("policy_efficiency",
                                                  Path(__file__).parent.parent / "benchmarks" / "policy_efficiency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--quick", "--out", str(tmp_path / "report.json"), "--work-dir", str(tmp_path / "work"),
                         "--set", f"data.data_dir={tmp_path / 'data'}", "--set", "data.synthetic.n_prompts=40"])
    full, lora = report["settings"]["full"], report["settings"]["lora"]
    assert lora["layout"] == "one backbone" and full["layout"].startswith("separate")
    # parameter counts are exact, not timings: one backbone holds one copy of the weights, full holds three
    assert lora["trainable_params"] < full["trainable_params"] / 10
    assert lora["resident_params"] < 0.5 * full["resident_params"]
    for setting in (full, lora):
        assert setting["median_step_seconds"] > 0 and setting["memory"]["peak_rss_mb"] > 0
    assert set(report["summary"]) >= {"memory_ratio", "step_time_ratio", "generate_time_ratio", "update_time_ratio"}
