"""RL rollouts through `generate` (hf) and through a vLLM server (vllm), side by side in one run.

On the smollm2 preset's synthetic task (SmolLM2-135M-Instruct): one anchor and one reward model,
then the same RL run (same seed, same steps) once per engine, each in a fresh process
(`bench.engines`: what each row holds); the ratios vllm / hf.

    python benchmarks/rollout_engines.py --steps 6                 # needs `make vllm-env`; ~10 min on 2 CPU cores
    python benchmarks/rollout_engines.py --engines hf --steps 2    # hf alone

To stay within minutes the anchor is the instruct backbone itself (no SFT) and the reward model is
trained for `--rm-steps` steps; both are reused from --work-dir. The numbers compare engines, not
the preset's full pipeline.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "rollout_engines.json"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6, help="policy.train.max_steps per engine")
    p.add_argument("--rm-steps", type=int, default=30, help="reward.train.max_steps of the reward model")
    p.add_argument("--window", type=int, default=3, help="the last N steps the RL result is averaged over")
    p.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    p.add_argument("--set", action="append", default=[], help="config override, e.g. policy.k=2")
    p.add_argument("--work-dir", default=str(ROOT / "artifacts" / "bench_rollout_engines"))
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)

    from bench.engines import engine_rows, engines_comparison
    from perl_core import data as data_api
    from perl_core.artifacts import MANIFEST, write_manifest
    from perl_core.config import load_config
    from perl_core.modeling import resolve_backbone
    from perl_core.reward.train import train_reward_model

    work = Path(args.work_dir)
    cfg = load_config("smollm2", [f"policy.train.max_steps={args.steps}", f"reward.train.max_steps={args.rm_steps}",
                                  f"artifacts_dir={work}", "policy.train.checkpoint_every=1000", *args.set])
    data_api.prepare_dataset(cfg)
    anchor = Path(resolve_backbone(cfg.reward.backbone, work))
    if not (anchor / MANIFEST).exists():
        write_manifest(anchor, kind="anchor", base_model=str(anchor), tuning="none", config={})
    rm = work / "reward_model"
    if not (rm / MANIFEST).exists():
        train_reward_model(cfg, rm, base_model=str(anchor))

    result = engines_comparison(cfg.model_dump(mode="json"), anchor, rm, work, args.engines, args.window)
    if "skipped" in result:
        raise SystemExit(f"error: {result['skipped']}")
    report = {"config": "smollm2", "steps": args.steps, "window": args.window, **result}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("| engine | step s | generate s | samples/s | score s | update s | gap max | reward (last) | gold (last) | "
          "step / hf | samples/s / hf |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in engine_rows(result):
        print(f"| {r['engine']} | {r['step_seconds']:.1f} | {r['generate_seconds']:.1f} | {r['samples_per_second']:.2f} | "
              f"{r['score_seconds']:.1f} | {r['update_seconds']:.1f} | {r['logprob_gap_max']:.1e} | "
              f"{r['final_reward']:.3f} | {r['final_gold']:.3f} | {r['step_ratio_to_hf'] or float('nan'):.2f} | "
              f"{r['samples_per_second_ratio_to_hf'] or float('nan'):.2f} |")
    return report


if __name__ == "__main__":
    main()
