"""Reward-model ensembles on scratch:llama-micro: the aggregations by hand, members on one backbone
scoring as each does alone, the base weights held once, an ensemble of one = the reward model,
training, evaluation, serving and the over-optimisation benchmark's quick mode."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from perl_core import data as data_api
from perl_core.artifacts import ENSEMBLE_KIND, write_manifest
from perl_core.callbacks import collect
from perl_core.config import ConfigError, PerlConfig, build_config
from perl_core.reward.ensemble import EnsembleScorer, aggregate, bootstrap_rows, centre, member_std, train_reward_ensemble
from perl_core.reward.stage import load_reward_scorer, train_reward_stage
from perl_core.errors import UserError
from stand_ins import samples_from_text
from perl_core.modeling import (attach_lora, build_scratch_backbone, load_causal_lm,
                                load_sequence_scorer, load_tokenizer)
from perl_core.policy.roles import EnsembleRoles, OneBackbone, build_ensemble_roles, build_roles
from perl_core.reward.train import RewardScorer, save_reward_model, train_reward_model
from perl_core.policy.rl import rl_loop

PROMPTS = [f"Customer: a {s} {d} with {m} milk please\nAgent:" for s in ("small", "large", "medium")
           for d in ("latte", "mocha") for m in ("oat", "soy")]
CORPUS = PROMPTS + [p + " Sure, one coffee coming up." for p in PROMPTS]
RESPONSES = [" Sure", " one large oat latte", " coffee coming up please", " no", " a mocha", " Sure, soy"]
OFFSETS = [0.5, -1.0, 0.25]


# ---------------------------------------------------------------- the math, by hand
def test_aggregations_match_hand_values():
    scores = torch.tensor([[1.0, 4.0], [3.0, 0.0], [2.0, 2.0]])  # 3 members x 2 samples
    assert aggregate(scores, "mean").tolist() == [2.0, 2.0]
    assert aggregate(scores, "min").tolist() == [1.0, 0.0]
    # population std: sqrt(((1-2)^2 + (3-2)^2 + 0) / 3) = sqrt(2/3); sqrt((4 + 4 + 0) / 3) = sqrt(8/3)
    assert member_std(scores).tolist() == pytest.approx([math.sqrt(2 / 3), math.sqrt(8 / 3)])
    assert aggregate(scores, "mean_minus_std", lam=0.5).tolist() == pytest.approx(
        [2 - 0.5 * math.sqrt(2 / 3), 2 - 0.5 * math.sqrt(8 / 3)])
    # each member's offset comes off its own row
    assert centre(scores, torch.tensor([1.0, -1.0, 0.0])).tolist() == [[0.0, 3.0], [4.0, 1.0], [2.0, 2.0]]
    # one member: no spread, every aggregation is that member's score
    one = torch.tensor([[0.3, -1.2]])
    assert member_std(one).tolist() == [0.0, 0.0]
    for how in ("mean", "min", "mean_minus_std"):
        assert aggregate(one, how, lam=2.0).tolist() == pytest.approx([0.3, -1.2])
    with pytest.raises(ConfigError, match="policy.ensemble_aggregation is 'median'"):
        aggregate(scores, "median")


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="policy.ensemble_aggregation"):
        build_config({}, ["policy.ensemble_aggregation=median"])
    with pytest.raises(ConfigError, match="reward.ensemble.size"):
        build_config({}, ["reward.ensemble.size=0"])
    with pytest.raises(ConfigError, match="policy.ensemble_lambda"):
        build_config({}, ["policy.ensemble_lambda=-1"])
    cfg = PerlConfig()
    assert cfg.reward.ensemble.size is None and cfg.policy.ensemble_aggregation == "min"


def test_bootstrap_resamples_are_seeded_and_draw_with_replacement():
    rows = [{"i": i} for i in range(50)]
    a, b = bootstrap_rows(rows, seed=1), bootstrap_rows(rows, seed=1)
    assert a == b and len(a) == 50 and all(r in rows for r in a)
    assert len({r["i"] for r in a}) < 50  # some rows twice, some not at all (about 63% distinct)
    assert bootstrap_rows(rows, seed=2) != a


# ---------------------------------------------------------------- a hand-made ensemble on one anchor
def stand_in_reward_model(anchor: Path, out: Path, seed: int) -> Path:
    """A LoRA reward model on `anchor` with random (non-zero) adapter and head weights."""
    tok = load_tokenizer(str(anchor))
    rm = attach_lora(load_sequence_scorer(str(anchor), tok.pad_token_id), PerlConfig().reward.lora, "SEQ_CLS",
                     modules_to_save=["score"])
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in rm.named_parameters():
            if "lora_B" in name or "score" in name:
                p.normal_(0, 0.5)
    save_reward_model(rm, tok, out, PerlConfig(), base=str(anchor), head="score", metrics={})
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """An anchor, three stand-in LoRA reward models as an ensemble (offsets by hand), and the anchor's config."""
    root = tmp_path_factory.mktemp("ensemble")
    anchor = build_scratch_backbone("llama-micro", CORPUS, root / "anchor", vocab_size=300)
    write_manifest(anchor, kind="anchor", base_model=str(anchor), tuning="none", config={})
    ens = root / "ensemble"
    members = []
    for i, offset in enumerate(OFFSETS):
        stand_in_reward_model(anchor, ens / f"member_{i}", seed=10 + i)
        members.append({"folder": f"member_{i}", "seed": i, "bootstrap": False, "offset": offset})
    write_manifest(ens, kind=ENSEMBLE_KIND, base_model=str(anchor.resolve()), tuning="lora", config={},
                   members=members, head="score", objective="pairwise", max_length=128, truncation="error")
    return anchor, ens


def policy_cfg(**policy):
    tree = {"policy": {"algorithm": "rloo", "k": 2, "lora": {"rank": 4}, "generation": {"max_new_tokens": 6},
                       "train": {"batch_size": 3, "max_steps": 2, "learning_rate": 0.02, "warmup_ratio": 0.0},
                       **policy}}
    return build_config(tree).policy


def test_each_member_on_one_backbone_scores_exactly_as_it_does_alone(dirs):
    anchor, ens = dirs
    roles = build_ensemble_roles(policy_cfg(ensemble_aggregation="mean_minus_std", ensemble_lambda=0.5), anchor, ens)
    assert isinstance(roles, EnsembleRoles) and roles.one_backbone
    assert set(roles.policy.peft_config) == {"default", "reward_0", "reward_1", "reward_2"}
    samples = samples_from_text(roles.tokenizer, PROMPTS[:6], RESPONSES)
    members = []
    for i, member in enumerate(roles.members):
        alone = build_roles(policy_cfg(), anchor, ens / f"member_{i}")
        assert isinstance(alone, OneBackbone) and alone.reward_adapter == "reward"
        expected = alone.reward(samples, PROMPTS[:6], RESPONSES)
        got = member.reward(samples, PROMPTS[:6], RESPONSES)
        assert torch.equal(got, expected), (i, got, expected)
        members.append(expected)
    raw = torch.stack(members)
    assert (raw[0] - raw[1]).abs().max() > 0.1  # the members really disagree
    reward, spread = roles.reward_and_spread(samples, PROMPTS[:6], RESPONSES)
    centred = raw - torch.tensor(OFFSETS)[:, None]
    mean, std = centred.mean(0), centred.std(0, unbiased=False)
    torch.testing.assert_close(reward, mean - 0.5 * std)
    torch.testing.assert_close(spread, std)
    # the policy adapter is active again after scoring (it is the one that trains)
    assert roles.policy.active_adapter == "default"


def test_the_one_backbone_ensemble_holds_the_base_weights_once(dirs):
    anchor, ens = dirs
    roles = build_ensemble_roles(policy_cfg(), anchor, ens)
    single = build_roles(policy_cfg(), anchor, ens / "member_0")
    assert all(m.policy is roles.policy for m in roles.members)
    base = {n: p for n, p in roles.policy.named_parameters() if "lora_" not in n}
    anchor_numel = sum(p.numel() for p in load_causal_lm(str(anchor)).parameters())
    # the anchor's weights, once: as many elements as the anchor, no tensor shared under two names or copied
    assert sum(p.numel() for p in base.values()) == anchor_numel
    assert len({p.data_ptr() for p in base.values()}) == len(base)
    # each further member adds exactly its LoRA adapter (as saved) and its head
    extra = sum(p.numel() for p in roles.policy.parameters()) - sum(p.numel() for p in single.policy.parameters())
    saved = [load_file(str(ens / f"member_{i}" / "adapter_model.safetensors")) for i in (1, 2)]
    assert extra == sum(v.numel() for s in saved for k, v in s.items() if "lora_" in k)
    heads = [m.reward_head for m in roles.members]
    assert len({h.weight.data_ptr() for h in heads}) == 3
    assert all(h.weight.numel() == roles.hidden_size for h in heads)
    # scoring and training see no reward weights as trainable
    assert all("lora_" in n and ".default." in n for n, p in roles.policy.named_parameters() if p.requires_grad)


def test_rl_on_the_ensemble_logs_the_members_spread_and_trains_only_the_policy(dirs):
    anchor, ens = dirs
    roles = build_ensemble_roles(policy_cfg(), anchor, ens)
    before = {n: p.detach().clone() for n, p in roles.policy.named_parameters()}
    rows = []
    rl_loop(roles, roles.tokenizer, PROMPTS, policy_cfg(), callback=collect(rows))
    assert len(rows) == 2 and all(m["rl/reward_member_std"] > 0 for _, m in rows)
    changed = {n for n, p in roles.policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".default." in n for n in changed)
    single_rows = []
    rl_loop(build_roles(policy_cfg(), anchor, ens / "member_0"), roles.tokenizer, PROMPTS, policy_cfg(),
            callback=collect(single_rows))
    assert "rl/reward_member_std" not in single_rows[0][1]


def test_a_member_that_adapts_another_anchor_is_refused(dirs, tmp_path):
    import shutil

    anchor, ens = dirs
    other = tmp_path / "other-anchor"
    shutil.copytree(anchor, other)
    mixed = tmp_path / "mixed"
    shutil.copytree(ens, mixed)
    shutil.rmtree(mixed / "member_2")
    stand_in_reward_model(other, mixed / "member_2", seed=5)
    with pytest.raises(ConfigError, match="member_2 does not adapt the anchor"):
        build_ensemble_roles(policy_cfg(), anchor, mixed)


def test_the_separate_layout_loads_one_scorer_per_member(dirs):
    anchor, ens = dirs
    roles = build_ensemble_roles(policy_cfg(tuning="full", lora={"rank": 4}), anchor, ens, sample_texts=PROMPTS)
    assert not roles.one_backbone and len({id(m.scorer) for m in roles.members}) == 3
    samples = samples_from_text(roles.tokenizer, PROMPTS[:6], RESPONSES)
    got = roles.reward(samples, PROMPTS[:6], RESPONSES)
    raw = torch.stack([RewardScorer.load(ens / f"member_{i}").score(PROMPTS[:6], RESPONSES) for i in range(3)])
    torch.testing.assert_close(got, (raw - torch.tensor(OFFSETS)[:, None]).min(0).values, atol=1e-5, rtol=1e-5)


def test_ensemble_scorer_puts_members_on_one_base_and_scores_each_as_alone(dirs):
    anchor, ens = dirs
    scorer = load_reward_scorer(ens, aggregation="mean")
    assert isinstance(scorer, EnsembleScorer) and scorer.size == 3
    raw = scorer.member_scores(PROMPTS[:6], RESPONSES)
    alone = torch.stack([RewardScorer.load(ens / f"member_{i}").score(PROMPTS[:6], RESPONSES) for i in range(3)])
    torch.testing.assert_close(raw, alone, atol=1e-4, rtol=1e-5)  # merged vs un-merged adapters: float rounding
    centred = alone - torch.tensor(OFFSETS)[:, None]
    torch.testing.assert_close(scorer.score(PROMPTS[:6], RESPONSES), centred.mean(0), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(scorer.combine(raw, "min"), centred.min(0).values, atol=1e-4, rtol=1e-5)
    # one base model: its weights once, plus three adapters and three heads
    base = load_sequence_scorer(str(anchor), scorer.tokenizer.pad_token_id)
    shared = scorer.scorers[0].model
    assert all(s is scorer.scorers[0] for s in scorer.scorers)
    lora = sum(p.numel() for n, p in shared.named_parameters() if "lora_" in n)
    saved = [load_file(str(ens / f"member_{i}" / "adapter_model.safetensors")) for i in range(3)]
    assert lora == sum(v.numel() for s in saved for k, v in s.items() if "lora_" in k)
    heads = sum(p.numel() for n, p in shared.named_parameters() if "modules_to_save" in n)
    assert heads == 3 * base.score.weight.numel()
    assert sum(p.numel() for p in shared.parameters()) == sum(p.numel() for p in base.parameters()) + lora + heads


def test_a_broken_ensemble_folder_is_named(dirs, tmp_path):
    import shutil

    _, ens = dirs
    broken = tmp_path / "broken"
    shutil.copytree(ens, broken)
    shutil.rmtree(broken / "member_1")
    with pytest.raises(UserError, match="member_1 does not exist"):
        load_reward_scorer(broken)
    from flows.cli_common import check_model_dir

    (broken / "member_0" / "adapter_model.safetensors").unlink()
    shutil.copytree(ens / "member_1", broken / "member_1")
    check_model_dir(ens, "reward_model")  # an ensemble is a reward model on the command line
    with pytest.raises(UserError, match=r"member_0 is not a complete reward_model artifact: no \*.safetensors"):
        check_model_dir(broken, "reward_model")
    with pytest.raises(UserError, match="expected an anchor artifact, found kind='reward_ensemble'"):
        check_model_dir(broken, "anchor")
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "members": []}))
    with pytest.raises(UserError, match="`members` must list the member folders"):
        load_reward_scorer(broken)
    (broken / "manifest.json").write_text(json.dumps({**manifest, "kind": "policy"}))
    with pytest.raises(UserError, match="expected a reward_model or reward_ensemble artifact, found kind='policy'"):
        load_reward_scorer(broken)


# ---------------------------------------------------------------- evaluation and serving
@pytest.fixture
def eval_rows(monkeypatch):
    pairwise = [{"prompt": p, "chosen": r, "rejected": RESPONSES[(i + 1) % 6]}
                for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES * 2))]
    pointwise = [{"prompt": r["prompt"], "response": r[k], "label": int(k == "chosen")}
                 for r in pairwise for k in ("chosen", "rejected")]
    store = {"pairwise": pairwise, "pointwise": pointwise}
    monkeypatch.setattr(data_api, "load_rows", lambda cfg, view, split: store[view])
    return store


def test_eval_reward_reports_the_aggregate_each_member_and_the_disagreement(dirs, eval_rows, tmp_path):
    from perl_core import metrics as M
    from perl_core.eval.reward import evaluate_reward_model

    _, ens = dirs
    cfg = build_config({}, ["policy.ensemble_aggregation=min", "evaluation.bootstrap_samples=100"])
    m = evaluate_reward_model(cfg, ens, tmp_path / "ens")
    pw = eval_rows["pairwise"]
    prompts = [r["prompt"] for r in pw]
    raw = {k: torch.stack([RewardScorer.load(ens / f"member_{i}").score(prompts, [r[k] for r in pw])
                           for i in range(3)]) for k in ("chosen", "rejected")}
    offsets = torch.tensor(OFFSETS)[:, None]
    worst = {k: (v - offsets).min(0).values for k, v in raw.items()}
    assert m["pairwise_accuracy"] == pytest.approx(M.pairwise_accuracy(worst["chosen"], worst["rejected"]))
    assert m["ensemble_size"] == 3.0
    for i in range(3):  # each member as `eval reward` reports it alone
        alone = evaluate_reward_model(cfg, ens / f"member_{i}", tmp_path / f"member_{i}")
        for key in ("pairwise_accuracy", "pairwise_loss", "pairwise_margin_mean", "roc_auc"):
            assert m[f"member_{i}.{key}"] == pytest.approx(alone[key], abs=1e-4)
    both = torch.cat([raw["chosen"], raw["rejected"]], 1) - offsets
    assert m["pairwise_disagreement"] == pytest.approx(float(both.std(0, unbiased=False).mean()), abs=1e-4)
    saved = json.loads((tmp_path / "ens" / "reward_eval.json").read_text())
    assert [p["chosen"] for p in saved["scores"]["pairwise"]] == pytest.approx(worst["chosen"].tolist(), abs=1e-4)


def test_policy_evaluation_scores_with_the_members_aggregate(dirs):
    from perl_core.eval.policy import rm_scores

    _, ens = dirs
    scorer = load_reward_scorer(ens, aggregation="mean_minus_std", lam=2.0)
    responses = RESPONSES[:5] + [""]  # generated text may be empty
    got = rm_scores(scorer, PROMPTS[:6], responses)
    raw = np.stack([rm_scores(RewardScorer.load(ens / f"member_{i}"), PROMPTS[:6], responses) for i in range(3)])
    centred = raw - np.array(OFFSETS)[:, None]
    assert got == pytest.approx(centred.mean(0) - 2.0 * centred.std(0), abs=1e-4)


def test_serving_an_ensemble_returns_the_aggregate_and_the_spread(dirs):
    import pandas as pd

    from flows import registry
    from flows.mlflow_model import PerlModel

    _, ens = dirs
    model = PerlModel()
    model.load_context(SimpleNamespace(artifacts={"model": str(ens)}, model_config={}))
    frame = pd.DataFrame({"prompt": PROMPTS[:6], "response": RESPONSES})
    raw = torch.stack([RewardScorer.load(ens / f"member_{i}").score(PROMPTS[:6], RESPONSES) for i in range(3)])
    centred = raw - torch.tensor(OFFSETS)[:, None]
    out = model.predict(None, frame)
    assert list(out.columns) == ["score", "member_std"]
    assert out["score"].tolist() == pytest.approx(centred.min(0).values.tolist(), abs=1e-4)  # the default: min
    assert out["member_std"].tolist() == pytest.approx(centred.std(0, unbiased=False).tolist(), abs=1e-4)
    mean = model.predict(None, frame, params={"aggregation": "mean"})
    assert mean["score"].tolist() == pytest.approx(centred.mean(0).tolist(), abs=1e-4)
    signature = registry._signature(ENSEMBLE_KIND, {})
    assert signature.outputs.input_names() == ["score", "member_std"]
    assert [p.name for p in signature.params.params] == ["aggregation", "ensemble_lambda"]


# ---------------------------------------------------------------- training
def pairwise_rows(n, offset=0):
    drinks, sizes = ["latte", "espresso", "mocha", "chai"], ["small", "large"]
    rows = []
    for i in range(offset, offset + n):
        drink, size = drinks[i % 4], sizes[(i // 4) % 2]
        rows.append({"prompt": f"Customer: a {size} {drink} please\nAgent:",
                     "chosen": f" Sure, one {size} {drink} coming up.",
                     "rejected": " No." if i % 2 else f" We do not sell {drink}, sorry."})
    return rows


@pytest.fixture
def train_rows(monkeypatch):
    store = {"train": pairwise_rows(32), "validation": pairwise_rows(10, offset=100)}
    monkeypatch.setattr(data_api, "load_rows", lambda cfg, view, split: store[split])
    monkeypatch.setattr(data_api, "corpus", lambda cfg: [r["prompt"] + r["chosen"] + r["rejected"]
                                                         for r in store["train"]])
    return store


def micro_cfg(tmp_path, *extra):
    return build_config({}, ["reward.backbone.name=scratch:llama-micro", "reward.backbone.vocab_size=512",
                             f"artifacts_dir={tmp_path / 'artifacts'}", "reward.train.max_steps=3",
                             "reward.train.batch_size=8", "reward.train.eval_every=3", "reward.train.checkpoint_every=3",
                             "reward.train.learning_rate=0.01", "reward.max_length=64", "reward.lora.rank=4", *extra])


def test_an_ensemble_of_one_is_the_single_reward_model(tmp_path, train_rows):
    cfg = micro_cfg(tmp_path, "reward.ensemble.size=1")
    single = train_reward_model(cfg, tmp_path / "single")
    ens = train_reward_stage(cfg, tmp_path / "ens")  # the stage trains an ensemble because size is set
    manifest = json.loads((tmp_path / "ens" / "manifest.json").read_text())
    assert manifest["kind"] == ENSEMBLE_KIND and [m["folder"] for m in manifest["members"]] == ["member_0"]
    a = load_file(str(tmp_path / "single" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ens" / "member_0" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same weights, bit for bit
    for key in ("pairwise_accuracy", "loss"):
        assert ens.metrics[f"validation/{key}"] == pytest.approx(single.metrics[f"validation/{key}"], abs=1e-5)
    assert ens.metrics["validation/disagreement"] == 0.0
    val = train_rows["validation"]
    prompts, responses = [r["prompt"] for r in val], [r["chosen"] for r in val]
    lone = RewardScorer.load(tmp_path / "single").score(prompts, responses)
    offset = manifest["members"][0]["offset"]
    # the offset is the member's mean validation score, the only difference from the single reward model
    both = RewardScorer.load(tmp_path / "single").score(prompts * 2, responses + [r["rejected"] for r in val])
    assert offset == pytest.approx(float(both.mean()), abs=1e-5)
    for how in ("mean", "min", "mean_minus_std"):
        got = load_reward_scorer(tmp_path / "ens", aggregation=how).score(prompts, responses)
        torch.testing.assert_close(got, lone - offset, atol=1e-5, rtol=1e-5)

    # RL: the same policy updates as with the single reward model (normalisation and RLOO's leave-one-out
    # baseline both remove the offset)
    anchor = Path(manifest["base_model"])
    pcfg = policy_cfg()
    rows = {}
    for name, build, rm in (("single", build_roles, tmp_path / "single"), ("ens", build_ensemble_roles, tmp_path / "ens")):
        roles = build(pcfg, anchor, rm)
        rows[name] = []
        rl_loop(roles, roles.tokenizer, [r["prompt"] for r in val], pcfg, callback=collect(rows[name]))
    for (_, s), (_, e) in zip(rows["single"], rows["ens"]):
        for key in ("rl/advantage_std", "rl/grad_norm", "rl/kl", "rl/entropy"):
            assert e[key] == pytest.approx(s[key], rel=1e-5, abs=1e-7), key
        # a mean of terms ~ A * sum log pi that cancel to a small number: float32 rounding, not a difference
        assert e["rl/policy_loss"] == pytest.approx(s["rl/policy_loss"], abs=1e-5)
        assert e["rl/reward"] == pytest.approx(s["rl/reward"] - offset, abs=1e-4)


def test_ensemble_training_bootstrap_metrics_and_resume(tmp_path, train_rows):
    cfg = micro_cfg(tmp_path, "reward.ensemble.size=2", "reward.ensemble.bootstrap=true")
    seen = []
    result = train_reward_ensemble(cfg, tmp_path / "ens", callback=collect(seen))
    out = tmp_path / "ens"
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(m["folder"], m["seed"], m["bootstrap"]) for m in manifest["members"]] == \
        [("member_0", 0, True), ("member_1", 1, True)]
    assert not (out / "member_0" / "checkpoints").exists()  # a finished member needs none
    # each member's metrics under its own name, on one step axis
    assert [step for step, m in seen if "member_0/train/loss" in m] == [1, 2, 3]
    assert [step for step, m in seen if "member_1/train/loss" in m] == [4, 5, 6]
    # bootstrap: the members saw different data, so they differ
    a = load_file(str(out / "member_0" / "adapter_model.safetensors"))
    b = load_file(str(out / "member_1" / "adapter_model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # metrics recomputed from the saved members: each member's accuracy, the mean's, the disagreement
    from perl_core import metrics as M

    val = train_rows["validation"]
    prompts = [r["prompt"] for r in val]
    scorer = load_reward_scorer(out, aggregation="mean")
    raw = {k: scorer.member_scores(prompts, [r[k] for r in val]) for k in ("chosen", "rejected")}
    offsets = torch.tensor([m["offset"] for m in manifest["members"]])
    torch.testing.assert_close(offsets, torch.cat([raw["chosen"], raw["rejected"]], 1).mean(1), atol=1e-5, rtol=1e-5)
    for i in range(2):
        assert result.metrics[f"validation/member_{i}/pairwise_accuracy"] == pytest.approx(
            M.pairwise_accuracy(raw["chosen"][i], raw["rejected"][i]))
    mean = {k: (v - offsets[:, None]).mean(0) for k, v in raw.items()}
    assert result.metrics["validation/pairwise_accuracy"] == pytest.approx(
        M.pairwise_accuracy(mean["chosen"], mean["rejected"]))
    both = torch.cat([raw["chosen"], raw["rejected"]], 1) - offsets[:, None]
    assert result.metrics["validation/disagreement"] == pytest.approx(float(both.std(0, unbiased=False).mean()),
                                                                      abs=1e-5)
    assert result.metrics["trainable_params"] == 2 * json.loads(
        (out / "member_0" / "manifest.json").read_text())["metrics"]["trainable_params"]
    # resume keeps finished members as they are
    again = []
    train_reward_ensemble(cfg, out, callback=collect(again), resume=True)
    assert again == [] and load_file(str(out / "member_1" / "adapter_model.safetensors")).keys() == b.keys()
    assert all(torch.equal(v, b[k]) for k, v in load_file(str(out / "member_1" / "adapter_model.safetensors")).items())


def test_train_reward_ensemble_needs_a_size(tmp_path, train_rows):
    with pytest.raises(ConfigError, match="reward.ensemble.size is not set"):
        train_reward_ensemble(micro_cfg(tmp_path), tmp_path / "ens")


# ---------------------------------------------------------------- the over-optimisation benchmark
def load_benchmark():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "ensemble_overopt.py"
    spec = importlib.util.spec_from_file_location("ensemble_overopt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_label_noise_flips_a_seeded_fraction_of_preferences():
    bench = load_benchmark()
    rows = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(8)]
    noisy = bench.flip_labels(rows, 0.25, seed=0)
    flipped = [i for i, (a, b) in enumerate(zip(rows, noisy)) if a != b]
    assert len(flipped) == 2 and noisy == bench.flip_labels(rows, 0.25, seed=0)
    assert all(noisy[i] == {"prompt": f"p{i}", "chosen": f"bad {i}", "rejected": f"good {i}"} for i in flipped)
    points = [{"prompt": "p", "response": "r", "label": i % 2} for i in range(4)]
    assert sum(a["label"] != b["label"] for a, b in zip(points, bench.flip_labels(points, 0.5, seed=1))) == 2
    assert bench.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_peak_and_final_gold_windows():
    from perl_core.config import PerlConfig

    bench = load_benchmark()
    steps, gold = [1, 2, 3, 4, 5, 6], [0.1, 0.5, 0.7, 0.6, 0.2, 0.4]
    peak = bench.window_gold(steps, gold, 2, PerlConfig(), "peak")  # steps 3-4: mean 0.65, the best pair
    final = bench.window_gold(steps, gold, 2, PerlConfig(), "final")
    assert (peak["first_step"], peak["last_step"]) == (3, 4) and peak["mean"] == pytest.approx(0.65)
    assert (final["first_step"], final["last_step"]) == (5, 6) and final["mean"] == pytest.approx(0.3)
    # bootstrap over two values: every resampled mean lies between them
    assert 0.6 <= peak["ci_low"] <= peak["ci_high"] <= 0.7 and 0.2 <= final["ci_low"] <= final["ci_high"] <= 0.4
    assert bench.window_gold(steps, gold, 50, PerlConfig(), "peak")["mean"] == pytest.approx(sum(gold) / 6)


def test_overopt_benchmark_quick_writes_gold_and_proxy_per_step(tmp_path):
    bench = load_benchmark()
    out = tmp_path / "overopt.json"
    bench.main(["--quick", "--work-dir", str(tmp_path / "work"), "--out", str(out), "--cost-steps", "2",
                "--set", f"data.data_dir={tmp_path / 'data'}", "--set", f"artifacts_dir={tmp_path / 'artifacts'}"])
    report = json.loads(out.read_text())
    for run in report["runs"].values():  # the final policy evaluated on held-out prompts by the gold oracle
        held = run["heldout"]
        assert held["gold_gain_ci_low"] <= held["gold_gain"] <= held["gold_gain_ci_high"]
        assert held["gold_gain"] == pytest.approx(held["gold_score_mean"] - held["anchor_gold_score_mean"])
        assert run["gold_final"]["last_step"] == 2
    cost = report["cost"]  # the 2-member ensemble's adapters share member 0's backbone
    assert cost["ensemble"]["resident_params"] > cost["single"]["resident_params"]
    assert cost["ensemble_over_single"]["resident_params"] < 1.1
    assert list(report["runs"]) == ["single", "mean", "min", "mean_minus_std"] and report["members"] == 2
    for name, run in report["runs"].items():
        assert run["step"] == [1, 2]
        # the oracle's score is recorded at every step (a missing one is None)
        assert all(isinstance(v, float) and math.isfinite(v) for v in run["gold"] + run["proxy"])
        assert (run["member_std"] == [None, None]) == (name == "single")
    assert report["runs"]["single"]["reward_model"].endswith("member_0")
    # the single run's proxy on the ensemble's scale: member 0's raw reward less its offset
    raw = [json.loads(line)["rl/reward"] for line in (tmp_path / "work" / "policy_single" / "steps.jsonl").open()]
    offset = json.loads((tmp_path / "work" / "reward_ensemble" / "manifest.json").read_text())["members"][0]["offset"]
    assert report["runs"]["single"]["proxy"] == pytest.approx([r - offset for r in raw])
    assert "validation/member_1/pairwise_accuracy" in report["reward_models"]["validation"]
    assert Path(report["plot"]).stat().st_size > 1000
    # a second run reuses every stage: the curves come back from the step logs, not from new training
    again = bench.main(["--quick", "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "again.json"),
                        "--set", f"data.data_dir={tmp_path / 'data'}", "--set", f"artifacts_dir={tmp_path / 'artifacts'}",
                        "--settings", "min"])
    assert again["runs"]["min"]["gold"] == report["runs"]["min"]["gold"]


def test_cli_reward_score_on_an_ensemble_adds_the_members_spread(dirs, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    _, ens = dirs
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": p, "response": r}) for p, r in zip(PROMPTS[:3], RESPONSES)))
    result = CliRunner().invoke(app, ["reward", "score", "--model", str(ens), "--jsonl", str(rows)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    raw = torch.stack([RewardScorer.load(ens / f"member_{i}").score(PROMPTS[:3], RESPONSES[:3]) for i in range(3)])
    centred = raw - torch.tensor(OFFSETS)[:, None]
    assert [x["reward"] for x in lines] == pytest.approx(centred.min(0).values.tolist(), abs=1e-4)
    assert [x["member_std"] for x in lines] == pytest.approx(centred.std(0, unbiased=False).tolist(), abs=1e-4)
    with pytest.raises(ConfigError, match="ensemble aggregation 'median'"):
        load_reward_scorer(ens, aggregation="median")
