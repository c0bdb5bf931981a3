"""Full-tuning RL vs PERL (LoRA on one backbone): same backbone, prompts and batch, each setting
in a fresh process (peak memory is a per-process high-water mark).

    python benchmarks/policy_efficiency.py            # llama-small (~30M), 8 prompts x k=4, 32 new tokens
    python benchmarks/policy_efficiency.py --quick    # llama-micro, 3 steps: checks the table's shape (CI)
    python benchmarks/policy_efficiency.py --set policy.kl_coef=0.1 --steps 20

full: a trainable policy copy, a frozen anchor copy, a reward model with its own (merged) copy.
PERL: one backbone carrying the policy adapter (trainable), the reward adapter + head (frozen);
the anchor is the same weights with adapters disabled. A command line over bench.policy:
each setting trains the preset + the benchmark's measurement setting + your --set and the options
below, which win.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout's perl_core, installed or not

from bench.isolation import as_overrides  # noqa: E402
from bench.policy import FULL_LEARNING_RATE, policy_benchmark, policy_table  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "policy_efficiency.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default", help="preset or YAML path (the prompts come from its data)")
    p.add_argument("--set", action="append", default=[], help="config override, e.g. data.data_dir=/tmp/data")
    p.add_argument("--backbone", help="sft.backbone.name: the stand-in anchor (default scratch:llama-small)")
    p.add_argument("--vocab-size", type=int, help="sft.backbone.vocab_size for scratch backbones (default 4096)")
    p.add_argument("--steps", type=int, help="policy.train.max_steps (default 10)")
    p.add_argument("--batch-size", type=int, help="policy.train.batch_size: prompts per step (default 8)")
    p.add_argument("--k", type=int, help="policy.k: samples per prompt (default 4)")
    p.add_argument("--max-new-tokens", type=int, help="policy.generation.max_new_tokens (default 32)")
    p.add_argument("--lora-rank", type=int, help="policy.lora.rank")
    p.add_argument("--lr-full", type=float, default=FULL_LEARNING_RATE, help="learning rate of the full setting")
    p.add_argument("--work-dir", default=None, help="where the stand-in anchor and reward model go (default: a temp dir)")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--quick", action="store_true", help="llama-micro, 3 steps: shape only (CI)")
    return p.parse_args(argv)


def overrides(args) -> list[str]:
    """--set, then the shorthand options (given ones only), which win."""
    return list(args.set) + as_overrides({
        "sft.backbone.name": args.backbone, "sft.backbone.vocab_size": args.vocab_size,
        "policy.train.max_steps": args.steps, "policy.train.batch_size": args.batch_size, "policy.k": args.k,
        "policy.generation.max_new_tokens": args.max_new_tokens, "policy.lora.rank": args.lora_rank})


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = policy_benchmark(args.config, overrides(args), quick=args.quick, work_dir=args.work_dir,
                              full_learning_rate=args.lr_full, log=print)
    print(policy_table(report))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
