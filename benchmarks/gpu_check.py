"""PERL's cost claims on one accelerator: the efficiency report's own workloads at public model shapes.

For each shape (`scratch:smollm2-135m`, `scratch:qwen2.5-0.5b`: those models' layers, heads and
vocabulary with random weights, built from configs, since a bare GPU machine fetches nothing) it
runs, each setting in a fresh process exactly as `perl-rlhf report efficiency` does:

* reward model: `bench.reward.reward_benchmark` -> `reward_workload` ->
  `perl_core.reward.train.train_reward_model` (Bradley-Terry on the synthetic pairs, packed pairs, the
  configured precision), LoRA against full tuning;
* RL: `bench.policy.policy_benchmark` -> `policy_workload` -> `perl_core.policy.rl.rl_loop`
  (RLOO; PERL's one backbone against separate policy, anchor and reward-model copies; packing,
  folded adapters while sampling, `policy.train.precision`), generate / score / update split.

Peak memory is `torch.cuda.max_memory_allocated` on a GPU (`bench.isolation`). Results
are written as JSON after every benchmark (a run cut short keeps what it measured).

What it needs: torch, transformers, peft, accelerate (and their own dependencies: numpy,
tokenizers, safetensors, psutil, pyyaml, ...), plus the pure-Python wheels in CARRIED when the
machine lacks them: `make gpu-wheels` puts them in `.gpu_wheels/`, which this script appends to
`sys.path` (a machine's own copy wins). Nothing of Prefect, MLflow, DVC or datasets is imported.

No vLLM row (`policy.generation.engine: vllm`): vLLM is not installed on the GPU machine, and its
CUDA build (a vllm wheel pinned to that machine's torch and CUDA, with its dependencies several
GB) does not fit what a device run can carry. A row needs a virtualenv with a CUDA vLLM whose torch
matches the machine's, an anchor folder the server can read (the random-weight shapes above, saved
with `save_pretrained`), and then, per shape, `benchmarks/rollout_engines.py` with
`--set policy.generation.vllm.python=<that env>/bin/python` (and `--dtype bfloat16` in
`policy.generation.vllm.extra_args`: the started server serves fp32 unless a later `--dtype` says otherwise).

    PYTHONPATH=. python benchmarks/gpu_check.py --out gpu_check.json            # on the GPU machine
    PYTHONPATH=. python benchmarks/gpu_check.py --quick --shapes llama-micro    # seconds, on a CPU
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What perl_core needs beyond torch, transformers, peft and accelerate's own dependencies: pydantic
# (the config tree) and its parts. Pure Python except pydantic-core (a wheel for the machine's Python).
CARRIED = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")
WHEELS = ROOT / ".gpu_wheels"
if WHEELS.is_dir():
    sys.path.append(str(WHEELS))  # after site-packages: the machine's own packages win

from bench.policy import policy_benchmark  # noqa: E402
from bench.reward import reward_benchmark  # noqa: E402

SHAPES = ("smollm2-135m", "qwen2.5-0.5b")
# Fewer steps than the report (the whole check fits one 6-minute device run): the medians skip 2 warm-up steps.
GPU_STEPS = {"reward": ["reward.train.max_steps=12", "reward.eval_examples=64"],
             "rl": ["policy.train.max_steps=6"]}


def run(workload: str, shape: str, overrides: list[str], quick: bool, work: Path) -> dict:
    """One benchmark (both settings) of `workload` on `scratch:<shape>`."""
    common = [f"artifacts_dir={work / 'artifacts'}", f"data.data_dir={work / 'data'}"]
    if workload == "reward":
        backbone = [f"reward.backbone.name=scratch:{shape}"]
        report = reward_benchmark("default", common + ([] if quick else GPU_STEPS["reward"]) + backbone + overrides,
                                  quick=quick)
    else:
        backbone = [f"sft.backbone.name=scratch:{shape}"]
        report = policy_benchmark("default", common + ([] if quick else GPU_STEPS["rl"]) + backbone + overrides,
                                  quick=quick, work_dir=work / f"rl-{shape}")
    settings = {name: {key: value for key, value in r.items() if key not in ("config", "validation_rows")}
                for name, r in report["settings"].items()}
    return {"workload": workload, "shape": shape, "summary": report["summary"], "settings": settings}


def main(argv=None) -> dict:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="scratch presets (perl_core.modeling.SCRATCH_PRESETS)")
    ap.add_argument("--workloads", default="reward,rl")
    ap.add_argument("--budget-seconds", type=float, default=300.0, help="start no benchmark after this")
    ap.add_argument("--quick", action="store_true", help="the benchmarks' --quick settings: the check's shape in seconds")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for both workloads' settings (repeatable), e.g. policy.k=8")
    ap.add_argument("--work-dir", help="data, backbones and stand-ins (default: a temporary folder)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "request": vars(args), "results": [], "skipped": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        for shape in args.shapes.split(","):
            for workload in args.workloads.split(","):
                if time.perf_counter() - started > args.budget_seconds:
                    report["skipped"].append(f"{workload}/{shape}: over the {args.budget_seconds:.0f} s budget")
                    continue
                try:
                    row = run(workload, shape, args.overrides, args.quick, work)
                except RuntimeError as err:  # a setting that failed (out of memory, say): a miss to report
                    row = {"workload": workload, "shape": shape, "error": str(err)[-2000:]}
                row["seconds"] = time.perf_counter() - started
                report["results"].append(row)
                out.write_text(json.dumps(report, indent=2))
                s = row.get("summary")
                print(f"{workload:6s} {shape:14s} " + (row["error"].splitlines()[0] if s is None else
                      f"PERL/full: memory {s['memory_ratio']:.2f}x ({s['memory_ratio_basis']}), "
                      f"step time {s['step_time_ratio']:.2f}x"), flush=True)
    return report


if __name__ == "__main__":
    main()
