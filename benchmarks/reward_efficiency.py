"""LoRA vs full-tuning reward models: same data, same backbone, one run, each setting in a fresh process.

    python benchmarks/reward_efficiency.py                 # llama-small (~28M), synthetic pairs
    python benchmarks/reward_efficiency.py --quick         # llama-micro, a few steps: checks the table's shape

Reports trainable parameters, peak memory (see perl_core/efficiency.py for what is measured
and which number the ratio uses), median step time, examples/s and the final validation
metric, prints a table and writes JSON. PERL's claim on a ~30M backbone: LoRA/full peak
memory <= 0.5, step time <= 0.65, validation metric within 1 point. Measured, never asserted.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from perl_core.efficiency import peak_memory_mb, ratio, run_isolated  # noqa: E402
from perl_core.reporting import markdown_table  # noqa: E402

COLUMNS = ["tuning", "trainable_params", "peak_mb", "peak_rss_mb", "median_step_s", "examples_per_s", "validation"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default", help="preset or YAML path (data settings come from here)")
    p.add_argument("--set", action="append", default=[], help="extra config override for both settings (repeatable)")
    p.add_argument("--backbone", default="scratch:llama-small")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8, help="preference pairs per step")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--eval-examples", type=int, default=200, help="validation pairs scored for the final metric")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lr-lora", type=float, default=1e-3)
    p.add_argument("--lr-full", type=float, default=1e-4)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reward_efficiency.json"))
    p.add_argument("--order", default="lora,full", help="which setting runs first (load on a shared machine drifts)")
    p.add_argument("--quick", action="store_true", help="llama-micro, 4 steps: shape only (CI)")
    return p.parse_args(argv)


def prepare_backbone(args) -> str:
    """Build (or reuse) the scratch backbone once in this process so both settings load the same files."""
    from perl_core import data as data_api
    from perl_core.config import BackboneConfig, load_config
    from perl_core.modeling import resolve_backbone

    cfg = load_config(args.config, args.set)
    name = args.backbone
    corpus = data_api.corpus(cfg.data) if name.startswith("scratch:") else None
    return resolve_backbone(BackboneConfig(name=name, vocab_size=args.vocab_size), cfg.artifacts_dir, corpus)


def run(args) -> dict:
    if args.quick:
        args.backbone, args.vocab_size, args.steps, args.batch_size = "scratch:llama-micro", 512, 4, 4
        args.eval_examples = 16
    backbone = prepare_backbone(args)
    results = {}
    lrs = {"lora": args.lr_lora, "full": args.lr_full}
    order = [t.strip() for t in args.order.split(",")]
    if sorted(order) != ["full", "lora"]:
        raise SystemExit(f"--order must name lora and full once each, got {args.order!r}")
    for tuning in order:
        lr = lrs[tuning]
        overrides = list(args.set) + [
            f"reward.backbone.name={backbone}", f"reward.tuning={tuning}", f"reward.train.learning_rate={lr}",
            f"reward.train.max_steps={args.steps}", f"reward.train.batch_size={args.batch_size}",
            f"reward.train.eval_every={args.steps}", f"reward.train.checkpoint_every={args.steps}",
            f"reward.max_length={args.max_length}", f"reward.lora.rank={args.lora_rank}",
            f"reward.lora.alpha={2 * args.lora_rank}", "reward.objective=pairwise", "reward.truncation=left",
            f"reward.eval_examples={args.eval_examples}",
        ]
        started = time.perf_counter()
        results[tuning] = run_isolated("perl_core.efficiency:reward_workload",
                                       {"preset": args.config, "overrides": overrides})
        results[tuning]["wall_seconds"] = time.perf_counter() - started
    lora, full = results["lora"], results["full"]
    summary = {
        "memory_ratio": ratio(peak_memory_mb(lora), peak_memory_mb(full)),
        "memory_ratio_basis": lora["memory"]["ratio_basis"],
        "absolute_peak_rss_ratio": ratio(lora["memory"]["peak_rss_mb"], full["memory"]["peak_rss_mb"]),
        "step_time_ratio": ratio(lora["median_step_seconds"], full["median_step_seconds"]),
        "trainable_param_ratio": ratio(lora["trainable_params"], full["trainable_params"]),
        "validation_metric": lora["validation_metric"],
        "validation_gap_points": 100 * (lora["validation_value"] - full["validation_value"]),
        "targets": {"memory_ratio": 0.5, "step_time_ratio": 0.65, "validation_gap_points": -1.0},
    }
    return {"settings": results, "summary": summary, "args": vars(args),
            "machine": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpu_count": __import__("os").cpu_count()}}


def table(report: dict) -> str:
    rows = []
    for tuning, r in report["settings"].items():
        rows.append([tuning, f"{r['trainable_params']:,}", f"{peak_memory_mb(r):.0f}", f"{r['memory']['peak_rss_mb']:.0f}",
                     f"{r['median_step_seconds']:.3f}", f"{r['examples_per_second']:.1f}",
                     f"{r['validation_metric']}={r['validation_value']:.4f}"])
    s = report["summary"]
    out = [markdown_table(COLUMNS, rows)]
    out.append(f"\nLoRA/full peak memory ({s['memory_ratio_basis']}): {s['memory_ratio']:.3f} (target <= 0.5); "
               f"absolute peak RSS: {s['absolute_peak_rss_ratio']:.3f}")
    out.append(f"LoRA/full median step time: {s['step_time_ratio']:.3f} (target <= 0.65)")
    out.append(f"LoRA - full {s['validation_metric']}: {s['validation_gap_points']:+.2f} points (target >= -1)")
    return "\n".join(out)


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = run(args)
    print(table(report))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
