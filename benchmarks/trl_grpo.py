"""Our GRPO against TRL's GRPOTrainer on identical work: same anchor, reward model, prompts, k,
lengths, dapo loss, mu update passes and batches, each side in a fresh process, in one run.

    python benchmarks/grpo_rewards.py --budget-s 0                   # trains the shared anchor and reward model
    python benchmarks/trl_grpo.py --work artifacts/grpo_rewards     # 12 batches of 8 prompts x k=4, mu=2
    python benchmarks/trl_grpo.py --work DIR --steps 20 --set policy.generation.max_new_tokens=16

Reports samples/s, peak memory above the imported libraries, and the trained policies' reward and
gold on held-out prompts, with the ratios ours / TRL's. A command line over bench.trl_grpo.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout's perl_core, installed or not

from bench.isolation import as_overrides  # noqa: E402
from bench.trl_grpo import grpo_comparison, grpo_overrides  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "trl_grpo.json"
KEYS = ("samples_per_second_wall", "train_seconds", "samples_per_second", "median_batch_seconds", "median_generate_seconds", "median_score_seconds",
        "median_update_seconds", "workload_peak_mb", "validation_rm_reward",
        "validation_gold_score", "trainable_params", "batches")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="artifacts/grpo_rewards", help="folder holding anchor/ and reward_model/")
    p.add_argument("--config", default="default", help="preset or YAML path (the prompts come from its data)")
    p.add_argument("--set", action="append", default=[], help="config override for both sides")
    p.add_argument("--steps", type=int, default=12, help="sampled batches (policy.train.max_steps)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch")
    p.add_argument("--k", type=int, default=4, help="samples per prompt")
    p.add_argument("--mu", type=int, default=2, help="update passes per batch (policy.train.updates_per_batch)")
    p.add_argument("--trl-first", action="store_true", help="run TRL's side first (the order's effect on a busy machine)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    from perl_core.config import load_config

    overrides = grpo_overrides(args.mu) + as_overrides({
        "policy.train.max_steps": args.steps, "policy.train.batch_size": args.batch_size, "policy.k": args.k}) + args.set
    config = load_config(args.config, overrides).model_dump(mode="json")
    work = Path(args.work)
    report = grpo_comparison(config, work / "anchor", work / "reward_model", trl_first=args.trl_first)
    report["command"] = "python benchmarks/trl_grpo.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for side in ("perl", "trl"):
        print(side, json.dumps({k: report[side].get(k) for k in KEYS}))
    print(f"throughput ours / TRL {report['throughput_ratio']:.2f}x (whole training call; median batch "
          f"{report['median_batch_throughput_ratio']:.2f}x), peak memory ours / TRL {report['memory_ratio']:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
