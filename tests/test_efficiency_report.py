"""`perl-rlhf report efficiency --quick`: the report's SHAPE (files, keys, rows), never its numbers."""
import json

import pytest
from typer.testing import CliRunner

from flows.cli import app
from perl_core.efficiency_trl import trl_available


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a dozen fresh processes; on a loaded shared box this exceeds the default 600 s
def test_quick_efficiency_report_is_well_formed(tmp_path):
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
    from perl_core.efficiency_report import reward_rows, report_markdown

    def setting(margins, params):
        pairs = [{"row": i + 1, "id": None, "key": f"k{i}", "chosen": float(m), "rejected": 0.0}
                 for i, m in enumerate(margins)]
        return {"trainable_params": params, "memory": {"peak_rss_mb": 100.0, "ratio_basis": "peak_rss_mb"},
                "median_step_seconds": 0.1, "validation_metric": "pairwise_accuracy",
                "validation_value": sum(m > 0 for m in margins) / len(margins),
                "validation_rows": {"pairwise": pairs}}

    full = setting([1, 1, 1, 1, 1, 1, 1, 1, -1, -1], 1000)
    lora = setting([1, 1, 1, 1, 1, 1, 1, -1, -1, -1], 10)
    bench = {"settings": {"full": full, "lora": lora}, "args": {"lora_rank": 8}}
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
