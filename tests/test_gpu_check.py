"""benchmarks/gpu_check.py: the script a bare GPU machine runs, here in an environment that has only
what such a machine has (torch, transformers, peft, accelerate and their own dependencies) plus the
wheels the script names as carried, on a tiny shape on the CPU."""
import importlib.metadata as md
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_MACHINE = ("torch", "transformers", "peft", "accelerate")


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _with_dependencies(roots) -> set[str]:
    """The distributions `roots` install: each one's non-extra requirements, followed through."""
    seen, todo = set(), list(roots)
    while todo:
        name = _norm(todo.pop())
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:  # an optional or platform-only requirement
            continue
        seen.add(name)
        todo += [re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0] for req in dist.requires or [] if "extra ==" not in req]
    return seen


def _gpu_machine_python(dest: Path) -> Path:
    """A virtualenv holding only the GPU machine's distributions (linked from this one's site-packages)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    site = next(dest.glob("lib/python*/site-packages"))
    for name in sorted(_with_dependencies(GPU_MACHINE + _module().CARRIED)):
        dist = md.distribution(name)
        base = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if (base / top).exists() and not (site / top).exists() and top != "__pycache__" and not top.endswith(".pth"):
                (site / top).symlink_to(base / top)
    return dest / "bin" / "python"


def test_gpu_check_runs_the_reports_workloads_with_only_what_a_gpu_machine_has(tmp_path):
    python = _gpu_machine_python(tmp_path / "gpu-env")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    for absent in ("mlflow", "prefect", "dvc", "datasets", "trl"):  # the environment is what it claims
        probe = subprocess.run([str(python), "-c", f"import {absent}"], capture_output=True, env=env)
        assert probe.returncode != 0, f"{absent} importable in the GPU-machine stand-in"
    out = tmp_path / "gpu.json"
    done = subprocess.run([str(python), str(ROOT / "benchmarks" / "gpu_check.py"), "--quick", "--shapes", "llama-micro",
                           "--set", "data.synthetic.n_prompts=200", "--out", str(out), "--work-dir", str(tmp_path / "w")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["workload"]: r for r in report["results"]}
    assert set(rows) == {"reward", "rl"} and not any("error" in r for r in rows.values()), report["results"]
    # the report's own workloads ran: their settings, their result fields
    assert set(rows["reward"]["settings"]) == {"lora", "full"} and set(rows["rl"]["settings"]) == {"lora", "full"}
    assert rows["rl"]["settings"]["lora"]["layout"] == "one backbone"
    assert rows["rl"]["settings"]["full"]["layout"] == "separate policy, anchor, reward model"
    for row in rows.values():
        assert 0 < row["summary"]["trainable_param_ratio"] < 0.5
        assert row["summary"]["step_time_ratio"] > 0 and row["summary"]["memory_ratio_basis"]


def test_shapes_are_the_public_models():
    """SmolLM2-135M's and Qwen2.5-0.5B's parameter counts, from the presets (random weights, no tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from perl_core.modeling import SCRATCH_PRESETS

    for shape, params in (("smollm2-135m", 134_515_008), ("qwen2.5-0.5b", 494_032_768)):
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**SCRATCH_PRESETS[shape]))
        count = sum(p.numel() for p in model.parameters())
        # Qwen2's q/k/v biases (absent from a Llama) are the only difference
        bias = 0 if shape == "smollm2-135m" else 24 * (896 + 2 * 128)
        assert count + bias == params, (shape, count)
