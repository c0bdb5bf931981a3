"""GRPO in perl_core.policy.rl: group-relative advantages, the clipped ratio, the three aggregations, mu passes."""
import math

import pytest
import torch

from perl_core.callbacks import collect
from perl_core.config import ConfigError, build_config
from perl_core.policy import rl
from perl_core.policy.rl import (clipped_objective, group_advantages, grpo_loss, k3_kl, kl_penalised_reward,
                                 rl_loop, token_logprobs)
from perl_core.training import make_optimizer
from stand_ins import samples_from_text
from test_rl import PROMPTS, dirs, policy_cfg, roles_for  # noqa: F401 - dirs is a fixture

# two responses of up to 3 tokens (the first one's last position is padding), old log-probs 0:
# the ratios are the exp of these log-probs
RATIOS = torch.tensor([[1.5, 0.5, 1.0], [1.1, 0.7, 1.3]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
ADVANTAGE = torch.tensor([1.0, -2.0])


def hand_batch():
    logp = (RATIOS.log() * MASK).requires_grad_(True)
    return logp, clipped_objective(logp, torch.zeros_like(logp), ADVANTAGE, 0.2, 0.28)


def test_clipped_objective_on_hand_values():
    _, objective = hand_batch()
    # row 0 (A = 1):  min(1.5, 1.28) = 1.28 (clipped above); min(0.5, 0.8) = 0.5
    # row 1 (A = -2): min(-2.2, -2.2) = -2.2; min(-1.4, -1.6) = -1.6 (clipped below); min(-2.6, -2.56) = -2.6
    expected = torch.tensor([[1.28, 0.5, 1.0], [-2.2, -1.6, -2.6]])
    torch.testing.assert_close(objective * MASK, expected * MASK)


@pytest.mark.parametrize("loss_type, expected", [
    ("grpo", -((1.28 + 0.5) / 2 + (-2.2 - 1.6 - 2.6) / 3) / 2),  # each response's token mean, then the mean
    ("dapo", -(1.28 + 0.5 - 2.2 - 1.6 - 2.6) / 5),              # every token of the batch alike
    ("dr_grpo", -(1.28 + 0.5 - 2.2 - 1.6 - 2.6) / (2 * 3)),     # samples x max_new_tokens
])
def test_each_loss_on_a_hand_batch(loss_type, expected):
    logp, objective = hand_batch()
    loss = grpo_loss(objective, MASK, loss_type, n_samples=2, n_tokens=5, max_new_tokens=3)
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-6)
    loss.backward()
    # d o / d log pi = rho * A where the unclipped term is in effect, 0 where the clipped one is
    per_token = torch.tensor([[0.0, 0.5, 0.0], [-2.2, 0.0, -2.6]])
    weight = {"grpo": torch.tensor([[1 / 2], [1 / 3]]) / 2, "dapo": torch.full((2, 1), 1 / 5),
              "dr_grpo": torch.full((2, 1), 1 / 6)}[loss_type]
    torch.testing.assert_close(logp.grad, -per_token * weight)


def test_sequence_and_token_aggregation_differ_exactly_as_defined():
    torch.manual_seed(0)
    objective = torch.randn(4, 5)
    mask = torch.tensor([[1.0] * 5, [1.0] * 2 + [0.0] * 3, [1.0] * 4 + [0.0], [1.0] + [0.0] * 4])
    lengths = mask.sum(-1)
    kw = dict(n_samples=4, n_tokens=float(lengths.sum()), max_new_tokens=5)
    per_sequence = float(grpo_loss(objective, mask, "grpo", **kw))
    per_token = float(grpo_loss(objective, mask, "dapo", **kw))
    sums = (objective * mask).sum(-1)
    # grpo weighs response i by 1 / (N |y_i|), dapo by 1 / sum |y|: a long response counts more under dapo
    assert per_sequence == pytest.approx(-float((sums / lengths).mean()), abs=1e-6)
    assert per_token == pytest.approx(-float(sums.sum() / lengths.sum()), abs=1e-6)
    assert per_sequence - per_token == pytest.approx(float(-(sums * (1 / (4 * lengths) - 1 / lengths.sum())).sum()),
                                                     abs=1e-6)
    assert per_sequence != pytest.approx(per_token)
    # all responses max_new_tokens long: the three are one loss
    full = torch.ones(4, 5)
    kw = dict(n_samples=4, n_tokens=20.0, max_new_tokens=5)
    values = [float(grpo_loss(objective, full, t, **kw)) for t in ("grpo", "dapo", "dr_grpo")]
    assert values == pytest.approx([values[0]] * 3, abs=1e-6)


def test_group_advantages_and_k3_on_hand_values():
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0])
    assert group_advantages(rewards, 2, scale=False).tolist() == [-1.0, 1.0, 0.0, 0.0]
    scaled = group_advantages(rewards, 2, scale=True)
    assert scaled.tolist() == pytest.approx([-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4), 0.0, 0.0])
    # q - l = log 0.25 - log 0.5 = log 0.5: 0.5 - log 0.5 - 1
    assert float(k3_kl(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25)))) == pytest.approx(
        0.5 - math.log(0.5) - 1)
    assert float(k3_kl(torch.tensor(-1.3), torch.tensor(-1.3))) == 0.0


def test_one_pass_without_clipping_is_reinforce_with_each_groups_mean_as_baseline(dirs):
    roles = roles_for(dirs)
    prompts = [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    samples = samples_from_text(roles.tokenizer, prompts, [" Sure", " one large latte coming", " ok ok", " hi"])
    rewards = torch.tensor([0.3, -1.0, 2.0, 0.5])
    params = [p for p in roles.policy.parameters() if p.requires_grad]

    def grads(loss_of):
        roles.policy.zero_grad()
        loss_of(token_logprobs(roles.policy, samples)[0]).backward()
        return [p.grad.clone() for p in params]

    mask = samples.response_mask.float()
    advantage = group_advantages(rewards, 2, scale=False)
    got = grads(lambda logp: grpo_loss(clipped_objective(logp, logp.detach(), advantage, 0.2, 0.28), mask, "grpo",
                                       n_samples=4, n_tokens=float(mask.sum()), max_new_tokens=8))

    def reinforce(logp):  # written out: -1/N sum_i (R_i - mean of its group) / |y_i| * sum_t log pi(y_it)
        total = 0.0
        for i in range(4):
            group = rewards[2 * (i // 2):2 * (i // 2) + 2]
            total = total - (rewards[i] - group.mean()) / mask[i].sum() * logp[i].sum()
        return total / 4

    expected = grads(reinforce)
    assert any(float(g.abs().max()) > 1e-4 for g in expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def step_one(dirs, cfg, monkeypatch):
    """The gradients of every optimizer step and the metrics of an rl_loop run."""
    grads, lrs = [], []

    def recording_optimizer(module, tc):
        def record(optimizer, *_):
            grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
            lrs.append(optimizer.param_groups[0]["lr"])

        optimizer = make_optimizer(module, tc)
        optimizer.register_step_pre_hook(record)
        return optimizer

    monkeypatch.setattr(rl, "make_optimizer", recording_optimizer)
    roles = roles_for(dirs, cfg)
    rows = []
    rl_loop(roles, roles.tokenizer, PROMPTS, cfg, callback=collect(rows))
    return grads, lrs, [m for _, m in rows]


TRAIN = {"batch_size": 3, "max_steps": 2, "learning_rate": 0.02, "warmup_ratio": 0.0, "max_grad_norm": 1e6}


def test_grpo_in_the_loop_has_rloos_gradient_up_to_its_constant(dirs, monkeypatch):
    # the same samples (same seed): rloo's A = k/(k-1) (R - group mean) against sum_t log pi, dr_grpo's
    # (R - group mean) against sum_t log pi / max_new_tokens; k = 2, max_new_tokens = 6: a factor of 12
    rloo, _, _ = step_one(dirs, policy_cfg(train=TRAIN), monkeypatch)
    grpo, _, metrics = step_one(dirs, policy_cfg(algorithm="grpo", loss_type="dr_grpo", scale_advantages=False,
                                                 train=TRAIN), monkeypatch)
    for name in rloo[0]:
        torch.testing.assert_close(grpo[0][name] * 12, rloo[0][name], rtol=1e-4, atol=1e-6)
    assert metrics[0]["rl/clip_fraction"] == 0.0  # one pass: the ratio is 1


def test_mu_passes_step_the_optimizer_mu_times_and_the_schedule_once_per_batch(dirs, monkeypatch):
    train = TRAIN | {"max_steps": 3, "warmup_ratio": 0.5, "learning_rate": 0.05}
    _, lrs_one, metrics_one = step_one(dirs, policy_cfg(algorithm="grpo", train=train), monkeypatch)
    grads, lrs, metrics = step_one(dirs, policy_cfg(algorithm="grpo", train=train | {"updates_per_batch": 2}),
                                   monkeypatch)
    assert len(lrs_one) == 3 and len(lrs) == 6
    assert lrs == [lr for lr in lrs_one for _ in range(2)]  # both passes of a batch at that batch's rate
    assert lrs_one[0] < lrs_one[1]  # the warm-up: the schedule moved between batches
    assert [m["rl/lr"] for m in metrics] == [m["rl/lr"] for m in metrics_one]
    # the second pass sees the weights the first moved: another gradient, ratios away from 1
    assert any(not torch.allclose(grads[1][n], grads[0][n]) for n in grads[0])
    assert all(0.0 <= m["rl/clip_fraction"] <= 1.0 for m in metrics)


def test_micro_batched_grpo_has_the_one_pass_gradient(dirs, monkeypatch):
    over = dict(algorithm="grpo", loss_type="grpo", kl_in="loss", kl_coef=0.5)
    train = TRAIN | {"updates_per_batch": 2}
    expected, _, _ = step_one(dirs, policy_cfg(**over, train=train), monkeypatch)
    got, _, _ = step_one(dirs, policy_cfg(**over, train=train | {"micro_batch_size": 4}), monkeypatch)
    assert len(got) == len(expected) == 4
    for step_got, step_expected in zip(got, expected):
        for name in step_expected:
            torch.testing.assert_close(step_got[name], step_expected[name], rtol=1e-4, atol=1e-6)


def test_kl_in_the_loss_leaves_the_reward_unpenalised():
    reward, logp, anchor = torch.tensor([1.0, 2.0]), torch.tensor([[-1.0, -2.0], [-0.5, 0.0]]), torch.zeros(2, 2)
    total, kl = kl_penalised_reward(reward, logp, anchor, 0.0)
    assert total.tolist() == [1.0, 2.0] and kl.tolist() == [-3.0, -0.5]


def test_grpo_settings_are_checked_with_their_names():
    with pytest.raises(ConfigError, match=r"policy.k must be >= 2 for algorithm 'grpo'"):
        build_config({"policy": {"algorithm": "grpo", "k": 1}})
    with pytest.raises(ConfigError, match=r"updates_per_batch > 1 .* need policy.algorithm grpo"):
        build_config({"policy": {"algorithm": "rloo", "train": {"updates_per_batch": 2}}})
    with pytest.raises(ConfigError, match=r"kl_in=loss need policy.algorithm grpo"):
        build_config({"policy": {"algorithm": "reinforce", "kl_in": "loss"}})
    with pytest.raises(ConfigError, match=r"policy.loss_type"):
        build_config({"policy": {"algorithm": "grpo", "loss_type": "bnpo"}})


def test_a_resumed_grpo_stage_writes_the_same_adapter(dirs, tmp_path, monkeypatch):
    import perl_core.data
    from perl_core.policy.stage import train_policy

    monkeypatch.setattr(perl_core.data, "load_prompts", lambda cfg, split: PROMPTS, raising=False)
    monkeypatch.setattr(perl_core.data, "load_prompt_rows", lambda cfg, split: {}, raising=False)
    monkeypatch.setattr("perl_core.data.versioning.recorded_version", lambda: {"md5": "test"})
    anchor, rm = dirs
    # mu = 2 under a warm-up and a linear decay: the schedule's place (once per batch) is part of the state
    cfg = build_config({"policy": policy_cfg(
        algorithm="grpo", kl_in="loss", rewards=[{"weight": 1.0}, {"function": "perl_core.policy.rewards:ends_turn"}],
        train={"batch_size": 3, "max_steps": 4, "checkpoint_every": 2, "learning_rate": 0.02, "warmup_ratio": 0.25,
               "updates_per_batch": 2}).model_dump()})
    train_policy(cfg, tmp_path / "straight", anchor, rm)

    def stop(metrics, step):
        if step == 3:
            raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        train_policy(cfg, tmp_path / "stopped", anchor, rm, callback=stop)
    train_policy(cfg, tmp_path / "stopped", anchor, rm, resume=True)
    adapter = "adapter_model.safetensors"
    assert (tmp_path / "stopped" / adapter).read_bytes() == (tmp_path / "straight" / adapter).read_bytes()
