"""The pipeline under Prefect's test harness against a real `mlflow server` process.

With tiny fake stages (same contracts as perl_core): caching and what a config change re-runs,
the promotion gate both ways, rollback, retries on transient errors only, the unreachable-server
error. With the real stages on `configs/tiny.yaml`: `perl-rlhf run` end to end, and the registered
models loaded back through MLflow's pyfunc API and through the project's own loaders.
"""
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx

import pytest

pytest.importorskip("prefect")
import mlflow  # noqa: E402
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows import pipeline, registry, tasks  # noqa: E402
from flows.pipeline import perl_pipeline  # noqa: E402
from perl_core.artifacts import StageResult, write_manifest  # noqa: E402
from perl_core.config import load_config  # noqa: E402
from perl_core.errors import UserError  # noqa: E402

CALLS: list[str] = []


# ---------------------------------------------------------------- fake stages (same contracts as perl_core)
def fake_prepare(cfg):
    CALLS.append("data")
    d = Path(cfg.data.data_dir) / (cfg.data.name or cfg.data.source)
    d.mkdir(parents=True, exist_ok=True)
    card = json.dumps({"n_prompts": cfg.data.synthetic.n_prompts, "seed": cfg.data.synthetic.seed})
    (d / "card.json").write_text(card)
    (d / "card.md").write_text(f"# data card\n\n{card}\n")
    Path("data.dvc").write_text(hashlib.md5(card.encode()).hexdigest())
    return StageResult(d, {"rows": 12.0})


def fake_data_version(repo_root="."):
    md5 = Path(repo_root, "data.dvc").read_text()
    return {"md5": md5, "git_rev": "fakegit", "matches_working_copy": True}


def _steps(callback, n=3):
    for step in range(1, n + 1):
        callback({"train/loss": 1.0 / step}, step)


def fake_anchor(cfg, out_dir, callback, resume):
    CALLS.append("anchor")
    _steps(callback)
    write_manifest(out_dir, kind="anchor", base_model="scratch:llama-micro", tuning="full", config={})
    return StageResult(Path(out_dir), {"trainable_params": 100, "total_params": 100, "steps": 3, "seconds": 0.1})


def fake_reward(cfg, out_dir, callback, resume, base_model=None):
    CALLS.append("reward_model")
    _steps(callback)
    write_manifest(out_dir, kind="reward_model", base_model=str(base_model), tuning="lora", config={})
    return StageResult(Path(out_dir), {"trainable_params": 10, "total_params": 110, "train_seconds": 0.1})


def fake_policy(cfg, out_dir, anchor_dir, reward_model_dir, callback, resume, samples_callback):
    CALLS.append("policy")
    _steps(callback, 4)
    for step in (2, 4):
        samples_callback([{"prompt": "p", "response": f"r{step}", "reward": step / 10, "gold_score": 0.5}], step)
    write_manifest(out_dir, kind="policy", base_model=str(anchor_dir), tuning="lora", config={},
                   anchor=str(anchor_dir), reward_model=str(reward_model_dir))
    return StageResult(Path(out_dir), {"trainable_params": 8, "total_params": 108, "seconds": 0.1})


def fake_eval_reward(cfg, reward_model_dir, out_dir):
    CALLS.append("evaluate_reward_model")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "reward_eval.md").write_text("# RM\n")
    return {"pairwise_accuracy": 0.75}


def fake_eval_policy(cfg, policy_dir, anchor_dir, reward_model_dir, out_dir):
    CALLS.append("evaluate_policy")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "policy_eval.md").write_text("# policy\n")
    # a smaller KL coefficient "trains" a better policy: lets a test make a worse candidate on purpose
    return {"gold_score_mean": 1.0 - cfg.policy.kl_coef, "anchor_gold_score_mean": 0.4}


# where each stage's perl_core function is defined (the tasks import it from there when they run)
FAKES = {"perl_core.data.prepare_dataset": fake_prepare, "perl_core.data.versioning.data_version": fake_data_version,
         "perl_core.sft.train_anchor": fake_anchor, "perl_core.reward.stage.train_reward_stage": fake_reward,
         "perl_core.policy.stage.train_policy": fake_policy,
         "perl_core.eval.reward.evaluate_reward_model": fake_eval_reward,
         "perl_core.eval.policy.evaluate_policy": fake_eval_policy}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A real `mlflow server` process (SQLite backend in tmp, proxied artifacts) and Prefect's test
    harness, started side by side (each takes ~10-20 s on a busy 2-core box)."""
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        with prefect_test_harness(server_startup_timeout=180):
            deadline = time.time() + 180
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None and time.time() < deadline, (root / "server.log").read_text()[-2000:]
                time.sleep(1)
            yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture
def workdir(tmp_path, monkeypatch, servers):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", servers)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    for target, fn in FAKES.items():
        monkeypatch.setattr(target, fn)
    # other areas edit perl_core while these tests run; pin the code version so keys only follow inputs
    monkeypatch.setattr(pipeline, "code_version", lambda stage: "code-v1")
    CALLS.clear()
    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-storage"}):
        yield tmp_path


def tiny(tmp, *overrides):
    """The tiny preset in `tmp`, with its own experiment and registered-model names on the shared server."""
    return load_config("tiny", [*named(tmp), *overrides])


def named(tmp):
    return [f"artifacts_dir={tmp / 'artifacts'}", f"tracking.experiment={tmp.name}",
            f"tracking.policy_name=policy-{tmp.name}", f"tracking.reward_model_name=rm-{tmp.name}"]


def trained(calls):
    return [c for c in calls if c in ("data", "anchor", "reward_model", "policy", "evaluate_policy")]


def aliases(name):
    return {v["version"]: v["aliases"] for v in registry.list_versions(name)}


def check_mlflow_contents(summary, cfg):
    """Parent + nested runs, params, per-step metrics, the dataset input with its DVC md5, the registry."""
    client = mlflow.MlflowClient()
    parent = client.get_run(summary["run_id"])
    assert parent.data.params["policy.kl_coef"] == str(cfg.policy.kl_coef)
    assert parent.data.tags["perl.data_version"] == summary["data_version"]["md5"]
    assert "config.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {r.data.tags["perl.stage"]: r for r in children}
    assert sorted(by_stage) == sorted(["data", "anchor", "reward_model", "policy", "evaluate", "register"])
    history = client.get_metric_history(by_stage["policy"].info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]
    (ds,) = client.get_run(by_stage["data"].info.run_id).inputs.dataset_inputs
    assert ds.dataset.digest == summary["data_version"]["md5"]
    assert {t.key: t.value for t in ds.tags}["dvc_md5"] == summary["data_version"]["md5"]
    assert by_stage["evaluate"].data.metrics["policy.gold_score_mean"] == pytest.approx(1 - cfg.policy.kl_coef)
    policy_files = {a.path for a in client.list_artifacts(by_stage["policy"].info.run_id, "policy")}
    assert "policy/manifest.json" in policy_files
    samples = mlflow.load_table("samples/rl_samples.json", run_ids=[by_stage["policy"].info.run_id])
    assert samples.to_dict("records") == [{"step": s, "prompt": "p", "response": f"r{s}", "reward": s / 10,
                                           "gold_score": 0.5} for s in (2, 4)]
    # both registered models reference the anchor where its stage run logged it, and carry no copy
    anchor_uri = f"runs:/{by_stage['anchor'].info.run_id}/anchor"
    for name in (cfg.tracking.policy_name, cfg.tracking.reward_model_name):
        version = client.get_model_version_by_alias(name, "candidate")
        assert version.tags["perl.anchor_uri"] == anchor_uri
        conf = mlflow.models.Model.load(f"models:/{name}/{version.version}").flavors["python_function"]
        assert conf["config"] == {"anchor_uri": anchor_uri} and set(conf["artifacts"]) == {"model"}


def check_prefect_artifacts(summary):
    """Markdown/table artifacts of the run, and training progress that reached 100 %."""
    from prefect.settings import PREFECT_API_URL

    keys = ["data-card", "reward-model-metrics", "policy-evaluation", "efficiency", "promotion-gate", "policy-progress"]
    # a raw request: this server (fastapi pinned < 0.155) rejects the nulls Prefect's own client sends
    response = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", timeout=30,
                          json={"artifacts": {"key": {"any_": keys}}, "limit": 200, "offset": 0, "sort": "CREATED_DESC"})
    response.raise_for_status()
    found = [SimpleNamespace(**a) for a in response.json()]
    latest = {}
    for art in sorted(found, key=lambda a: a.created):
        latest[art.key] = art
    assert sorted(latest) == sorted(keys)
    assert summary["registry"]["reason"] in latest["promotion-gate"].data
    assert latest["policy-progress"].data == 100
    assert {row["stage"] for row in json.loads(latest["efficiency"].data)} == {"anchor", "reward_model", "policy"}


def test_cache_promotion_gate_and_rollback(workdir):
    cfg = tiny(workdir, "policy.kl_coef=0.1")  # fake gold score 0.9
    policy_name, rm_name = cfg.tracking.policy_name, cfg.tracking.reward_model_name
    first = perl_pipeline(cfg)
    assert trained(CALLS) == ["data", "anchor", "reward_model", "policy", "evaluate_policy"]
    assert not any(s["cached"] for s in first["stages"].values())
    assert first["registry"]["promoted"] and "no champion yet" in first["registry"]["reason"]
    check_mlflow_contents(first, cfg)
    check_prefect_artifacts(first)
    assert aliases(policy_name) == {"1": ["candidate", "champion"]} and aliases(rm_name) == {"1": ["candidate", "champion"]}

    # nothing changed: every stage restored from Prefect's cache, nothing re-registered
    CALLS.clear()
    second = perl_pipeline(cfg)
    assert trained(CALLS) == []
    assert second["stages"] == {k: {**v, "cached": True} for k, v in first["stages"].items()}
    assert (second["registry"]["policy_version"], second["registry"]["new"]) == ("1", False)

    # an RL change alone re-runs RL and evaluation; a worse candidate is registered but not promoted
    CALLS.clear()
    worse = perl_pipeline(cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"kl_coef": 0.3})}))
    assert trained(CALLS) == ["policy", "evaluate_policy"]
    assert [k for k, s in worse["stages"].items() if not s["cached"]] == ["policy", "evaluate"]
    reg = worse["registry"]
    assert (reg["policy_version"], reg["reward_model_version"], reg["promoted"]) == ("2", "1", False)
    assert "does not beat champion v1" in reg["reason"] and "(0.7000 vs 0.9000" in reg["reason"]
    assert aliases(policy_name) == {"2": ["candidate"], "1": ["champion"]}
    # the anchor stage was cached: v2 references the anchor the first run logged
    tags = {v["version"]: v["tags"] for v in registry.list_versions(policy_name)}
    assert tags["2"]["perl.anchor_uri"] == tags["1"]["perl.anchor_uri"]

    # a better candidate is promoted, and says why
    CALLS.clear()
    better_cfg = cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"kl_coef": 0.05})})
    better = perl_pipeline(better_cfg)
    assert trained(CALLS) == ["policy", "evaluate_policy"]
    assert better["registry"]["promoted"] and "beats champion v1 on policy.gold_score_mean (0.9500 vs 0.9000" in \
        better["registry"]["reason"]
    assert aliases(policy_name) == {"3": ["candidate", "champion"], "2": [], "1": []}

    # a deleted output folder is recomputed although Prefect still holds its cached result
    import shutil
    shutil.rmtree(better["stages"]["anchor"]["out_dir"])
    CALLS.clear()
    perl_pipeline(better_cfg)
    assert trained(CALLS) == ["anchor"]  # same key, same folder: downstream caches stay valid

    assert registry.rollback(policy_name, rm_name) == ("3", "1")
    assert aliases(policy_name)["1"] == ["champion"]
    with pytest.raises(UserError, match="no previous champion"):
        registry.rollback(policy_name, rm_name)


def _edited_code_versions(tmp_path, edit: str) -> set[str]:
    """The stages whose code version changes when `edit` (a file of a scratch copy of perl_core) changes."""
    import shutil

    import perl_core

    root = tmp_path / "perl_core"
    shutil.copytree(Path(perl_core.__file__).resolve().parent, root, ignore=shutil.ignore_patterns("__pycache__"))
    before = {stage: pipeline.code_version(stage, root) for stage in pipeline.STAGE_CODE}
    with open(root / edit, "a") as f:
        f.write("\n# an edit\n")
    return {stage for stage in pipeline.STAGE_CODE if pipeline.code_version(stage, root) != before[stage]}


@pytest.mark.parametrize("edit, changed", [
    ("eval/reporting.py", {"evaluate"}),            # evaluation code: evaluation only
    ("policy/rl.py", {"policy", "evaluate"}),         # RL code: RL and evaluation (registration follows them)
    ("reward/train.py", {"reward_model", "policy", "evaluate"}),  # the reward model and what reads it
    ("reward/stage.py", {"reward_model", "policy", "evaluate"}),
    ("sft.py", {"anchor"}),                          # the anchor alone
    ("data/versioning.py", set(pipeline.STAGE_CODE)),  # every stage records its data version
    ("data/taskmaster4.py", {"data"}),              # a data source: the data stage (its md5 carries it on)
    ("config.py", set(pipeline.STAGE_CODE)),         # the config tree is every stage's
])
def test_a_code_edit_re_runs_only_the_stages_whose_code_changed(tmp_path, edit, changed):
    assert _edited_code_versions(tmp_path, edit) == changed


def test_every_module_a_task_calls_is_in_its_stage_code():
    """STAGE_CODE names each task's perl_core entry points: what tasks.py imports per task is in its stage's code."""
    import ast

    import perl_core
    from flows import tasks

    root = Path(perl_core.__file__).resolve().parent
    stage_of = {"prepare_data": "data", "train_anchor": "anchor", "train_reward_model": "reward_model",
                "train_policy": "policy", "evaluate": "evaluate"}
    tree = ast.parse(Path(tasks.__file__).read_text())
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in stage_of):
        modules = {n.module for n in ast.walk(fn) if isinstance(n, ast.ImportFrom) and n.module.startswith("perl_core")}
        code = set(pipeline.stage_code(stage_of[fn.name]))
        for module in modules:
            path = pipeline._module_file(root, module)
            assert path in code, f"{fn.name} imports {module}, not in STAGE_CODE[{stage_of[fn.name]!r}]"


def test_stage_keys_follow_data_code_and_upstream(monkeypatch):
    monkeypatch.setattr(pipeline, "code_version", lambda stage: "code-v1")
    sections = {"policy": {"kl_coef": 0.05}}
    base = pipeline.stage_key("policy", sections, "md5-a", ("anchor-k", "rm-k"))
    assert base == pipeline.stage_key("policy", {"policy": {"kl_coef": 0.05}}, "md5-a", ("anchor-k", "rm-k"))
    assert base != pipeline.stage_key("policy", sections, "md5-b", ("anchor-k", "rm-k"))  # new data version
    assert base != pipeline.stage_key("policy", sections, "md5-a", ("anchor-k", "rm-k2"))  # new reward model
    assert base != pipeline.stage_key("policy", {"policy": {"kl_coef": 0.1}}, "md5-a", ("anchor-k", "rm-k"))
    monkeypatch.setattr(pipeline, "code_version", lambda stage: "code-v2")
    assert base != pipeline.stage_key("policy", sections, "md5-a", ("anchor-k", "rm-k"))  # new code


def test_deployments_run_the_embedded_default_one_at_a_time():
    """prefect.yaml, read through Prefect's own deployment schema (it ignores keys it does not know):
    every deployment's parameters resolve to `load_config("default")`, what `perl-rlhf run` trains
    (the multi-GPU one: with its `launch` section), and at most one run of it is active."""
    import inspect

    import yaml
    from prefect.cli.deploy._models import PrefectYamlModel

    spec = PrefectYamlModel.model_validate(yaml.safe_load((Path(__file__).parent.parent / "prefect.yaml").read_text()))
    expected = {"perl-nightly": load_config("default"), "perl-nightly-docker": load_config("default"),
                "perl-nightly-multi-gpu": load_config("default", ["launch.num_processes=4",
                                                                  "launch.mixed_precision=bf16"])}
    assert sorted(d.name for d in spec.deployments) == sorted(expected)
    for deployment in spec.deployments:
        assert deployment.entrypoint == "flows/pipeline.py:perl_pipeline"
        assert deployment.concurrency_limit == 1, deployment.name
        call = inspect.signature(perl_pipeline.fn).bind(**perl_pipeline.validate_parameters(deployment.parameters))
        call.apply_defaults()
        assert call.arguments["cfg"] == expected[deployment.name], deployment.name


def test_serve_runs_the_configured_pipeline_one_at_a_time(monkeypatch):
    from typer.testing import CliRunner

    from flows import tracking
    from flows.cli import app

    served = {}
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setattr(tracking, "check_servers", lambda cfg: None)
    monkeypatch.setattr(perl_pipeline, "serve", lambda **kwargs: served.update(kwargs))
    result = CliRunner().invoke(app, ["serve", "--cron", "0 4 * * *"])
    assert result.exit_code == 0, result.output
    assert served["concurrency_limit"] == 1 and served["cron"] == "0 4 * * *"
    assert perl_pipeline.validate_parameters(served["parameters"])["cfg"] == load_config("default")
    served.clear()
    assert CliRunner().invoke(app, ["serve", "-c", "tiny", "--set", "policy.kl_coef=0.3"]).exit_code == 0
    assert perl_pipeline.validate_parameters(served["parameters"])["cfg"] == load_config("tiny", ["policy.kl_coef=0.3"])


def test_retries_transient_errors_only(workdir, monkeypatch):
    attempts = []

    def flaky(cfg, out_dir, callback, resume):
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("network blip")
        return fake_anchor(cfg, out_dir, callback, resume)

    def bad_input(cfg, out_dir, callback, resume):
        attempts.append(1)
        raise UserError("sft.max_length too small")

    fast = tasks.train_anchor.with_options(retry_delay_seconds=0, refresh_cache=True)
    cfg = tiny(workdir)
    monkeypatch.setattr("perl_core.sft.train_anchor", flaky)
    result = fast(cfg, key="k1", out_dir=str(workdir / "a1"))
    assert len(attempts) == 2 and result["out_dir"] == str(workdir / "a1")

    attempts.clear()
    monkeypatch.setattr("perl_core.sft.train_anchor", bad_input)
    with pytest.raises(UserError, match="max_length"):
        fast(cfg, key="k2", out_dir=str(workdir / "a2"))
    assert len(attempts) == 1


REAL_POPEN = subprocess.Popen


class InProcessLaunch:
    """`subprocess.Popen` for a training task's `accelerate launch ... perl-rlhf <stage> train ...`: runs
    that stage command line here, on the fake stages, and records it. Other commands (git) run as usual."""

    launched: list[list[str]] = []

    def __new__(cls, argv, *args, **kwargs):
        if "accelerate.commands.launch" not in argv:
            return REAL_POPEN(argv, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, argv, stdout, stderr, env):
        from typer.testing import CliRunner

        from flows.cli import app

        script = next(i for i, arg in enumerate(argv) if arg.endswith("perl-rlhf"))
        self.launched.append(argv)
        run = CliRunner().invoke(app, argv[script + 1:])
        stdout.write(run.output)
        self.returncode = run.exit_code

    def wait(self, timeout=None):
        return self.returncode


def test_launched_stages_log_to_mlflow_and_cache_as_in_one_process(workdir, monkeypatch):
    """launch.num_processes=2: each training stage runs as its command line (here without the processes),
    and MLflow receives the same per-step metrics, samples and models as in one process."""
    from flows import cli_policy, cli_reward

    monkeypatch.setattr(subprocess, "Popen", InProcessLaunch)
    monkeypatch.setattr(cli_policy, "check_model_dir", lambda *args: None)  # the fake stages write no weights
    monkeypatch.setattr(cli_reward, "check_model_dir", lambda *args: None)
    InProcessLaunch.launched.clear()
    cfg = tiny(workdir, "policy.kl_coef=0.1", "launch.num_processes=2")
    first = perl_pipeline(cfg)
    assert trained(CALLS) == ["data", "anchor", "reward_model", "policy", "evaluate_policy"]
    assert [argv[argv.index("--num_processes") + 1] for argv in InProcessLaunch.launched] == ["2", "2", "2"]
    assert [argv[argv.index("--out") - 4] for argv in InProcessLaunch.launched] == ["sft", "reward", "policy"]
    check_mlflow_contents(first, cfg)
    assert first["registry"]["promoted"]

    InProcessLaunch.launched.clear()
    CALLS.clear()
    second = perl_pipeline(cfg)
    assert trained(CALLS) == [] and InProcessLaunch.launched == []
    assert all(s["cached"] for s in second["stages"].values())


def test_unreachable_tracking_server_fails_before_training(workdir, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    result = CliRunner().invoke(app, ["run", "--config", "tiny", "--set", f"artifacts_dir={workdir / 'artifacts'}"])
    assert result.exit_code == 2
    assert f"MLflow tracking server at http://127.0.0.1:{port} cannot be reached" in result.output
    assert "MLFLOW_TRACKING_URI" in result.output and "Nothing was trained" in result.output
    assert CALLS == []
    assert not (workdir / "artifacts").exists()


@pytest.mark.slow
def test_real_tiny_pipeline_end_to_end(servers, tmp_path, monkeypatch):
    """`perl-rlhf run --config tiny` with the real stages, in a fresh git+DVC repo under tmp."""
    import pandas as pd
    from typer.testing import CliRunner

    from flows.cli import app
    from perl_core.data.versioning import data_version
    from perl_core.policy.generation import PolicyGenerator
    from perl_core.reward.train import RewardScorer

    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PERL_DVC_REMOTE", str(tmp_path / "dvc-remote"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", servers)
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-storage"}):
        result = CliRunner().invoke(app, ["run", "--config", "tiny", *sum((["--set", o] for o in named(repo)), [])])
    assert result.exit_code == 0, result.output
    assert "promoted to champion" in result.output and f"open the MLflow UI:  {servers}" in result.output

    version = data_version(repo)
    assert version["md5"] and version["matches_working_copy"]
    client = mlflow.MlflowClient(servers)
    exp = client.get_experiment_by_name(repo.name)
    (parent,) = client.search_runs([exp.experiment_id], "tags.`perl.preset` = 'tiny'")
    assert parent.data.tags["perl.data_version"] == version["md5"]
    children = {r.data.tags["perl.stage"]: r for r in
                client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    cfg = load_config("tiny")
    anchor_losses = client.get_metric_history(children["anchor"].info.run_id, "train/loss")
    assert [m.step for m in anchor_losses] == list(range(1, cfg.sft.train.max_steps + 1))
    (ds,) = client.get_run(children["data"].info.run_id).inputs.dataset_inputs
    assert ds.dataset.digest == version["md5"]
    eval_metrics = children["evaluate"].data.metrics
    assert "reward.pairwise_accuracy" in eval_metrics
    assert eval_metrics["policy.gold_gain"] == pytest.approx(
        eval_metrics["policy.gold_score_mean"] - eval_metrics["policy.anchor_gold_score_mean"], abs=1e-9)

    # the registered models carry everything they need: delete the run's own folders, then load them back
    import shutil
    shutil.rmtree(repo / "artifacts")
    mlflow.set_tracking_uri(servers)
    rm_name, policy_name = f"rm-{repo.name}", f"policy-{repo.name}"
    assert aliases(rm_name) == {"1": ["candidate", "champion"]} and aliases(policy_name) == {"1": ["candidate", "champion"]}
    prompt = load_rows_prompt(repo)
    frame = pd.DataFrame({"prompt": [prompt], "response": [" One latte."]})
    via_mlflow = mlflow.pyfunc.load_model(f"models:/{rm_name}@champion").predict(frame)["score"][0]
    via_project = float(RewardScorer.load(registry.download(rm_name, "champion")).score([prompt], [" One latte."])[0])
    assert via_mlflow == pytest.approx(via_project, abs=1e-5)
    generated = mlflow.pyfunc.load_model(f"models:/{policy_name}@champion").predict(
        pd.DataFrame({"prompt": [prompt]}), params={"seed": 3, "max_new_tokens": 6})["response"][0]
    direct = PolicyGenerator.load(registry.download(policy_name, "champion")).generate([prompt], seed=3, max_new_tokens=6)[0]
    assert generated == direct


def load_rows_prompt(repo) -> str:
    from perl_core.data import load_prompts

    cfg = load_config("tiny", [f"data.data_dir={repo / 'data'}"])
    return load_prompts(cfg.data, "test")[0]


def test_run_logs_keep_the_traceback_of_bugs_only():
    """A user error's record reaches Prefect's handlers without a traceback; a bug's keeps it."""
    import logging

    import flows.pipeline  # noqa: F401  (installs the filter)
    from perl_core.config import ConfigError
    from perl_core.errors import UserError

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger, handler = logging.getLogger(name), Keep()
        logger.addHandler(handler)
        try:
            for exc in (UserError("data.path: x.jsonl does not exist"), ConfigError("policy.k: expected >= 2"),
                        RuntimeError("a bug")):
                try:
                    raise exc
                except Exception:
                    logger.error("Encountered exception during execution: %r", exc, exc_info=True)
        finally:
            logger.removeHandler(handler)
    assert [r.exc_info is None for r in seen] == [True, True, False] * 2
    assert "data.path: x.jsonl does not exist" in seen[0].getMessage()
