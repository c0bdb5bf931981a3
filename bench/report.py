"""The efficiency report: PERL (LoRA) against full tuning, a LoRA rank sweep, and TRL side by side.

One call, :func:`efficiency_report`, runs in order
1. the reward-model benchmark (`bench/reward.py`: LoRA vs full),
2. the policy-RL benchmark (`bench/policy.py`: PERL one backbone vs full),
3. a LoRA rank sweep of the reward model, r in {1, 2, 4, 8, 16, 32} (the paper's rank ablation),
   each rank trained exactly like the reward benchmark's LoRA setting (alpha / r kept),
4. TRL's `RewardTrainer` and `RLOOTrainer` with LoRA against ours on the benchmarks' LoRA settings
   (`bench/trl_compare.py`; skipped, and said so, when the `bench` extra is not installed),
5. with `engines`: RL rollouts through `generate` against a vLLM server on the policy benchmark's
   LoRA setting, anchor and reward model (`bench/engines.py`; skipped, and said so, without a vLLM
   environment),
every setting in a fresh Python process, and writes ONE report into `out_dir`:
`efficiency_report.json`, `efficiency_report.md`, and PNG plots (quality against rank, peak
memory and step time bars). Ratios are to full tuning of the same stage; they are the claim,
absolute seconds and megabytes describe only the machine that ran it.

One configuration: every setting is the preset, then the benchmark's measurement setting
(`reward.MEASURE`, `policy.MEASURE`), then the caller's overrides, which win; each result
carries the whole config its workload trained (`settings.<name>.config`), and the rank sweep and
the TRL comparison start from those very configs.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from perl_core.eval import reporting as R
from bench.engines import engine_rows
from bench.isolation import as_overrides, machine, peak_memory_mb, ratio, run_isolated
from perl_core.errors import UserError

RANKS = (1, 2, 4, 8, 16, 32)
QUICK_RANKS = (1, 8)  # r=8 is the reward benchmark's own LoRA run by default: one process fewer in CI
# (workload, side) -> the function run_isolated runs, spelt out so that each can be found by name
TRL_WORKLOADS = {("reward", "perl"): "bench.trl_compare:ours_reward_workload",
                 ("reward", "trl"): "bench.trl_compare:trl_reward_workload",
                 ("rloo", "perl"): "bench.trl_compare:ours_rloo_workload",
                 ("rloo", "trl"): "bench.trl_compare:trl_rloo_workload"}


def _saved(path: Path) -> dict:
    """A part an earlier run saved; one cut short (the run killed while writing it) is named, not a traceback."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is damaged ({err}): delete it and --resume measures that part again") from None


def _cached(path: Optional[Path], resume, run: Callable[[], dict]) -> Optional[dict]:
    """Every measured part is saved as it finishes; with `resume`, a part already on disk is read back
    instead of measured again (a long report interrupted on a shared machine continues where it stopped).
    `resume="saved-only"` measures nothing new: a missing part is None and reported as not measured."""
    if path is not None and resume and path.exists():
        return _saved(path)
    if resume == "saved-only":
        return None
    result = run()
    if path is not None:
        R.write_json(path, result)
    return result


def setting_config(bench: dict, setting: str, part: str) -> dict:
    """The config tree a benchmark setting trained (what the sweep and the TRL comparison start from)."""
    tree = bench["settings"][setting].get("config")
    if tree is None:
        raise UserError(f"{part} was saved without the config its settings trained (an older report): "
                        "measure it again (without --resume, or delete that file)")
    return json.loads(json.dumps(tree))  # a copy the caller may change


def with_rank(tree: dict, rank: int) -> dict:
    """The reward LoRA setting at another rank, with the same LoRA scale alpha / r."""
    lora = tree["reward"]["lora"]
    lora["alpha"], lora["rank"] = lora["alpha"] * rank / lora["rank"], rank
    return tree


# ---------------------------------------------------------------- rows of the report
def _row(stage: str, setting: str, r: dict, quality_metric: str, quality: Optional[float], step_key: str,
         full: Optional[dict] = None, full_quality: Optional[float] = None, peak_key: Optional[str] = None) -> dict:
    peak = float(r[peak_key]) if peak_key else peak_memory_mb(r)
    row = {"stage": stage, "setting": setting, "trainable_params": int(r["trainable_params"]),
           "peak_memory_mb": peak, "peak_rss_mb": float(r["memory"]["peak_rss_mb"]),
           "step_seconds": float(r[step_key]), "quality_metric": quality_metric, "quality": quality}
    if full is not None:
        full_peak = float(full[peak_key]) if peak_key else peak_memory_mb(full)
        row.update(params_ratio=ratio(row["trainable_params"], int(full["trainable_params"])),
                   memory_ratio=ratio(peak, full_peak), step_time_ratio=ratio(row["step_seconds"], float(full[step_key])),
                   quality_delta=(quality - full_quality) if quality is not None and full_quality is not None else None)
    row.update(quality_intervals(r, full))
    return row


def quality_intervals(r: dict, full: Optional[dict] = None) -> dict:
    """Bootstrap interval of a reward setting's validation pairwise accuracy from its per-pair scores,
    and the paired interval of its difference to full tuning on the same pairs (the "within 1 point"
    claim is read from that interval, not from two point estimates). Empty when the workload kept no
    per-pair scores (results saved before it did) or the two settings scored different pairs."""
    from perl_core.config import EvaluationConfig
    from perl_core.eval.reward import compare_pairwise, pairwise_intervals

    pairs = (r.get("validation_rows") or {}).get("pairwise")
    if r.get("validation_metric") != "pairwise_accuracy" or not pairs:
        return {}
    ev = EvaluationConfig()
    ci = pairwise_intervals([p["chosen"] for p in pairs], [p["rejected"] for p in pairs], ev)
    out = {"quality_ci_low": ci["pairwise_accuracy_ci_low"], "quality_ci_high": ci["pairwise_accuracy_ci_high"],
           "quality_confidence": ev.confidence}
    full_pairs = (full.get("validation_rows") or {}).get("pairwise") if full is not None and full is not r else None
    if full_pairs and sorted(p["key"] for p in pairs) == sorted(p["key"] for p in full_pairs):
        diff = compare_pairwise(pairs, full_pairs, ev)
        out.update(quality_delta_ci_low=diff["pairwise_accuracy_diff_ci_low"],
                   quality_delta_ci_high=diff["pairwise_accuracy_diff_ci_high"])
    return out


def _interval_cell(value: float, row: dict, name: str, fmt: Callable[[float], str]) -> str:
    if row.get(f"{name}_ci_low") is None:
        return fmt(value)
    return f"{fmt(value)} [{fmt(row[f'{name}_ci_low'])}, {fmt(row[f'{name}_ci_high'])}]"


def reward_rows(bench: dict) -> list[dict]:
    full, lora = bench["settings"]["full"], bench["settings"]["lora"]
    metric = full["validation_metric"]
    rank = setting_config(bench, "lora", "the reward benchmark")["reward"]["lora"]["rank"]
    return [_row("reward", "full", full, metric, full["validation_value"], "median_step_seconds", full,
                 full["validation_value"]),
            _row("reward", f"LoRA r={rank}", lora, metric, lora["validation_value"], "median_step_seconds", full,
                 full["validation_value"])]


def policy_rows(bench: dict) -> list[dict]:
    settings = bench["settings"]
    full = settings["full"]
    rows = []
    for name, r in settings.items():
        metric, value = _policy_quality(r)
        _, full_value = _policy_quality(full)
        label = "full" if name == "full" else \
            f"PERL LoRA r={setting_config(bench, 'lora', 'the policy benchmark')['policy']['lora']['rank']}"
        rows.append(_row("policy", f"{label} ({r.get('layout', name)})", r, metric, value,
                         "median_step_seconds", full, full_value))
    return rows


def _policy_quality(r: dict) -> tuple[str, Optional[float]]:
    for key in ("validation_gold_score", "final_gold_score", "gold_score", "validation_rm_reward", "final_reward", "reward"):
        if r.get(key) is not None:
            return key, float(r[key])
    return "—", None


# ---------------------------------------------------------------- the parts
def rank_sweep(reward_bench: dict, ranks: Sequence[int], log: Callable[[str], None], parts: Optional[Path] = None,
               resume: bool = False) -> list[dict]:
    """Train the reward benchmark's LoRA setting at every rank, each in a fresh process."""
    lora_cfg = setting_config(reward_bench, "lora", "the reward benchmark")
    full = reward_bench["settings"]["full"]
    rows = []
    for rank in ranks:
        log(f"rank sweep: r={rank}")
        if rank == lora_cfg["reward"]["lora"]["rank"]:
            # the benchmark's LoRA setting is this rank trained on this very config: reuse it
            r = reward_bench["settings"]["lora"]
        else:
            tree = with_rank(json.loads(json.dumps(lora_cfg)), rank)
            r = _cached(parts / f"rank_{rank}.json" if parts else None, resume,
                        lambda: {**run_isolated("bench.reward:reward_workload", {"config": tree}),
                                 "config": tree})
            if r is None:
                continue
        row = _row("reward", f"LoRA r={rank}", r, r["validation_metric"], r["validation_value"], "median_step_seconds",
                   full, full["validation_value"])
        row["rank"] = rank
        rows.append(row)
    return rows


def shared_roles(policy_bench: Optional[dict]) -> Optional[Path]:
    """The policy benchmark's work folder when it holds a trained anchor/ and reward_model/ to share, else None."""
    work = Path(policy_bench["request"].get("work_dir") or "") if policy_bench else None
    if work and all((work / name / "manifest.json").exists() for name in ("anchor", "reward_model")):
        return work
    return None


def trl_comparison(reward_bench: dict, policy_bench: Optional[dict], log: Callable[[str], None],
                   parts: Optional[Path] = None, resume: bool = False) -> dict:
    """Ours and TRL's, measured back to back in fresh processes on the benchmarks' LoRA settings."""
    from bench.trl_compare import trl_version

    version = trl_version()
    if version is None:
        return {"skipped": "trl is not installed (pip install -e '.[bench]')"}
    reward_cfg = setting_config(reward_bench, "lora", "the reward benchmark")
    out: dict = {"trl_version": version, "reward": {"config": reward_cfg}}
    for side in ("perl", "trl"):
        log(f"TRL comparison: reward model, {side}")
        target = TRL_WORKLOADS["reward", side]
        result = _cached(parts / f"trl_reward_{side}.json" if parts else None, resume,
                         lambda: run_isolated(target, {"config": reward_cfg}))
        if result is not None:
            out["reward"][side] = result
    work = shared_roles(policy_bench)
    if work:
        out["rloo"] = {"config": setting_config(policy_bench, "lora", "the policy benchmark"),
                       "anchor_dir": str(work / "anchor"), "reward_model_dir": str(work / "reward_model")}
        for side in ("perl", "trl"):
            log(f"TRL comparison: RLOO, {side}")
            target = TRL_WORKLOADS["rloo", side]
            kwargs = {k: out["rloo"][k] for k in ("config", "anchor_dir", "reward_model_dir")}
            result = _cached(parts / f"trl_rloo_{side}.json" if parts else None, resume,
                             lambda: run_isolated(target, kwargs))
            if result is not None:
                out["rloo"][side] = result
        if not all(side in out["rloo"] for side in ("perl", "trl")):
            out["rloo"]["skipped"] = "not measured in this run (interrupted before the RLOO comparison finished)"
    else:
        out["rloo"] = {"skipped": "the policy benchmark did not provide an anchor and reward model to share"}
    return out


def trl_rows(trl_result: dict) -> list[dict]:
    rows = []
    for stage, step_key, quality_key in (("reward", "median_step_seconds", "validation_value"),
                                         ("rloo", "median_step_seconds", "validation_rm_reward")):
        part = trl_result.get(stage) or {}
        if "perl" not in part or "trl" not in part:
            continue
        ours, theirs = part["perl"], part["trl"]
        rate = "examples_per_second" if stage == "reward" else "samples_per_second"
        rows.append({
            "stage": stage, "throughput_unit": rate.replace("_", " "),
            "perl_throughput": ours[rate], "trl_throughput": theirs[rate],
            "speedup": ratio(ours[rate], theirs[rate]),
            "perl_step_seconds": ours[step_key], "trl_step_seconds": theirs[step_key],
            "perl_peak_mb": ours["workload_peak_mb"], "trl_peak_mb": theirs["workload_peak_mb"],
            "memory_ratio": ratio(ours["workload_peak_mb"], theirs["workload_peak_mb"]),
            "quality_metric": ours.get("validation_metric", "validation_rm_reward"),
            "perl_quality": ours[quality_key], "trl_quality": theirs[quality_key],
            "perl_gold": ours.get("validation_gold_score"), "trl_gold": theirs.get("validation_gold_score"),
            "perl_trainable_params": ours["trainable_params"], "trl_trainable_params": theirs["trainable_params"],
            "meets_goal": bool(ratio(ours[rate], theirs[rate]) >= 1.25
                               and ours["workload_peak_mb"] <= theirs["workload_peak_mb"]),
        })
    return rows


def engines_part(policy_bench: Optional[dict], log: Callable[[str], None], parts: Optional[Path] = None,
                 resume: bool | str = False) -> dict:
    """RL with `generate` against a vLLM server on the policy benchmark's LoRA setting, anchor and reward model."""
    from bench.engines import engines_comparison

    work = shared_roles(policy_bench)
    if not work:
        return {"skipped": "the policy benchmark did not provide an anchor and reward model to share"}
    config = setting_config(policy_bench, "lora", "the policy benchmark")
    result = _cached(parts / "rollout_engines.json" if parts else None, resume,
                     lambda: engines_comparison(config, work / "anchor", work / "reward_model", work / "engines",
                                                log=log))
    return result if result is not None else {"skipped": "not measured in this run"}


# ---------------------------------------------------------------- the report
def efficiency_report(out_dir: str | Path, quick: bool = False, preset: str = "default",
                      overrides: Sequence[str] = (), ranks: Optional[Sequence[int]] = None,
                      with_trl: bool = True, with_engines: bool = False, backbone: Optional[str] = None,
                      reward_steps: Optional[int] = None,
                      reward_batch_size: Optional[int] = None, policy_steps: Optional[int] = None,
                      resume: bool | str = False, log: Callable[[str], None] = lambda msg: None) -> dict:
    """Run every benchmark (see the module docstring) and write the report into `out_dir`.

    `quick` (CI): tiny backbone, a few steps, two ranks; the report has the same shape.
    `backbone`, `reward_steps`, `reward_batch_size`, `policy_steps` are overrides like `--set`
    (reward.backbone.name and sft.backbone.name, reward.train.max_steps, reward.train.batch_size,
    policy.train.max_steps); every setting, the rank sweep and the TRL comparison included, trains
    the preset + the benchmark's measurement setting + these overrides.
    """
    from bench.policy import policy_benchmark
    from bench.reward import reward_benchmark
    from perl_core.config import load_config
    from perl_core.data import prepare_dataset

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ranks_arg, ranks = ranks, tuple(ranks or (QUICK_RANKS if quick else RANKS))
    started = time.perf_counter()
    cfg = load_config(preset, list(overrides))
    settings = list(overrides) + option_overrides(backbone, reward_steps, reward_batch_size, policy_steps)
    log("preparing the dataset (skipped when up to date)")
    data = prepare_dataset(cfg)

    load = {"start": os.getloadavg()}
    parts = out / "parts"
    reward_json, policy_json = out / "reward_efficiency.json", out / "policy_efficiency.json"
    if resume and reward_json.exists():
        reward_bench = _saved(reward_json)
    else:
        log("reward benchmark: LoRA vs full")
        reward_bench = reward_benchmark(preset, settings, quick=quick, log=log)
        R.write_json(reward_json, reward_bench)
    if resume and policy_json.exists():
        policy_bench = _saved(policy_json)
    elif resume == "saved-only":
        policy_bench = None
    else:
        log("policy benchmark: PERL vs full")
        policy_bench = policy_benchmark(preset, settings, quick=quick, work_dir=out / "policy_work", log=log)
        R.write_json(policy_json, policy_bench)
    sweep = rank_sweep(reward_bench, ranks, log, parts, resume)
    trl_result = trl_comparison(reward_bench, policy_bench, log, parts, resume) if with_trl \
        else {"skipped": "--no-trl"}
    engines = engines_part(policy_bench, log, parts, resume) if with_engines else {"skipped": "without --engines"}

    report = {
        "command": " ".join(part for part in ["perl-rlhf report efficiency", "--quick" if quick else "", f"--out {out_dir}",
                             f"--config {preset}" if preset != "default" else "",
                             *(f"--set {o}" for o in overrides), *(f"--rank {r}" for r in (ranks_arg or [])),
                             "" if with_trl else "--no-trl", "--engines" if with_engines else "",
                             f"--backbone {backbone}" if backbone else "",
                             f"--reward-steps {reward_steps}" if reward_steps else "",
                             f"--reward-batch-size {reward_batch_size}" if reward_batch_size else "",
                             f"--policy-steps {policy_steps}" if policy_steps else "", "--resume" if resume else "",
                             "--saved-only" if resume == "saved-only" else ""]
                             if part),
        "quick": quick, "config": cfg.model_dump(mode="json"),
        "data": {"source": cfg.data.source, "metrics": data.metrics},
        "machine": {**machine(), "torch_threads": _torch_threads(),
                    "load_average_1_5_15min": {**load, "end": os.getloadavg()}},
        "rows": reward_rows(reward_bench) + (policy_rows(policy_bench) if policy_bench else []),
        "rank_sweep": sweep, "ranks_requested": list(ranks), "resumed": bool(resume),
        "trl": trl_rows(trl_result),
        "trl_raw": trl_result,
        "engines": engine_rows(engines), "engines_raw": engines,
        "benchmarks": {"reward": reward_bench, "policy": policy_bench},
        "seconds": time.perf_counter() - started,
    }
    report["plots"] = {k: p.name for k, p in _plots(report, out).items()}
    R.write_json(out / "efficiency_report.json", report)
    (out / "efficiency_report.md").write_text(report_markdown(report))
    return report


def option_overrides(backbone: Optional[str] = None, reward_steps: Optional[int] = None,
                     reward_batch_size: Optional[int] = None, policy_steps: Optional[int] = None) -> list[str]:
    """The report's shorthand options as the config overrides they stand for."""
    return as_overrides({"reward.backbone.name": backbone or None, "sft.backbone.name": backbone or None,
                         "reward.train.max_steps": reward_steps or None,
                         "reward.train.batch_size": reward_batch_size or None,
                         "policy.train.max_steps": policy_steps or None})


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _plots(report: dict, out: Path) -> dict[str, Path]:
    plots = {}
    sweep = report["rank_sweep"]
    full = next((r for r in report["rows"] if r["stage"] == "reward" and r["setting"] == "full"), None)
    if sweep:
        metric = sweep[0]["quality_metric"]
        plots["quality_vs_rank"] = R.line_plot(
            {"LoRA reward model": ([r["rank"] for r in sweep], [r["quality"] for r in sweep])},
            out / "quality_vs_rank.png", "Reward-model quality against LoRA rank", "LoRA rank r",
            f"validation {metric}", logx=True, hline={"full tuning": full["quality"]} if full else None)
    rows = report["rows"] + report["rank_sweep"]
    label = lambda r: f"{r['stage']}: {r['setting']}"  # noqa: E731
    plots["memory"] = R.bar_plot({label(r): r["peak_memory_mb"] for r in rows}, out / "memory_bars.png",
                                 "Peak memory above the import baseline", "MB")
    plots["step_time"] = R.bar_plot({label(r): r["step_seconds"] for r in rows}, out / "step_time_bars.png",
                                    "Median step time", "seconds")
    if report["trl"]:
        plots["trl"] = R.bar_plot(
            {f"{t['stage']}: {side}": t[f"{side}_throughput"] for t in report["trl"] for side in ("perl", "trl")},
            out / "trl_throughput_bars.png", "Throughput, PERL vs TRL (higher is better)", "examples or samples / s")
    return plots


# A benchmark's target bounds its ratio from above (memory, step time), except these, bounded from below.
AT_LEAST = frozenset({"validation_gap_points"})


def target_verdict(name: str, value: Optional[float], target: float) -> str:
    """`target ≤ 0.5: met`, `target ≥ -1: missed`; a value that is missing or NaN is `not measured`."""
    at_least = name in AT_LEAST
    bound = f"target {'≥' if at_least else '≤'} {target:g}"
    if value is None or not math.isfinite(value):
        return f"{bound}: not measured"
    return f"{bound}: {'met' if (value >= target if at_least else value <= target) else 'missed'}"


def _ratio_cell(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}×"


def report_markdown(report: dict) -> str:
    lines = ["# Efficiency report: PERL (LoRA) against full tuning, and against TRL", "",
             f"Produced by `{report['command']}` "
             + ("(assembled from the parts earlier runs of the same settings saved) " if report.get("resumed")
                else f"in {report['seconds'] / 60:.1f} min ") + "on "
             f"{report['machine']['platform']} ({report['machine']['cpu_count']} CPUs, "
             f"{report['machine']['torch_threads']} torch threads; 1-min load average "
             f"{report['machine']['load_average_1_5_15min']['start'][0]:.1f} at the start, "
             f"{report['machine']['load_average_1_5_15min']['end'][0]:.1f} at the end). Ratios are the claim; absolute seconds and MB "
             "describe this machine only. Each setting ran in a fresh Python process; peak memory is the peak "
             "resident set size while the training steps ran, above the process's baseline after imports (on a GPU: "
             "peak CUDA allocation); each setting's JSON also has the whole run's peak and where it fell.", ""]
    if report["quick"]:
        lines += ["**Quick mode: a tiny backbone and a few steps. The numbers check the pipeline, not the claim.**", ""]
    headers = ["stage", "setting", "trainable params", "× full", "peak MB", "× full", "step s", "× full",
               "quality", "Δ vs full"]
    table = []
    shown = {(r["stage"], r["setting"]) for r in report["rows"]}
    for r in report["rows"] + [x for x in report["rank_sweep"] if ("reward", x["setting"]) not in shown]:
        table.append([r["stage"], r["setting"], r["trainable_params"], _ratio_cell(r.get("params_ratio")),
                      f"{r['peak_memory_mb']:.0f}", _ratio_cell(r.get("memory_ratio")), f"{r['step_seconds']:.3f}",
                      _ratio_cell(r.get("step_time_ratio")),
                      f"{r['quality_metric']} = {_interval_cell(r['quality'], r, 'quality', R.fmt)}"
                      if r["quality"] is not None else "not measured",
                      "—" if r.get("quality_delta") is None
                      else _interval_cell(r["quality_delta"], r, "quality_delta", lambda v: f"{v:+.3f}")])
    missing = [r for r in report.get("ranks_requested", []) if r not in {x["rank"] for x in report["rank_sweep"]}]
    lines += ["## PERL against full tuning", "", R.markdown_table(headers, table), "",
              *([f"Rank sweep: r = {', '.join(map(str, missing))} not measured in this run.", ""] if missing else []),
              "Reward rows: validation pairwise accuracy after the same number of steps, with its 95% bootstrap "
              "interval over the validation pairs; Δ vs full has the paired interval (both settings on the same "
              "pairs). Policy rows measure cost "
              "only: the policy benchmark runs RLOO against a stand-in anchor and reward model (the production "
              "layout, untrained weights), so policy quality is compared in the TRL section and in "
              "`perl-rlhf eval policy`, not here.", ""]
    for name, bench in report["benchmarks"].items():
        if bench is None:
            lines += [f"- {name} benchmark: not measured in this run"]
        elif bench.get("summary"):
            s = bench["summary"]
            targets = s.get("targets", {})
            parts = [f"{k} = {R.fmt(v)}" + (f" ({target_verdict(k, v, targets[k])})" if k in targets else "")
                     for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            lines += [f"- {name} benchmark: " + "; ".join(parts)]
    lines += ["", "![quality vs rank](quality_vs_rank.png) ![memory](memory_bars.png) ![step time](step_time_bars.png)", ""]

    lines += ["## Side by side with Hugging Face TRL", ""]
    raw = report["trl_raw"]
    if raw.get("skipped"):
        lines += [f"Not measured: {raw['skipped']}.", ""]
    else:
        lines += [f"TRL {raw['trl_version']}, each side in a fresh process with the same backbone, "
                  "data, batch, sequence lengths, LoRA settings, learning rate, schedule and step count. Goal: at "
                  "least 1.25× TRL's throughput at equal quality and no more memory.", ""]
        headers = ["stage", "throughput PERL", "throughput TRL", "PERL / TRL", "peak MB PERL", "peak MB TRL",
                   "PERL / TRL", "quality PERL", "quality TRL", "goal met"]
        table = [[t["stage"], f"{t['perl_throughput']:.2f}", f"{t['trl_throughput']:.2f}", _ratio_cell(t["speedup"]),
                  f"{t['perl_peak_mb']:.0f}", f"{t['trl_peak_mb']:.0f}", _ratio_cell(t["memory_ratio"]),
                  f"{t['quality_metric']} = {R.fmt(t['perl_quality'])}" + (
                      f", gold = {R.fmt(t['perl_gold'])}" if t.get("perl_gold") is not None else ""),
                  R.fmt(t["trl_quality"]) + (f", gold = {R.fmt(t['trl_gold'])}" if t.get("trl_gold") is not None else ""),
                  "yes" if t["meets_goal"] else "no"] for t in report["trl"]]
        lines += [R.markdown_table(headers, table), "",
                  "Throughput: reward = preference pairs per second; rloo = sampled responses per second "
                  "(prompts × k per RL step, generate + score + update). Peak MB: above a baseline taken after "
                  "importing torch, transformers, peft, trl, datasets and accelerate on both sides.", ""]
        if raw.get("rloo", {}).get("skipped"):
            lines += [f"RLOO not measured: {raw['rloo']['skipped']}.", ""]
        lines += TRL_CONFIGURATION
    lines += ["", "## Rollout engines: `generate` against vLLM", ""]
    raw = report.get("engines_raw") or {"skipped": "not measured"}
    if raw.get("skipped"):
        lines += [f"Not measured: {raw['skipped']}.", ""]
    else:
        headers = ["engine", "RL step s", "sampling s", "samples/s", "scoring s", "update s", "log-prob gap max",
                   "RM reward (last steps)", "gold (last steps)", "step / hf", "samples/s / hf"]
        table = [[r["engine"], f"{r['step_seconds']:.2f}", f"{r['generate_seconds']:.2f}",
                  f"{r['samples_per_second']:.2f}", f"{r['score_seconds']:.2f}", f"{r['update_seconds']:.2f}",
                  f"{r['logprob_gap_max']:.1e}", R.fmt(r["final_reward"]), R.fmt(r["final_gold"]),
                  _ratio_cell(r["step_ratio_to_hf"]), _ratio_cell(r["samples_per_second_ratio_to_hf"])]
                 for r in report["engines"]]
        lines += [R.markdown_table(headers, table), "",
                  "The policy benchmark's LoRA setting, anchor and reward model, once per "
                  "`policy.generation.engine`, each in a fresh process; means over the steps. With vllm the "
                  "update runs beside the idle server.", ""]
    for engine, why in (raw.get("failed") or {}).items():
        lines += [f"{engine} failed: {why}", ""]
    return "\n".join(lines) + "\n"


TRL_CONFIGURATION = [
    "How each side was configured:",
    "",
    "- **Reward model.** PERL: `perl_core.reward.train.train_reward_model` (Bradley-Terry, each pair packed: the "
    "prompt once, then chosen and rejected; length-bucketed batches, LoRA on q/k/v/o with the score head trained). "
    "TRL: `trl.RewardTrainer` "
    "with `peft.LoraConfig(task_type='SEQ_CLS', modules_to_save=['score'])`, same rank/alpha/dropout/targets, "
    "`gradient_checkpointing=False`, `bf16=False`, `disable_dropout=True` (TRL's defaults are True/True/True), "
    "`train_sampling_strategy='group_by_length'` (the Trainer's length-grouped batches, the counterpart of ours; "
    "TRL's default is random batches), AdamW, same learning rate, warm-up and linear decay, max_grad_norm. "
    "TRL joins prompt + response + eos as one string without bos; ours joins token ids with bos. Quality: pairwise accuracy on the same validation pairs, "
    "scored by the same function after training.",
    "- **RLOO.** PERL: `perl_core.policy.stage.train_policy` (RLOO, k samples per prompt, KL to the anchor in the reward, one "
    "backbone: policy adapter, anchor = adapters off, reward adapter + head on the same weights; a prompt's k samples "
    "packed in the reward, anchor and policy forwards). TRL 1.16: "
    "`trl.RLOOTrainer(model=<anchor>, reward_funcs=<callable>, peft_config=LoraConfig(task_type='CAUSAL_LM'))`; this "
    "version takes reward *functions*, so the callable scores with our trained reward model (`RewardScorer`, "
    "adapters merged, a second copy of the weights); `num_generations=k`, `per_device_train_batch_size=prompts×k`, "
    "`max_completion_length`, temperature, top_p, `top_k=0`, `beta=kl_coef`, `num_iterations=1`. Quality: mean RM "
    "reward (and gold-oracle score) of samples on the same validation prompts with the same seed.",
    "",
]
