"""Full-tuning RL vs PERL (LoRA on one backbone): same backbone, prompts and batch, one run,
each setting in a fresh process (peak memory is a per-process high-water mark).

    python benchmarks/policy_efficiency.py            # llama-small (~30M), 8 prompts x k=4, 32 new tokens
    python benchmarks/policy_efficiency.py --quick    # llama-micro, 3 steps: checks the table's shape (CI)

full: a trainable policy copy, a frozen anchor copy, a reward model with its own (merged) copy.
PERL: one backbone carrying the policy adapter (trainable), the reward adapter + head (frozen);
the anchor is the same weights with adapters disabled.
Reports peak memory, median step time split into generate / score / update, trainable and
resident parameters. Targets on a ~30M backbone: PERL/full memory <= 0.5, step time <= 0.85.
Measured, never asserted.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from perl_core.efficiency import peak_memory_mb, ratio, run_isolated  # noqa: E402
from perl_core.reporting import markdown_table  # noqa: E402

COLUMNS = ["setting", "trainable", "resident", "peak_mb", "peak_rss_mb", "step_s", "generate_s", "score_s",
           "update_s", "tokens/s"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default", help="preset or YAML path (the prompts come from its data)")
    p.add_argument("--set", action="append", default=[], help="config override, e.g. data.data_dir=/tmp/data")
    p.add_argument("--backbone", default="scratch:llama-small")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per step")
    p.add_argument("--k", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--work-dir", default=None, help="where the stand-in anchor and reward model go (default: a temp dir)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "policy_efficiency.json"))
    p.add_argument("--quick", action="store_true", help="llama-micro, 3 steps: shape only (CI)")
    return p.parse_args(argv)


def run(args) -> dict:
    from perl_core import data as data_api
    from perl_core.config import BackboneConfig, load_config
    from perl_core.efficiency_rl import prepare_artifacts
    from perl_core.modeling import resolve_backbone

    if args.quick:
        args.backbone, args.vocab_size, args.steps, args.batch_size, args.k, args.max_new_tokens = \
            "scratch:llama-micro", 512, 3, 2, 2, 8
    cfg = load_config(args.config, args.set)
    data_api.prepare_dataset(cfg)  # a fresh clone has no data/ yet; skipped when up to date
    prompts = data_api.load_prompts(cfg.data, "train")[:256]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        backbone = resolve_backbone(BackboneConfig(name=args.backbone, vocab_size=args.vocab_size),
                                    work / "backbones" if args.quick else cfg.artifacts_dir,
                                    data_api.corpus(cfg.data))
        anchor, rm = prepare_artifacts(backbone, work, args.lora_rank)
        results = {}
        for tuning in ("full", "lora"):
            started = time.perf_counter()
            results[tuning] = run_isolated("perl_core.efficiency_rl:policy_workload", {
                "tuning": tuning, "anchor_dir": str(anchor), "reward_model_dir": str(rm), "prompts": prompts,
                "steps": args.steps, "batch_size": args.batch_size, "k": args.k,
                "max_new_tokens": args.max_new_tokens, "lora_rank": args.lora_rank})
            results[tuning]["wall_seconds"] = time.perf_counter() - started
    lora, full = results["lora"], results["full"]
    summary = {
        "memory_ratio": ratio(peak_memory_mb(lora), peak_memory_mb(full)),
        "memory_ratio_basis": lora["memory"]["ratio_basis"],
        "absolute_peak_rss_ratio": ratio(lora["memory"]["peak_rss_mb"], full["memory"]["peak_rss_mb"]),
        "step_time_ratio": ratio(lora["median_step_seconds"], full["median_step_seconds"]),
        **{f"{part}_time_ratio": ratio(lora[f"median_{part}_seconds"], full[f"median_{part}_seconds"])
           for part in ("generate", "score", "update")},
        "trainable_param_ratio": ratio(lora["trainable_params"], full["trainable_params"]),
        "targets": {"memory_ratio": 0.5, "step_time_ratio": 0.85},
    }
    return {"settings": results, "summary": summary, "args": vars(args), "backbone": backbone,
            "machine": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpu_count": __import__("os").cpu_count()}}


def table(report: dict) -> str:
    rows = []
    for name, r in report["settings"].items():
        rows.append([f"{name} ({r['layout']})", f"{r['trainable_params']:,}", f"{r['resident_params']:,}",
                     f"{peak_memory_mb(r):.0f}", f"{r['memory']['peak_rss_mb']:.0f}",
                     f"{r['median_step_seconds']:.3f}", f"{r['median_generate_seconds']:.3f}",
                     f"{r['median_score_seconds']:.3f}", f"{r['median_update_seconds']:.3f}",
                     f"{r['median_tokens_per_second']:.0f}"])
    s = report["summary"]
    out = [markdown_table(COLUMNS, rows)]
    out.append(f"\nPERL/full peak memory ({s['memory_ratio_basis']}): {s['memory_ratio']:.3f} (target <= 0.5); "
               f"absolute peak RSS: {s['absolute_peak_rss_ratio']:.3f}")
    out.append(f"PERL/full median step time: {s['step_time_ratio']:.3f} (target <= 0.85); generate "
               f"{s['generate_time_ratio']:.3f}, score {s['score_time_ratio']:.3f}, update {s['update_time_ratio']:.3f}")
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
