"""RL rollouts through `generate` (hf) and through a vLLM server (vllm), side by side in one run.

On the smollm2 preset's synthetic task (SmolLM2-135M-Instruct): one anchor and one reward model,
then the same RL run (same seed, same steps) once per engine; per engine the RL step time, the
sampling time and samples/s, the scoring and update time (with vllm: the trainer beside the idle
server, which shows whether its threads leave the cores alone), the log-prob guard's gap, and the RL result at equal steps (the reward
model's score and the gold score of the sampled responses, means over the last `--window` steps).

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
import time
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

    from perl_core import data as data_api
    from perl_core.artifacts import MANIFEST, write_manifest
    from perl_core.config import load_config
    from perl_core.modeling import resolve_backbone
    from perl_core.policy.stage import train_policy
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

    rows = {}
    for engine in args.engines:
        run_cfg = cfg.model_copy(deep=True)
        run_cfg.policy.generation.engine = engine
        history: list[dict] = []
        started = time.perf_counter()
        train_policy(run_cfg, work / f"policy_{engine}", anchor, rm, callback=lambda m, s: history.append(m))
        wall = time.perf_counter() - started
        n = run_cfg.policy.train.batch_size * run_cfg.policy.k
        tail = history[-args.window:]

        def mean(key, part=history):
            values = [m[f"rl/{key}"] for m in part if f"rl/{key}" in m]
            return sum(values) / len(values) if values else None

        rows[engine] = {
            "steps": len(history), "stage_seconds": wall, "samples_per_step": n,
            "step_seconds": mean("step_seconds"), "generate_seconds": mean("generate_seconds"),
            "samples_per_second": n / mean("generate_seconds"), "score_seconds": mean("score_seconds"),
            "update_seconds": mean("update_seconds"),  # with vllm: the trainer beside an idle server
            "logprob_gap_mean": mean("logprob_gap"), "logprob_gap_max": max(m["rl/logprob_gap_max"] for m in history),
            "final_reward": mean("reward", tail), "final_gold": mean("gold_score", tail),
            "first_step_seconds": history[0]["rl/step_seconds"]}
    report = {"config": "smollm2", "steps": args.steps, "window": args.window, "engines": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("| engine | step s | generate s | samples/s | score s | update s | gap mean | gap max | reward (last) | "
          "gold (last) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for engine, r in rows.items():
        print(f"| {engine} | {r['step_seconds']:.1f} | {r['generate_seconds']:.1f} | {r['samples_per_second']:.2f} | "
              f"{r['score_seconds']:.1f} | {r['update_seconds']:.1f} | "
              f"{r['logprob_gap_mean']:.1e} | {r['logprob_gap_max']:.1e} | {r['final_reward']:.3f} | "
              f"{r['final_gold']:.3f} |")
    return report


if __name__ == "__main__":
    main()
