"""One optimisation step of SFT, the reward model and RL, run by tests/test_ddp.py in one process
(`python tests/ddp_worker.py OUT`) and under `accelerate launch --num_processes 2 --cpu`.

Besides the artifacts under OUT/artifacts, every process writes OUT/probe/rank-<r>.json: the
batches it was handed and its shard of each (`parallel.shard`), what it opened for writing,
created, renamed or removed under OUT/artifacts (an audit hook), and the RL update's gradient on
a fixed set of samples (rloo, and grpo's second update pass). With PERL_TEST_RESUME set it also
trains the reward model and the policy for 2 steps straight, and for 1 step then resumed to 2,
under OUT/artifacts/resume.
"""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

OUT = Path(sys.argv[1]).resolve()
ARTIFACTS = OUT / "artifacts"
writes: list[str] = []


def audit(event: str, args: tuple) -> None:
    """Record every write under ARTIFACTS: opens for writing, mkdir, rename, remove, rmtree."""
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if not writing:
            return
    elif event not in ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree"):
        return
    if args and isinstance(args[0], (str, bytes, os.PathLike)) and str(os.fsdecode(args[0])).startswith(str(ARTIFACTS)):
        writes.append(f"{event} {os.fsdecode(args[0])}")


sys.addaudithook(audit)

import torch  # noqa: E402

import perl_core.data  # noqa: E402
from perl_core import parallel  # noqa: E402
from perl_core.config import build_config  # noqa: E402
from perl_core.policy import generation, rl  # noqa: E402
from perl_core.policy.stage import train_policy  # noqa: E402
from perl_core.reward.train import train_reward_model  # noqa: E402
from perl_core.sft import train_anchor  # noqa: E402

DRINKS = ["latte", "espresso", "cappuccino", "mocha", "flat white", "cold brew", "americano", "chai"]
SFT = [{"prompt": f"Customer: a {s} {d}" + " please" * (i % 3) + "\nAgent:", "response": f" One {s} {d}" + ", hot" * (i % 4) + "."}
       for i, (s, d) in enumerate((s, d) for s in ("small", "large") for d in DRINKS)]
PAIRS = [{"prompt": f"Customer at table {i}: a {d} please" + " thanks" * (i % 4) + "\nAgent:", "chosen": f" Sure, one {d} coming up.",
          "rejected": " No." if i % 2 else f" We do not sell {d}, sorry, we are closed today."}
         for i, d in enumerate(DRINKS * 2)]
ROWS = {"sft": {"train": SFT[:12], "validation": SFT[12:]}, "pairwise": {"train": PAIRS[:12], "validation": PAIRS[12:]}}

perl_core.data.load_rows = lambda cfg, view, split: ROWS[view][split]
perl_core.data.corpus = lambda cfg: [r["prompt"] + r["response"] for r in SFT] + [r["chosen"] + r["rejected"] for r in PAIRS]
perl_core.data.load_prompts = lambda cfg, split: [r["prompt"] for r in SFT]
import perl_core.data.versioning  # noqa: E402

perl_core.data.versioning.recorded_version = lambda: {"md5": "test"}

seen: list[dict] = []
resumed_steps: dict[str, int] = {}
_shard = parallel.shard


def recording_shard(rows):
    mine = _shard(rows)
    seen.append({"batch": [repr(r) for r in rows], "shard": [repr(r) for r in mine]})
    return mine


parallel.shard = recording_shard

cfg = build_config({"artifacts_dir": str(ARTIFACTS), "sft": {
    "backbone": {"name": "scratch:llama-micro", "vocab_size": 300}, "tuning": "full",
    "train": {"batch_size": 8, "max_steps": 1, "learning_rate": 0.01, "warmup_ratio": 0.0}}}, [
    "reward.train.batch_size=8", "reward.train.max_steps=1", "reward.train.learning_rate=0.01",
    "reward.train.warmup_ratio=0.0", "reward.max_length=96", "reward.init_from_anchor=true",
    "policy.k=2", "policy.train.batch_size=2", "policy.train.max_steps=1", "policy.generation.max_new_tokens=4",
    "policy.train.warmup_ratio=0.0"])

train_anchor(cfg, ARTIFACTS / "anchor")
train_reward_model(cfg, ARTIFACTS / "reward_model", base_model=str(ARTIFACTS / "anchor"))

# RL on one fixed set of samples: every process scores and updates the rows of its shard of them
# (in one process, all of them), so the update's gradient can be compared across launches
fixed: dict = {}
_sample = generation.sample_responses  # what rl_loop's HFSampler calls


def fixed_samples(model, tokenizer, prompt_ids, **kwargs):
    if "all" not in fixed:
        torch.manual_seed(0)
        everything = _sample(model, tokenizer, fixed["prompt_ids"], **kwargs)
        fixed["all"] = everything
    everything, n = fixed["all"], len(prompt_ids)
    start = parallel.rank() * n
    return rl.sample_rows(everything, slice(start, start + n))


gradients: dict = {}
_step = rl.optimizer_step


def recording_step(model, optimizer, *args, **kwargs):
    gradients.update({n: p.grad.tolist() for n, p in model.named_parameters() if p.grad is not None})
    return _step(model, optimizer, *args, **kwargs)


rl.optimizer_step = recording_step
generation.sample_responses = fixed_samples
from perl_core.modeling import prompts_within, load_tokenizer  # noqa: E402

tokenizer = load_tokenizer(str(ARTIFACTS / "anchor"), padding_side="left")
batch = rl.prompt_batches(len(SFT), 2, cfg.policy.train.seed, 0)
encoded = prompts_within(tokenizer, [r["prompt"] for r in SFT], cfg.policy.max_prompt_length)
fixed["prompt_ids"] = [encoded[i][1] for i in batch for _ in range(cfg.policy.k)]
train_policy(cfg, ARTIFACTS / "policy", ARTIFACTS / "anchor", ARTIFACTS / "reward_model")
rl_gradient = dict(gradients)
# GRPO on the same samples: the dapo loss's token count spans both processes' shards, and the gradient
# recorded last is the second update pass's (after the first pass's step, under the clipped ratio)
gradients.clear()
grpo = build_config(cfg.model_dump(mode="json"), ["policy.algorithm=grpo", "policy.loss_type=dapo",
                                                  "policy.train.updates_per_batch=2", "policy.kl_in=loss"])
train_policy(grpo, ARTIFACTS / "policy_grpo", ARTIFACTS / "anchor", ARTIFACTS / "reward_model")
grpo_gradient = dict(gradients)

if os.environ.get("PERL_TEST_RESUME"):
    # resume under N processes: a run stopped after step 1 and resumed to step 2 ends where a straight
    # 2-step run ends (fresh sampling again: each process draws from its own seeded stream)
    generation.sample_responses, rl.optimizer_step = _sample, _step

    def steps(n: int):  # a constant learning rate: a linear decay would differ between 1 and 2 planned steps
        return build_config(cfg.model_dump(mode="json"), [
            f"reward.train.max_steps={n}", "reward.train.checkpoint_every=1", "reward.train.eval_every=1",
            "reward.train.schedule=constant", f"policy.train.max_steps={n}", "policy.train.checkpoint_every=1",
            "policy.train.schedule=constant"])

    def counting(stage: str):  # how many steps the resumed run itself trained
        def callback(metrics: dict, step: int) -> None:
            if any(name.endswith("step_seconds") for name in metrics):
                resumed_steps[stage] = resumed_steps.get(stage, 0) + 1
        return callback

    anchor = str(ARTIFACTS / "anchor")
    train_reward_model(steps(2), ARTIFACTS / "resume" / "rm_straight", base_model=anchor)
    train_reward_model(steps(1), ARTIFACTS / "resume" / "rm_resumed", base_model=anchor)
    train_reward_model(steps(2), ARTIFACTS / "resume" / "rm_resumed", base_model=anchor, resume=True,
                       callback=counting("rm"))
    rm = ARTIFACTS / "reward_model"
    train_policy(steps(2), ARTIFACTS / "resume" / "policy_straight", anchor, rm)
    train_policy(steps(1), ARTIFACTS / "resume" / "policy_resumed", anchor, rm)
    train_policy(steps(2), ARTIFACTS / "resume" / "policy_resumed", anchor, rm, resume=True, callback=counting("policy"))

probe = OUT / "probe"
probe.mkdir(parents=True, exist_ok=True)
(probe / f"rank-{parallel.rank()}.json").write_text(json.dumps(
    {"world": parallel.world_size(), "seen": seen, "writes": writes, "rl_gradient": rl_gradient, "grpo_gradient": grpo_gradient,
     "resumed_steps": resumed_steps}))
