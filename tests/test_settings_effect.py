"""Every training setting of every stage either changes what the stage does or is refused with a message.

`CHECKS` maps each field of `sft.train` and `reward.train` (TrainConfig) and `policy.train`
(PolicyTrainConfig) to the check that proves its effect; a field without a check fails
`test_every_training_setting_has_a_check`, so a new setting cannot be silently ignored. Each
check runs the real stage (`train_anchor`, `train_reward_model`, `train_policy`) for two steps on
llama-micro, once as `BASE` and once with the setting changed, and compares what a user could see:
logged metrics, checkpoints, the trained weights, and probes on the model (the rows of each
training forward, the dtype of an attention projection's output, how often a layer ran).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch

import perl_core.data
from stand_ins import stand_in_reward_model
from perl_core.reward import train as reward_mod
from perl_core.policy import stage as stage_mod
from perl_core import sft as sft_mod
from perl_core.artifacts import write_manifest
from perl_core.config import ConfigError, LoraConfig, PolicyTrainConfig, TrainConfig, build_config
from perl_core.errors import UserError

PROMPTS = [f"Customer: a {s} {d} with {m} milk please\nAgent:" for s in ("small", "large", "medium")
           for d in ("latte", "mocha") for m in ("oat", "soy")]
SFT_ROWS = [{"prompt": p, "response": " Sure, one coffee coming up."} for p in PROMPTS]
PAIRS = [{"prompt": p, "chosen": " Sure, one coffee coming up.", "rejected": " No." if i % 2 else " We are closed."}
         for i, p in enumerate(PROMPTS)]
CORPUS = [r["prompt"] + r["chosen"] + r["rejected"] for r in PAIRS]

# two optimizer steps, nothing on top: each check changes one setting from here
BASE = {"learning_rate": 0.01, "batch_size": 4, "max_steps": 2, "warmup_ratio": 0.0, "eval_every": 100,
        "checkpoint_every": 100}
K = 2  # policy.k


# ---------------------------------------------------------------- what a run shows
class Probe:
    """Hooks on a model: rows of each training forward, output dtypes of one attention projection,
    how often that projection ran with gradients (a recomputed layer runs twice), input lengths."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.train_rows: list[int] = []
        self.grad_embeds = 0
        self.grad_projections = 0
        self.dtypes: set[torch.dtype] = set()
        self.no_grad_lengths: list[int] = []
        embed = model.get_input_embeddings()
        proj = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
        embed.register_forward_hook(self._embed)
        proj.register_forward_hook(self._proj)
        self.before = self.trainable()

    def _embed(self, module, args, output):
        if torch.is_grad_enabled():
            self.grad_embeds += 1
            self.train_rows.append(args[0].shape[0])
        else:
            self.no_grad_lengths.append(args[0].shape[1])

    def _proj(self, module, args, output):
        self.dtypes.add(output.dtype)
        if torch.is_grad_enabled():
            self.grad_projections += 1

    def trainable(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().float().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    @property
    def checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) is True for m in self.model.modules())


@dataclass
class Run:
    metrics: dict[str, Any]
    history: list[tuple[int, dict]]
    probe: Probe
    after: dict[str, torch.Tensor]
    checkpoints: list[str]
    error: Optional[Exception] = None

    def logged(self, name: str) -> list[tuple[int, float]]:
        return [(step, m[name]) for step, m in self.history if name in m]

    def moved(self) -> float:
        """How far training moved the trainable weights (L2 over all of them)."""
        return math.sqrt(sum(float((self.after[n] - self.probe.before[n]).pow(2).sum()) for n in self.after))


def _record(loop: Callable, model_of: Callable, probes: list):
    """Wrap a stage's training loop so the model it trains carries a Probe."""
    def wrapped(*args, **kwargs):
        probe = Probe(model_of(*args))
        probes.append(probe)
        out = loop(*args, **kwargs)
        probe.after = probe.trainable()
        return out
    return wrapped


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("settings")
    from perl_core.modeling import build_scratch_backbone

    anchor = build_scratch_backbone("llama-micro", CORPUS, root / "anchor", vocab_size=300)
    write_manifest(anchor, kind="anchor", base_model=str(anchor), tuning="none", config={})
    stand_in_reward_model(anchor, root / "rm", LoraConfig(rank=4))
    return root


_RUNS: dict[tuple, Run] = {}


def run_stage(stage: str, root: Path, patches: tuple = (), policy: tuple = (), **train) -> Run:
    """Run `stage` with BASE + `train` (and `policy`'s (key, value) pairs in the policy section); a refused
    setting comes back as `Run.error`. Cached: checks share runs."""
    key = (stage, tuple(sorted(train.items())), patches, policy)
    if key in _RUNS:
        return _RUNS[key]
    settings = BASE | train
    if stage == "policy" and "eval_every" not in train:
        settings.pop("eval_every")  # not a setting of RL (check_eval_every)
    out = root / f"{stage}-{len(_RUNS)}"
    backbone = {"name": "scratch:llama-micro", "vocab_size": 300}
    trees = {
        "sft": {"sft": {"backbone": backbone, "train": settings}},
        "reward": {"reward": {"backbone": backbone, "lora": {"rank": 4}, "max_length": 64, "init_from_anchor": False,
                              "train": settings}},
        "policy": {"policy": {"k": K, "lora": {"rank": 4}, "generation": {"max_new_tokens": 4}, "train": settings,
                              **dict(policy)}},
    }
    rows = {"sft": SFT_ROWS, "pairwise": PAIRS}
    history: list[tuple[int, dict]] = []
    probes: list[Probe] = []
    metrics, error = {}, None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(perl_core.data, "corpus", lambda cfg: CORPUS, raising=False)
        mp.setattr(perl_core.data, "load_rows", lambda cfg, view, split:
                   rows[view][:8] if split == "train" else rows[view][8:], raising=False)
        mp.setattr(perl_core.data, "load_prompts", lambda cfg, split: PROMPTS, raising=False)
        mp.setattr(perl_core.data.versioning, "recorded_version", lambda: {"md5": "test"})
        mp.setattr(sft_mod, "train_loop", _record(sft_mod.train_loop, lambda model, *a: model, probes))
        mp.setattr(reward_mod, "train_loop", _record(reward_mod.train_loop, lambda model, *a: model, probes))
        mp.setattr(stage_mod, "rl_loop", _record(stage_mod.rl_loop, lambda roles, *a: roles.policy, probes))
        for target, name, value in patches:
            mp.setattr(target, name, value)
        callback = lambda metrics, step: history.append((step, metrics))  # noqa: E731
        try:
            cfg = build_config({"artifacts_dir": str(root / "artifacts"), "data": {"source": "local"},
                                **trees[stage]})
            if stage == "sft":
                metrics = sft_mod.train_anchor(cfg, out, callback=callback).metrics
            elif stage == "reward":
                metrics = reward_mod.train_reward_model(cfg, out, callback=callback).metrics
            else:
                metrics = stage_mod.train_policy(cfg, out, root / "anchor", root / "rm", callback=callback).metrics
        except (UserError, ConfigError) as err:
            error = err
    probe = probes[0] if probes else None
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    _RUNS[key] = Run(metrics, history, probe, getattr(probe, "after", {}), checkpoints, error)
    return _RUNS[key]


# ---------------------------------------------------------------- the checks, one per setting
LR = {"sft": "train/lr", "reward": "train/lr", "policy": "rl/lr"}
# forward rows per example of a batch: a preference pair, and a prompt's K samples, are one packed row each
# (perl_core.packing: the shared prompt computed once)
ROWS = {"sft": 1, "reward": 1, "policy": 1}
EVAL = {"sft": "eval/loss", "reward": "eval/pairwise_accuracy"}


def lrs(run: Run, stage: str) -> list[float]:
    return [v for _, v in run.logged(LR[stage])]


def check_learning_rate(stage, root):
    base, changed = run_stage(stage, root), run_stage(stage, root, learning_rate=0.03)
    assert lrs(changed, stage) == pytest.approx([3 * v for v in lrs(base, stage)]) and lrs(base, stage)
    assert changed.moved() > base.moved()


def check_weight_decay(stage, root):
    base, changed = run_stage(stage, root), run_stage(stage, root, weight_decay=0.5)

    def norm(run):
        return math.sqrt(sum(float(t.pow(2).sum()) for t in run.after.values()))

    assert norm(changed) < norm(base)  # AdamW's decoupled decay pulls every trained weight toward zero


def check_batch_size(stage, root):
    base, changed = run_stage(stage, root), run_stage(stage, root, batch_size=2)
    assert set(base.probe.train_rows) == {4 * ROWS[stage]} and set(changed.probe.train_rows) == {2 * ROWS[stage]}


def check_grad_accum(stage, root):
    changed = run_stage(stage, root, grad_accum=2)
    if stage == "policy":
        assert isinstance(changed.error, ConfigError) and "policy.train.grad_accum must be 1" in str(changed.error)
        return
    base = run_stage(stage, root)
    assert (base.probe.grad_embeds, changed.probe.grad_embeds) == (2, 4)  # training forwards in 2 steps


def check_max_steps(stage, root):
    base, changed = run_stage(stage, root), run_stage(stage, root, max_steps=3)
    assert [s for s, _ in base.logged(LR[stage])] == [1, 2]
    assert [s for s, _ in changed.logged(LR[stage])] == [1, 2, 3]


def check_warmup_ratio(stage, root):
    base, changed = run_stage(stage, root), run_stage(stage, root, warmup_ratio=0.5)
    # the lr logged after step s is the next step's: linear decay over 2 steps gives 0.5 x lr after step 1;
    # one warm-up step (0.5 x 2) moves the decay's start one step later, so after step 1 it is the full lr
    assert lrs(base, stage) == pytest.approx([0.005, 0.0])
    assert lrs(changed, stage) == pytest.approx([0.01, 0.0])


def check_schedule(stage, root):
    base, changed = run_stage(stage, root), run_stage(stage, root, schedule="constant")
    assert lrs(base, stage) == pytest.approx([0.005, 0.0]) and lrs(changed, stage) == pytest.approx([0.01, 0.01])


def check_max_grad_norm(stage, root):
    base, changed = run_stage(stage, root), run_stage(stage, root, max_grad_norm=1e-12)
    # clipped to a norm far below Adam's eps, the update all but vanishes
    assert changed.moved() < 1e-3 * base.moved()


def check_precision(stage, root):
    base, bf16 = run_stage(stage, root), run_stage(stage, root, precision="bf16")
    assert base.error is None and base.probe.dtypes == {torch.float32}  # auto: fp32 on a CPU
    assert bf16.error is None and bf16.probe.dtypes == {torch.bfloat16}  # every forward autocast, RL sampling too
    fp16 = run_stage(stage, root, precision="fp16")
    assert isinstance(fp16.error, UserError) and fp16.probe is None  # refused before any training
    assert f"{stage}.train.precision='fp16' needs a CUDA GPU" in str(fp16.error)


def check_gradient_checkpointing(stage, root):
    base, changed = run_stage(stage, root), run_stage(stage, root, gradient_checkpointing=True)
    assert not base.probe.checkpointing and base.probe.grad_projections == base.probe.grad_embeds
    # the backward pass runs every layer a second time (the embedding, outside the layers, once)
    assert changed.probe.checkpointing and changed.probe.grad_projections == 2 * changed.probe.grad_embeds > 0
    assert changed.moved() == pytest.approx(base.moved(), rel=1e-4)  # recomputing changes no gradient
    if stage == "policy":  # sampling still reads the KV cache: one new token per forward after the prompt
        decoded = changed.probe.no_grad_lengths.count(1)
        assert decoded == base.probe.no_grad_lengths.count(1) > 0


def check_eval_every(stage, root):
    changed = run_stage(stage, root, eval_every=1)
    if stage == "policy":
        assert isinstance(changed.error, ConfigError) and "policy.train.eval_every is not a setting" in str(changed.error)
        return
    base = run_stage(stage, root)
    assert [s for s, _ in base.logged(EVAL[stage])] == [2] and [s for s, _ in changed.logged(EVAL[stage])] == [1, 2]


def worsening(stage):
    """The stage's validation metric, made worse at every evaluation."""
    count = iter(range(1000))
    if stage == "sft":
        return ((sft_mod, "validation_loss", lambda *a: {"loss": 1.0 + next(count), "perplexity": 1.0}),)
    return ((reward_mod, "reward_metrics", lambda *a: {"pairwise_accuracy": 1.0 - 0.1 * next(count), "loss": 1.0}),)


def check_early_stopping_patience(stage, root):
    if stage == "policy":
        changed = run_stage(stage, root, early_stopping_patience=1)
        assert isinstance(changed.error, ConfigError)
        assert "policy.train.early_stopping_patience is not a setting" in str(changed.error)
        return
    base = run_stage(stage, root, worsening(stage), max_steps=4, eval_every=1)
    changed = run_stage(stage, root, worsening(stage), max_steps=4, eval_every=1, early_stopping_patience=1)
    assert base.metrics["steps"] == 4 and changed.metrics["steps"] == 2


def check_checkpoint_every(stage, root):
    base, changed = run_stage(stage, root), run_stage(stage, root, checkpoint_every=1)
    assert base.checkpoints == ["step-000002"] and changed.checkpoints == ["step-000001", "step-000002"]


def check_seed(stage, root):
    base, changed = run_stage(stage, root), run_stage(stage, root, seed=1)
    assert base.after.keys() == changed.after.keys()
    assert any(not torch.equal(base.after[n], changed.after[n]) for n in base.after)


def check_micro_batch_size(stage, root):
    base, changed = run_stage(stage, root), run_stage(stage, root, micro_batch_size=2)
    # one pass over 4 prompts x K samples (a packed row per prompt), against chunks of 2 samples (one
    # prompt's K = 2: one row)
    assert set(base.probe.train_rows) == {4} and set(changed.probe.train_rows) == {2 // K}


def check_updates_per_batch(stage, root):
    refused = run_stage(stage, root, updates_per_batch=2)  # rloo, the base: on-policy, one pass
    assert isinstance(refused.error, ConfigError) and "need policy.algorithm grpo" in str(refused.error)
    grpo = (("algorithm", "grpo"),)
    base, changed = run_stage(stage, root, policy=grpo), run_stage(stage, root, policy=grpo, updates_per_batch=2)
    # each batch's second pass runs the policy's forward again with gradients; the schedule still counts batches
    assert changed.probe.grad_embeds == 2 * base.probe.grad_embeds > 0
    assert lrs(changed, stage) == lrs(base, stage) and len(lrs(base, stage)) == BASE["max_steps"]
    assert changed.moved() != base.moved()


CHECKS: dict[str, Callable[[str, Path], None]] = {
    "learning_rate": check_learning_rate, "weight_decay": check_weight_decay, "batch_size": check_batch_size,
    "grad_accum": check_grad_accum, "max_steps": check_max_steps, "warmup_ratio": check_warmup_ratio,
    "schedule": check_schedule, "max_grad_norm": check_max_grad_norm, "precision": check_precision,
    "gradient_checkpointing": check_gradient_checkpointing, "eval_every": check_eval_every,
    "early_stopping_patience": check_early_stopping_patience, "checkpoint_every": check_checkpoint_every,
    "seed": check_seed, "micro_batch_size": check_micro_batch_size, "updates_per_batch": check_updates_per_batch,
}
SETTINGS = {"sft": TrainConfig, "reward": TrainConfig, "policy": PolicyTrainConfig}


def test_every_training_setting_has_a_check():
    for stage, section in SETTINGS.items():
        missing = sorted(set(section.model_fields) - set(CHECKS))
        assert not missing, f"{stage}.train settings with no check of their effect: {missing}"


@pytest.mark.parametrize("stage, setting", [(stage, name) for stage, section in SETTINGS.items()
                                            for name in section.model_fields])
def test_setting_has_its_effect(stage, setting, workdir):
    CHECKS[setting](stage, workdir)


@pytest.mark.parametrize("setting", ["eval_every", "early_stopping_patience"])
def test_policy_refuses_the_settings_it_has_no_use_for(setting, workdir):
    CHECKS[setting]("policy", workdir)
