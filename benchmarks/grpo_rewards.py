"""GRPO (dapo loss, mu = 2) against RLOO at equal samples, and the gold rubric against the learned
reward model and their mix, on the embedded default (synthetic task, scratch backbone).

    python benchmarks/grpo_rewards.py --seeds 0 1 2                 # every setting, three seeds
    python benchmarks/grpo_rewards.py --settings rloo grpo --seeds 0 1 2 --budget-s 540
    python benchmarks/grpo_rewards.py --set policy.train.max_steps=100

One anchor and one reward model (trained once into --work), then one RL run per (setting, seed),
each evaluated against the anchor on the same held-out prompts. Finished runs are kept in --work:
run the command again to continue (--budget-s stops between runs). A command line over
bench.grpo_rewards.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout's perl_core, installed or not

from bench.grpo_rewards import SETTINGS, grpo_rewards_benchmark  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "grpo_rewards.json"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default", help="preset or YAML path")
    p.add_argument("--set", action="append", default=[], help="config override for every run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="policy.train.seed of each run")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--work", default="artifacts/grpo_rewards", help="anchor, reward model, policies, run results")
    p.add_argument("--budget-s", type=float, default=None, help="start no run after this many seconds")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    report = grpo_rewards_benchmark(Path(args.work), args.seeds, args.settings, args.config, args.set,
                                    args.budget_s)
    print(json.dumps({k: report[k] for k in ("settings", "pairs")}, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
