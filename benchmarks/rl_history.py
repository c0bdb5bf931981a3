"""rl_loop's metric history, timings left out, for seven settings, as JSON: a refactor of RL must leave it unchanged.

rloo, micro-batched rloo, reinforce (moving-average baseline + adaptive KL), reinforce with a value head, grpo (dapo,
mu = 2), grpo (k3 in the loss, micro-batched) and a reward list, 3 steps each on a random llama-micro anchor with a
stand-in reward model (tests/stand_ins.py). Seeded: the same code gives the same bytes.

    python benchmarks/rl_history.py before.json /tmp/rl-history     # on the old commit
    python benchmarks/rl_history.py after.json /tmp/rl-history      # on the new one
    cmp before.json after.json
"""
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import torch  # noqa: E402
from perl_core.artifacts import write_manifest  # noqa: E402
from perl_core.callbacks import collect  # noqa: E402
from perl_core.config import build_config  # noqa: E402
from perl_core.modeling import build_scratch_backbone  # noqa: E402
from perl_core.policy.rl import rl_loop  # noqa: E402
from perl_core.policy.roles import build_roles  # noqa: E402
from stand_ins import stand_in_reward_model  # noqa: E402

torch.set_num_threads(1)
PROMPTS = [f"Customer: a {s} {d} with {m} milk please\nAgent:" for s in ("small", "large", "medium")
           for d in ("latte", "mocha") for m in ("oat", "soy")]
CORPUS = PROMPTS + [p + " Sure, one coffee coming up." for p in PROMPTS]
root = Path(sys.argv[2])
root.mkdir(parents=True, exist_ok=True)
anchor = root / "anchor"
if not (anchor / "manifest.json").exists():
    build_scratch_backbone("llama-micro", CORPUS, anchor, vocab_size=300)
    write_manifest(anchor, kind="anchor", base_model=str(anchor), tuning="none", config={})
rm = root / "rm"
if not (rm / "manifest.json").exists():
    stand_in_reward_model(anchor, rm)
BASE = {"algorithm": "rloo", "k": 2, "lora": {"rank": 4}, "kl_coef": 0.05,
        "generation": {"max_new_tokens": 6, "temperature": 1.0},
        "train": {"batch_size": 3, "max_steps": 3, "checkpoint_every": 2, "learning_rate": 0.02, "warmup_ratio": 0.0}}
def merge(a, b):
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return out
SETTINGS = {
    "rloo": {},
    "rloo_micro": {"train": {"micro_batch_size": 2}},
    "reinforce_ma": {"algorithm": "reinforce", "adaptive_kl": True},
    "reinforce_value": {"algorithm": "reinforce", "baseline": "value_head"},
    "grpo_dapo_mu2": {"algorithm": "grpo", "loss_type": "dapo", "train": {"updates_per_batch": 2}},
    "grpo_kl_loss": {"algorithm": "grpo", "loss_type": "grpo", "kl_in": "loss", "train": {"micro_batch_size": 2}},
    "rloo_rewards": {"rewards": [{"weight": 1.0}, {"function": "perl_core.policy.rewards:length_penalty", "weight": 0.1}]},
}
out = {}
for name, over in SETTINGS.items():
    cfg = build_config({"policy": merge(BASE, over)}).policy
    roles = build_roles(cfg, anchor, rm, sample_texts=PROMPTS)
    rows = []
    shutil.rmtree(root / f"checkpoints-{name}", ignore_errors=True)
    rl_loop(roles, roles.tokenizer, PROMPTS, cfg, callback=collect(rows), checkpoint_dir=root / f"checkpoints-{name}",
            gold_score=lambda p, r: len(r) / 100)
    out[name] = [[step, {k: v for k, v in metrics.items() if "seconds" not in k and "per_second" not in k}]
                 for step, metrics in rows]
    print(name, "ok", flush=True)
Path(sys.argv[1]).write_text(json.dumps(out, indent=1, sort_keys=True))
