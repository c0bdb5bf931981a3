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
