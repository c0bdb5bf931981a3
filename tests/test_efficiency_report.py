"""`perl-rlhf report efficiency --quick`: the report's SHAPE (files, keys, rows), never its numbers."""
import json

import pytest
from typer.testing import CliRunner

from flows.cli import app
from bench.trl_compare import trl_available


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a dozen fresh processes; on a loaded shared box this exceeds the default 600 s
def test_quick_efficiency_report_is_well_formed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # from any folder, not only the repository's top
    out = tmp_path / "report"
    result = CliRunner().invoke(app, [
        "report", "efficiency", "--quick", "--out", str(out),
        "--set", f"data.data_dir={tmp_path / 'data'}", "--set", f"artifacts_dir={tmp_path / 'artifacts'}",
        "--set", "data.synthetic.n_prompts=120"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    for name in ("efficiency_report.json", "efficiency_report.md", "quality_vs_rank.png", "memory_bars.png",
                 "step_time_bars.png", "reward_efficiency.json", "policy_efficiency.json"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "efficiency_report.json").read_text())
    assert report["quick"] is True
    settings = [(r["stage"], r["setting"].split(" (")[0]) for r in report["rows"]]
    assert settings == [("reward", "full"), ("reward", "LoRA r=8"), ("policy", "full"), ("policy", "PERL LoRA r=8")]
    assert [r["rank"] for r in report["rank_sweep"]] == [1, 8]
    for row in report["rows"] + report["rank_sweep"]:
        for key in ("trainable_params", "peak_memory_mb", "step_seconds", "params_ratio", "memory_ratio",
                    "step_time_ratio"):
            assert isinstance(row[key], (int, float)), (row["setting"], key)
    # full tuning is its own reference; LoRA trains a sliver of the parameters at every rank
    assert report["rows"][0]["params_ratio"] == 1.0
    assert all(r["params_ratio"] < 0.2 for r in report["rank_sweep"])
    # llama-micro by hand: 2 layers x 4 projections x (A: r x 64 + B: 64 x r) + the 1 x 64 score head
    assert [r["trainable_params"] for r in report["rank_sweep"]] == [2 * 4 * 128 * 1 + 64, 2 * 4 * 128 * 8 + 64]
    md = (out / "efficiency_report.md").read_text()
    assert "Quick mode" in md and "| reward | LoRA r=1 |" in md
    if trl_available():
        assert [t["stage"] for t in report["trl"]] == ["reward", "rloo"]
        for t in report["trl"]:
            assert t["perl_throughput"] > 0 and t["trl_throughput"] > 0 and isinstance(t["meets_goal"], bool)
            # both libraries train the very same adapter (and head): identical trainable parameter counts
            assert t["perl_trainable_params"] == t["trl_trainable_params"]
        assert "Side by side with Hugging Face TRL" in md and "RLOOTrainer" in md
    else:
        assert "Not measured: trl is not installed" in md


def test_reward_rows_carry_the_accuracy_interval_and_the_paired_delta():
    """The quality column from per-pair validation scores: LoRA 7 of 10 pairs, full 8 of 10, on the same pairs."""
    from bench.report import reward_rows, report_markdown

    def setting(margins, params):
        pairs = [{"row": i + 1, "id": None, "key": f"k{i}", "chosen": float(m), "rejected": 0.0}
                 for i, m in enumerate(margins)]
        return {"trainable_params": params, "memory": {"peak_rss_mb": 100.0, "ratio_basis": "peak_rss_mb"},
                "median_step_seconds": 0.1, "validation_metric": "pairwise_accuracy",
                "validation_value": sum(m > 0 for m in margins) / len(margins),
                "validation_rows": {"pairwise": pairs}}

    full = setting([1, 1, 1, 1, 1, 1, 1, 1, -1, -1], 1000)
    lora = setting([1, 1, 1, 1, 1, 1, 1, -1, -1, -1], 10)
    lora["config"] = {"reward": {"lora": {"rank": 8}}}
    bench = {"settings": {"full": full, "lora": lora}}
    full_row, lora_row = reward_rows(bench)
    assert full_row["quality_ci_low"] < 0.8 < full_row["quality_ci_high"] and "quality_delta_ci_low" not in full_row
    assert lora_row["quality_delta"] == pytest.approx(-0.1)
    # the pairs differ only where LoRA is wrong and full right: the paired interval lies in [-0.4, 0]
    assert -0.4 <= lora_row["quality_delta_ci_low"] < -0.1 < lora_row["quality_delta_ci_high"] <= 0.0
    report = {"command": "perl-rlhf report efficiency", "resumed": False, "seconds": 60.0, "quick": False,
              "machine": {"platform": "test", "cpu_count": 2, "torch_threads": 2,
                          "load_average_1_5_15min": {"start": [0, 0, 0], "end": [0, 0, 0]}},
              "rows": [full_row, lora_row], "rank_sweep": [], "ranks_requested": [], "benchmarks": {},
              "trl_raw": {"skipped": "--no-trl"}, "trl": []}
    md = report_markdown(report)
    lo, hi = lora_row["quality_delta_ci_low"], lora_row["quality_delta_ci_high"]
    assert f"| -0.100 [{lo:+.3f}, {hi:+.3f}] |" in md
    # results saved before per-pair scores were kept: the point values alone, as before
    del full["validation_rows"], lora["validation_rows"]
    assert "quality_ci_low" not in reward_rows(bench)[1]


# ---------------------------------------------------------------- one configuration, every workload
MEMORY = {"peak_rss_mb": 10.0, "baseline_rss_mb": 2.0, "peak_above_baseline_mb": 8.0, "cuda_peak_allocated_mb": None,
          "ratio_basis": "peak_above_baseline_mb"}


@pytest.fixture
def workloads(monkeypatch, tmp_path):
    """Every workload the report starts, recorded instead of run: (target, the config it would train)."""
    from perl_core import modeling
    from bench import policy, report, reward, trl_compare
    from perl_core.config import PerlConfig

    calls = []

    def run_isolated(target, kwargs, timeout=None):
        cfg = PerlConfig.model_validate(kwargs["config"])
        calls.append((target.split(":")[1], cfg))
        return {"tuning": "lora", "layout": "one backbone", "trainable_params": 10, "total_params": 100,
                "resident_params": 100, "memory": MEMORY, "median_step_seconds": 1.0, "examples_per_second": 8.0,
                "samples_per_second": 8.0, "workload_peak_mb": 8.0, "validation_metric": "pairwise_accuracy",
                "validation_value": 0.5, "validation_rm_reward": 0.1, "backbone": cfg.reward.backbone.name,
                **{f"median_{part}_seconds": 0.3 for part in ("generate", "score", "update")},
                "median_tokens_per_second": 100.0}

    def prepare_artifacts(backbone_dir, out, lora_rank=8, seed=0):
        for name in ("anchor", "reward_model"):
            (out / name).mkdir(parents=True, exist_ok=True)
            (out / name / "manifest.json").write_text("{}")
        return out / "anchor", out / "reward_model"

    for module in (policy, report, reward):
        monkeypatch.setattr(module, "run_isolated", run_isolated)
    monkeypatch.setattr(policy, "prepare_artifacts", prepare_artifacts)
    monkeypatch.setattr(modeling, "resolve_backbone", lambda backbone, artifacts_dir, corpus=None: "/stand-in/backbone")
    monkeypatch.setattr(trl_compare, "trl_version", lambda: "0.0-test")
    monkeypatch.chdir(tmp_path)  # any working directory: nothing is looked up beside the source
    return calls


def test_every_workload_of_the_report_trains_the_settings_given(workloads, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(app, [
        "report", "efficiency", "--quick", "--out", str(out), "--reward-steps", "7",
        "--set", "data.synthetic.n_prompts=40", "--set", "reward.lora.rank=4", "--set", "reward.lora.dropout=0.05",
        "--set", "policy.kl_coef=0.3"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    targets = [t for t, _ in workloads]
    assert targets == ["reward_workload"] * 2 + ["policy_workload"] * 2 + ["reward_workload"] * 2 + [
        "ours_reward_workload", "trl_reward_workload", "ours_rloo_workload", "trl_rloo_workload"]
    for _, cfg in workloads:  # every --set reaches every workload, and the data is where the command ran
        assert (cfg.policy.kl_coef, cfg.reward.lora.dropout, cfg.data.data_dir) == (0.3, 0.05, "data")
    trained = {}
    for target, cfg in workloads:
        trained.setdefault(target, []).append(cfg)
    lora, full, sweep_1, sweep_8 = trained["reward_workload"]
    assert (lora.reward.tuning, lora.reward.lora.rank, full.reward.tuning) == ("lora", 4, "full")
    assert lora.reward.train.learning_rate != full.reward.train.learning_rate  # full tuning's own step size
    assert [sweep_1.reward.lora.rank, sweep_8.reward.lora.rank] == [1, 8]
    for cfg in (lora, sweep_1, sweep_8):  # the sweep is the LoRA setting at another rank, alpha / r kept
        assert cfg.reward.lora.alpha / cfg.reward.lora.rank == 16 / 4
        assert cfg.model_dump(exclude={"reward": {"lora": {"rank", "alpha"}}}) == \
            lora.model_dump(exclude={"reward": {"lora": {"rank", "alpha"}}})
    assert all(cfg.reward.train.max_steps == cfg.reward.train.eval_every == 7 for cfg in (lora, full))
    # TRL's side and ours train the benchmarks' LoRA settings exactly as measured above
    assert trained["ours_reward_workload"] == trained["trl_reward_workload"] == [lora]
    policy_full, policy_lora = trained["policy_workload"]
    assert (policy_full.policy.tuning, policy_lora.policy.tuning) == ("full", "lora")
    assert trained["ours_rloo_workload"] == trained["trl_rloo_workload"] == [policy_lora]
    report = json.loads((out / "efficiency_report.json").read_text())
    assert [r["setting"].split(" (")[0] for r in report["rows"]][:2] == ["full", "LoRA r=4"]
    assert [r["rank"] for r in report["rank_sweep"]] == [1, 8]
    assert report["benchmarks"]["reward"]["settings"]["lora"]["config"] == lora.model_dump(mode="json")


def test_reward_benchmark_prepares_its_data(workloads, tmp_path):
    from bench.reward import reward_benchmark

    bench = reward_benchmark("default", ["data.synthetic.n_prompts=40", f"data.data_dir={tmp_path / 'fresh'}"],
                             quick=True)
    assert (tmp_path / "fresh" / "synthetic" / "pairwise" / "train.jsonl").stat().st_size > 0
    assert set(bench["settings"]) == {"lora", "full"}


def test_resident_memory_follows_an_allocation():
    from bench.isolation import _rss_bytes

    before = _rss_bytes()
    block = b"\x01" * (64 * 1024 * 1024)  # written, so every page is resident
    grown = _rss_bytes() - before
    del block
    assert 56 * 1024 * 1024 < grown < 96 * 1024 * 1024


# ---------------------------------------------------------------- rows and rendering of a hand-made result set
def _result(params, peak_above, peak_rss, step, **extra) -> dict:
    return {"trainable_params": params, "median_step_seconds": step,
            "memory": {"peak_rss_mb": peak_rss, "peak_above_baseline_mb": peak_above,
                       "ratio_basis": "peak_above_baseline_mb"}, **extra}


def test_cost_summary_and_tuning_settings_by_hand():
    from bench.isolation import as_overrides, cost_summary, tuning_settings

    lora = _result(10, 80.0, 380.0, 0.2, median_generate_seconds=0.3)
    full = _result(1000, 200.0, 500.0, 0.4, median_generate_seconds=0.6)
    assert cost_summary(lora, full, parts=("generate",)) == {
        "memory_ratio": 0.4, "memory_ratio_basis": "peak_above_baseline_mb", "absolute_peak_rss_ratio": 0.76,
        "step_time_ratio": 0.5, "generate_time_ratio": 0.5, "trainable_param_ratio": 0.01}
    settings = tuning_settings("default", ["reward.train.max_steps=5"], ["reward.train.learning_rate=0.01"],
                               "reward", 1e-4, ("full", "lora"))
    assert list(settings) == ["full", "lora"]
    full_cfg, lora_cfg = settings["full"], settings["lora"]
    assert (full_cfg.reward.tuning, full_cfg.reward.train.learning_rate) == ("full", 1e-4)
    assert (lora_cfg.reward.tuning, lora_cfg.reward.train.learning_rate) == ("lora", 0.01)
    assert lora_cfg.reward.train.eval_every == lora_cfg.reward.train.checkpoint_every == 5  # once, at the end
    assert as_overrides({"a.b": 3, "c": None, "d": "x"}) == ["a.b=3", "d=x"]


def test_report_rows_and_markdown_from_a_hand_made_result_set():
    from bench.report import policy_rows, report_markdown, reward_rows, target_verdict, trl_rows

    reward_bench = {
        "settings": {
            "full": _result(1000, 200.0, 500.0, 0.4, validation_metric="pairwise_accuracy", validation_value=0.80),
            "lora": _result(10, 80.0, 380.0, 0.2, validation_metric="pairwise_accuracy", validation_value=0.78,
                            config={"reward": {"lora": {"rank": 8}}})},
        "summary": {"memory_ratio": 0.4, "memory_ratio_basis": "peak_above_baseline_mb",
                    "absolute_peak_rss_ratio": 0.76, "step_time_ratio": 0.5, "trainable_param_ratio": 0.01,
                    "validation_metric": "pairwise_accuracy", "validation_gap_points": -2.0,
                    "targets": {"memory_ratio": 0.5, "step_time_ratio": 0.65, "validation_gap_points": -1.0}}}
    policy_bench = {
        "settings": {
            "full": _result(3000, 600.0, 900.0, 2.0, layout="separate policy, anchor, reward model"),
            "lora": _result(30, 240.0, 540.0, 1.8, layout="one backbone", config={"policy": {"lora": {"rank": 4}}})},
        "summary": {"memory_ratio": 0.4, "step_time_ratio": 0.9, "trainable_param_ratio": 0.01,
                    "targets": {"memory_ratio": 0.5, "step_time_ratio": 0.85}}}
    rows = reward_rows(reward_bench) + policy_rows(policy_bench)
    assert [(r["stage"], r["setting"]) for r in rows] == [
        ("reward", "full"), ("reward", "LoRA r=8"), ("policy", "full (separate policy, anchor, reward model)"),
        ("policy", "PERL LoRA r=4 (one backbone)")]
    assert [(r["params_ratio"], r["memory_ratio"], r["step_time_ratio"]) for r in rows] == [
        (1.0, 1.0, 1.0), (0.01, 0.4, 0.5), (1.0, 1.0, 1.0), (0.01, 0.4, 0.9)]
    assert [r["peak_memory_mb"] for r in rows] == [200.0, 80.0, 600.0, 240.0]  # the ratio basis, not the RSS
    assert [r["quality"] for r in rows] == [0.80, 0.78, None, None]
    assert rows[0]["quality_delta"] == 0.0 and rows[1]["quality_delta"] == pytest.approx(-0.02)
    assert rows[2]["quality_delta"] is None

    trl_raw = {"trl_version": "9.9",
               "reward": {"perl": {"examples_per_second": 30.0, "median_step_seconds": 0.5, "workload_peak_mb": 100.0,
                                   "trainable_params": 10, "validation_metric": "pairwise_accuracy",
                                   "validation_value": 0.78},
                          "trl": {"examples_per_second": 20.0, "median_step_seconds": 0.75, "workload_peak_mb": 125.0,
                                  "trainable_params": 10, "validation_metric": "pairwise_accuracy",
                                  "validation_value": 0.77}},
               "rloo": {"perl": {"samples_per_second": 10.0, "median_step_seconds": 3.2, "workload_peak_mb": 90.0,
                                 "trainable_params": 20, "validation_rm_reward": 0.25},
                        "trl": {"samples_per_second": 9.0, "median_step_seconds": 3.6, "workload_peak_mb": 80.0,
                                "trainable_params": 20, "validation_rm_reward": 0.5}}}
    trl = trl_rows(trl_raw)
    # goal: >= 1.25x TRL's throughput and no more memory; rloo misses on both counts
    assert [(t["stage"], t["speedup"], t["memory_ratio"], t["meets_goal"]) for t in trl] == [
        ("reward", 1.5, 0.8, True), ("rloo", pytest.approx(10 / 9), 1.125, False)]

    report = {"command": "perl-rlhf report efficiency --out r", "resumed": False, "seconds": 90.0, "quick": False,
              "machine": {"platform": "TestOS", "cpu_count": 4, "torch_threads": 2,
                          "load_average_1_5_15min": {"start": [0.5, 0, 0], "end": [1.25, 0, 0]}},
              "rows": rows, "rank_sweep": [], "ranks_requested": [1, 8],
              "benchmarks": {"reward": reward_bench, "policy": policy_bench}, "trl_raw": trl_raw, "trl": trl}
    lines = report_markdown(report).splitlines()
    assert lines[2].startswith("Produced by `perl-rlhf report efficiency --out r` in 1.5 min on TestOS (4 CPUs, "
                               "2 torch threads; 1-min load average 0.5 at the start, 1.2 at the end).")
    table = lines[lines.index("## PERL against full tuning") + 2:][:6]
    assert table == [
        "| stage | setting | trainable params | × full | peak MB | × full | step s | × full | quality | Δ vs full |",
        "|---|---|---|---|---|---|---|---|---|---|",
        "| reward | full | 1,000 | 1.00× | 200 | 1.00× | 0.400 | 1.00× | pairwise_accuracy = 0.800 | +0.000 |",
        "| reward | LoRA r=8 | 10 | 0.01× | 80 | 0.40× | 0.200 | 0.50× | pairwise_accuracy = 0.780 | -0.020 |",
        "| policy | full (separate policy, anchor, reward model) | 3,000 | 1.00× | 600 | 1.00× | 2.000 | 1.00× "
        "| not measured | — |",
        "| policy | PERL LoRA r=4 (one backbone) | 30 | 0.01× | 240 | 0.40× | 1.800 | 0.90× | not measured | — |",
    ]
    assert "Rank sweep: r = 1, 8 not measured in this run." in lines
    assert "- reward benchmark: memory_ratio = 0.400 (target ≤ 0.5: met); absolute_peak_rss_ratio = 0.760; " \
           "step_time_ratio = 0.500 (target ≤ 0.65: met); trainable_param_ratio = 0.010; " \
           "validation_gap_points = -2.000 (target ≥ -1: missed)" in lines
    assert "- policy benchmark: memory_ratio = 0.400 (target ≤ 0.5: met); step_time_ratio = 0.900 " \
           "(target ≤ 0.85: missed); trainable_param_ratio = 0.010" in lines
    trl_table = lines[lines.index("## Side by side with Hugging Face TRL") + 6:][:2]
    assert trl_table == [
        "| reward | 30.00 | 20.00 | 1.50× | 100 | 125 | 0.80× | pairwise_accuracy = 0.780 | 0.770 | yes |",
        "| rloo | 10.00 | 9.00 | 1.11× | 90 | 80 | 1.12× | validation_rm_reward = 0.250 | 0.500 | no |",
    ]
    assert target_verdict("memory_ratio", float("nan"), 0.5) == "target ≤ 0.5: not measured"
    assert target_verdict("validation_gap_points", -1.0, -1.0) == "target ≥ -1: met"  # the bound itself meets it


def test_memory_timeline_puts_each_sample_in_its_phase():
    from bench.isolation import MemoryTimeline, memory_report

    timeline = MemoryTimeline()
    for t, rss in [(0.0, 500), (1.0, 900), (2.0, 300)]:  # loading: 900
        timeline.add(t, rss * MiB)
    timeline.mark_step(now=2.6, seconds=1.1, rss=400 * MiB)  # step 1 ran 1.5-2.6: the sample at 2.0 and 400 now
    timeline.add(2.8, 350 * MiB)
    timeline.mark_step(now=3.1, seconds=0.2, rss=300 * MiB, exact=650 * MiB)  # step 2: a transient no sample saw
    timeline.add(4.0, 700 * MiB)  # after the last step (evaluation)
    timeline.add(5.0, 500 * MiB, exact=800 * MiB)
    assert timeline.phase_peaks() == {"before_steps": 900 * MiB, "steps": 650 * MiB, "after_steps": 800 * MiB}
    assert timeline.process_peak == 900 * MiB
    mem = memory_report(100 * MiB, timeline)
    assert mem["steps_peak_above_baseline_mb"] == 550.0
    assert mem["phase_peaks_above_baseline_mb"] == {"before_steps": 800.0, "steps": 550.0, "after_steps": 700.0}
    assert mem["peak_rss_mb"] >= 900.0  # the whole run's peak, whatever the kernel's mark says after a reset
    assert mem["ratio_basis"] in ("steps_peak_above_baseline_mb", "cuda_peak_allocated_mb")
    no_steps = MemoryTimeline()  # a workload that marks no steps: the whole run's peak is the basis
    no_steps.add(0.0, 300 * MiB)
    assert no_steps.phase_peaks() == {"before_steps": 300 * MiB, "steps": None, "after_steps": None}
    assert memory_report(100 * MiB, no_steps)["ratio_basis"] in ("peak_above_baseline_mb", "cuda_peak_allocated_mb")


MiB = 1024 * 1024


def test_every_named_workload_exists():
    """run_isolated takes workloads by name: each the report names resolves to a function."""
    import importlib

    from bench.report import TRL_WORKLOADS

    for target in TRL_WORKLOADS.values():
        module, name = target.split(":")
        assert callable(getattr(importlib.import_module(module), name)), target
