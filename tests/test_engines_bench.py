"""The rollout-engines benchmark (`bench.engines`) and its part of the efficiency report: what a row
holds, computed by hand from a stage's step metrics; vllm / hf ratios; the part skipped, and said
so, without a vLLM environment."""
import pytest

from bench import engines as E
from perl_core.config import build_config

# three steps' metrics as the stage reports them (hand values)
STEPS = [{"rl/step_seconds": 10.0, "rl/generate_seconds": 6.0, "rl/score_seconds": 2.0, "rl/update_seconds": 2.0,
          "rl/logprob_gap": 1e-6, "rl/logprob_gap_max": 1e-5, "rl/reward": 0.1, "rl/gold_score": 0.3},
         {"rl/step_seconds": 12.0, "rl/generate_seconds": 8.0, "rl/score_seconds": 2.0, "rl/update_seconds": 2.0,
          "rl/logprob_gap": 3e-6, "rl/logprob_gap_max": 4e-5, "rl/reward": 0.2, "rl/gold_score": 0.4},
         {"rl/step_seconds": 14.0, "rl/generate_seconds": 10.0, "rl/score_seconds": 2.0, "rl/update_seconds": 2.0,
          "rl/logprob_gap": 2e-6, "rl/logprob_gap_max": 2e-5, "rl/reward": 0.6, "rl/gold_score": 0.2}]


def test_a_workload_row_summarises_the_stage_steps(monkeypatch, tmp_path):
    import perl_core.policy.stage

    seen = {}

    def fake_train_policy(cfg, out, anchor, rm, callback):
        seen.update(engine=cfg.policy.generation.engine, out=out)
        for step, metrics in enumerate(STEPS, 1):
            callback(metrics, step)
            callback({"eval/reward": 1.0}, step)  # metrics without a step time are not steps

    monkeypatch.setattr(perl_core.policy.stage, "train_policy", fake_train_policy)
    (tmp_path / "policy_vllm").mkdir()
    (tmp_path / "policy_vllm" / "old.txt").write_text("an earlier run")
    config = build_config({"policy": {"k": 2, "train": {"batch_size": 4}}}).model_dump(mode="json")
    row = E.engine_workload(config, "anchor", "rm", "vllm", str(tmp_path), window=2)
    assert seen == {"engine": "vllm", "out": tmp_path / "policy_vllm"}
    assert not (tmp_path / "policy_vllm").exists()  # every run trains from the anchor, not over an old one
    assert row["steps"] == 3 and row["samples_per_step"] == 8
    assert row["step_seconds"] == pytest.approx(12.0) and row["generate_seconds"] == pytest.approx(8.0)
    assert row["samples_per_second"] == pytest.approx(8 / 8.0)
    assert row["logprob_gap"] == pytest.approx(2e-6) and row["logprob_gap_max"] == 4e-5
    assert row["first_step_seconds"] == 10.0
    assert row["final_reward"] == pytest.approx(0.4) and row["final_gold"] == pytest.approx(0.3)  # the last 2 steps


def test_rows_and_the_report_section_from_hand_made_results():
    from bench.report import report_markdown

    hf = {"step_seconds": 10.0, "generate_seconds": 5.0, "samples_per_second": 3.2, "score_seconds": 2.0,
          "update_seconds": 3.0, "logprob_gap_max": 4e-5, "final_reward": 0.1, "final_gold": 0.3}
    vllm = dict(hf, step_seconds=20.0, generate_seconds=12.5, samples_per_second=1.28)
    rows = E.engine_rows({"engines": {"hf": hf, "vllm": vllm}})
    assert [(r["engine"], r["step_ratio_to_hf"], r["samples_per_second_ratio_to_hf"]) for r in rows] == [
        ("hf", 1.0, 1.0), ("vllm", 2.0, pytest.approx(0.4))]
    assert E.engine_rows({"engines": {"vllm": vllm}})[0]["step_ratio_to_hf"] is None

    base = {"command": "perl-rlhf report efficiency --engines", "resumed": False, "seconds": 60.0, "quick": False,
            "machine": {"platform": "TestOS", "cpu_count": 2, "torch_threads": 2,
                        "load_average_1_5_15min": {"start": [0.5, 0, 0], "end": [1.0, 0, 0]}},
            "rows": [], "rank_sweep": [], "ranks_requested": [], "benchmarks": {"reward": None, "policy": None},
            "trl_raw": {"skipped": "--no-trl"}, "trl": []}
    lines = report_markdown({**base, "engines_raw": {"engines": {"hf": hf, "vllm": vllm}}, "engines": rows}).splitlines()
    table = lines[lines.index("## Rollout engines: `generate` against vLLM") + 4:][:2]
    assert table == ["| hf | 10.00 | 5.00 | 3.20 | 2.00 | 3.00 | 4.0e-05 | 0.100 | 0.300 | 1.00× | 1.00× |",
                     "| vllm | 20.00 | 12.50 | 1.28 | 2.00 | 3.00 | 4.0e-05 | 0.100 | 0.300 | 2.00× | 0.40× |"]
    failed = report_markdown({**base, "engines_raw": {"engines": {"hf": hf}, "failed": {"vllm": "head size 16"}},
                              "engines": E.engine_rows({"engines": {"hf": hf}})})
    assert "vllm failed: head size 16" in failed and "| hf | 10.00 |" in failed
    skipped = report_markdown({**base, "engines_raw": {"skipped": "without --engines"}, "engines": []})
    assert "Not measured: without --engines." in skipped


def test_without_a_vllm_environment_the_comparison_is_skipped_and_says_how(monkeypatch):
    import perl_core.policy.vllm_engine

    monkeypatch.setattr(perl_core.policy.vllm_engine, "default_python", lambda: None)
    config = build_config({}).model_dump(mode="json")
    result = E.engines_comparison(config, "anchor", "rm", "out")
    assert result == {"skipped": "no vLLM environment: `make vllm-env` builds it "
                                 "(or set policy.generation.vllm.python / .url)"}
    served = build_config({"policy": {"generation": {"vllm": {"url": "http://gpu-box:8000"}}}}).model_dump(mode="json")
    assert E.vllm_missing(served) is None


def test_an_engine_that_fails_is_named_and_the_other_kept(monkeypatch):
    row = {"step_seconds": 10.0, "generate_seconds": 5.0, "samples_per_second": 3.2, "score_seconds": 2.0,
           "update_seconds": 3.0, "stage_seconds": 70.0}

    def fake_run(target, kwargs):
        if kwargs["engine"] == "vllm":
            raise RuntimeError("benchmark setting failed (exit 1):\nTraceback ...\nValueError: head size 16 is not supported")
        return row

    monkeypatch.setattr(E, "run_isolated", fake_run)
    served = build_config({"policy": {"generation": {"vllm": {"url": "http://gpu-box:8000"}}}}).model_dump(mode="json")
    result = E.engines_comparison(served, "anchor", "rm", "out", log=lambda msg: None)
    assert result == {"engines": {"hf": row}, "failed": {"vllm": "ValueError: head size 16 is not supported"}}
