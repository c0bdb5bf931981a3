"""LoRA vs full-tuning reward models: same data, same backbone, each setting in a fresh process.

    python benchmarks/reward_efficiency.py                 # llama-small (~28M), synthetic pairs
    python benchmarks/reward_efficiency.py --quick         # llama-micro, a few steps: checks the table's shape
    python benchmarks/reward_efficiency.py --set reward.lora.rank=4 --steps 120

A command line over bench.reward (the measurement, its setting and its targets are
described there). Each setting trains the preset + the benchmark's measurement setting + your
--set and the options below, which win. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout's perl_core, installed or not

from bench.isolation import as_overrides  # noqa: E402
from bench.reward import FULL_LEARNING_RATE, ORDER, reward_benchmark, reward_table  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "reward_efficiency.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default", help="preset or YAML path")
    p.add_argument("--set", action="append", default=[], help="config override, e.g. reward.lora.rank=4 (repeatable)")
    p.add_argument("--backbone", help="reward.backbone.name (default scratch:llama-small)")
    p.add_argument("--vocab-size", type=int, help="reward.backbone.vocab_size for scratch backbones (default 4096)")
    p.add_argument("--steps", type=int, help="reward.train.max_steps (default 60)")
    p.add_argument("--batch-size", type=int, help="reward.train.batch_size: preference pairs per step (default 8)")
    p.add_argument("--max-length", type=int, help="reward.max_length (default 128)")
    p.add_argument("--eval-examples", type=int, help="reward.eval_examples: validation pairs scored (default 200)")
    p.add_argument("--lora-rank", type=int, help="reward.lora.rank, with reward.lora.alpha = 2 x rank")
    p.add_argument("--lr-lora", type=float, help="reward.train.learning_rate of the LoRA setting (default 1e-3)")
    p.add_argument("--lr-full", type=float, default=FULL_LEARNING_RATE, help="learning rate of the full setting")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--order", default=",".join(ORDER), help="which setting runs first (load on a shared machine drifts)")
    p.add_argument("--quick", action="store_true", help="llama-micro, 4 steps: shape only (CI)")
    return p.parse_args(argv)


def overrides(args) -> list[str]:
    """--set, then the shorthand options (given ones only), which win."""
    return list(args.set) + as_overrides({
        "reward.backbone.name": args.backbone, "reward.backbone.vocab_size": args.vocab_size,
        "reward.train.max_steps": args.steps, "reward.train.batch_size": args.batch_size,
        "reward.max_length": args.max_length, "reward.eval_examples": args.eval_examples,
        "reward.train.learning_rate": args.lr_lora, "reward.lora.rank": args.lora_rank,
        "reward.lora.alpha": 2 * args.lora_rank if args.lora_rank else None})


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = reward_benchmark(args.config, overrides(args), quick=args.quick, full_learning_rate=args.lr_full,
                              order=[t.strip() for t in args.order.split(",")], log=print)
    print(reward_table(report))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
