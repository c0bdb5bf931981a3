"""benchmarks/gpu_check.py: the script a bare GPU machine runs. Here on a tiny shape on the CPU."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_runs_every_workload_on_a_tiny_shape(tmp_path):
    out = tmp_path / "gpu.json"
    report = _module().main(["--shapes", "tiny", "--steps", "1", "--warmup", "0", "--pairs", "2",
                             "--reward-length", "16", "--prompts", "2", "--k", "2", "--prompt-length", "8",
                             "--new-tokens", "4", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = {(r["workload"], r["tuning"]): r for r in report["results"]}
    assert set(rows) == {("reward", "lora"), ("reward", "full"), ("rl", "one_backbone"), ("rl", "full")}
    # LoRA trains a small fraction: rank-4 adapters on 4 projections + the 32-wide score head
    assert rows[("reward", "lora")]["trainable_params"] < rows[("reward", "full")]["trainable_params"] / 5
    assert rows[("rl", "one_backbone")]["trainable_params"] < rows[("rl", "full")]["trainable_params"] / 5
    assert [r["workload"] for r in report["ratios"]] == ["reward", "rl"]


def test_ratios_divide_perl_by_full():
    results = [
        {"workload": "reward", "shape": "s", "tuning": "lora", "peak_memory_mb": 50.0, "step_seconds": 1.0,
         "tokens_per_second": 300.0},
        {"workload": "reward", "shape": "s", "tuning": "full", "peak_memory_mb": 200.0, "step_seconds": 4.0,
         "tokens_per_second": 100.0},
        {"workload": "rl", "shape": "s", "tuning": "one_backbone", "peak_memory_mb": None, "step_seconds": 3.0,
         "tokens_per_second": 10.0},
    ]
    (row,) = _module().ratios(results)  # rl has no full run: no ratio
    assert (row["memory_ratio"], row["step_time_ratio"], row["throughput_ratio"]) == (0.25, 0.25, 3.0)
