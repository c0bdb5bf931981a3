"""Registered models outside the project: pinned requirements, the anchor stored once, a load that sees
only the model's own code, and `mlflow models serve` answering `/invocations`.

One tiny llama-micro anchor, a LoRA reward model and a LoRA policy on it, registered the way the
pipeline's `register` task does (its plain function), in an SQLite store with local artifacts.
"""
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from importlib.metadata import version as installed_version
from pathlib import Path

import httpx
import pytest

mlflow = pytest.importorskip("mlflow")

from flows import registry, tasks, tracking  # noqa: E402
from perl_core.artifacts import write_manifest  # noqa: E402
from stand_ins import stand_in_reward_model  # noqa: E402
from perl_core.config import build_config  # noqa: E402
from perl_core.policy.generation import PolicyGenerator  # noqa: E402
from perl_core.modeling import build_scratch_backbone  # noqa: E402
from perl_core.reward.train import RewardScorer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [f"Customer: a {s} {d} please\nAgent:" for s in ("small", "large") for d in ("latte", "mocha", "tea")]
PROMPT, RESPONSE = PROMPTS[0], " One small latte."
RM_NAME, POLICY_NAME = "serving-rm", "serving-policy"


def _policy_cfg():
    return build_config({"policy": {"k": 2, "lora": {"rank": 4}, "generation": {"max_new_tokens": 6},
                                     "train": {"batch_size": 2, "max_steps": 1, "learning_rate": 0.02}}}).policy


def _train_tiny_models(root: Path) -> tuple[Path, Path, Path]:
    from perl_core.policy.roles import build_roles
    from perl_core.policy.rl import rl_loop

    anchor = build_scratch_backbone("llama-micro", PROMPTS + [p + RESPONSE for p in PROMPTS], root / "anchor", 300)
    write_manifest(anchor, kind="anchor", base_model="scratch:llama-micro", tuning="none", config={})
    stand_in_reward_model(anchor, root / "rm")
    roles = build_roles(_policy_cfg(), anchor, root / "rm", sample_texts=PROMPTS)
    rl_loop(roles, roles.tokenizer, PROMPTS, _policy_cfg())
    roles.save_policy(root / "policy")
    write_manifest(root / "policy", kind="policy", base_model=str(anchor), tuning="lora",
                   config=_policy_cfg().model_dump(mode="json"), anchor=str(anchor), reward_model=str(root / "rm"))
    return anchor, root / "rm", root / "policy"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """Anchor logged once by its stage run; reward model and policy registered (champion) by `tasks.register`."""
    root = tmp_path_factory.mktemp("serving")
    anchor, rm, policy = _train_tiny_models(root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
        cfg = build_config({"tracking": {"experiment": "serving", "artifact_location": str(root / "mlartifacts"),
                                         "policy_name": POLICY_NAME, "reward_model_name": RM_NAME}})
        with tracking.pipeline_run(cfg, run_name="serving"):
            with tracking.stage_run("anchor") as run:
                anchor_result = {"key": "anchor-k", "out_dir": str(anchor), "produced_by_run": run.info.run_id}
                tracking.log_stage_result(anchor_result, "anchor")
            with tracking.stage_run("register"):
                evaluation = {"key": "eval-k", "metrics": {"policy.gold_score_mean": 0.5}}
                result = tasks.register.fn(cfg, anchor_result, {"key": "rm-k", "out_dir": str(rm)},
                                           {"key": "policy-k", "out_dir": str(policy)}, evaluation, {"md5": "m"})
        assert result["promoted"]
        yield {"root": root, "uri": uri, "anchor": anchor, "rm": rm, "policy": policy,
               "anchor_run": anchor_result["produced_by_run"]}
    mlflow.set_tracking_uri(None)


def _model_folder(name: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion"))


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_recorded_requirements_are_pinned_published_packages(registered):
    mlflow.set_tracking_uri(registered["uri"])
    published = {_normalise(line.split("==")[0]) for line in (REPO / "constraints.txt").read_text().splitlines()
                 if "==" in line}
    for name in (RM_NAME, POLICY_NAME):
        folder = _model_folder(name)
        lines = [x.strip() for x in (folder / "requirements.txt").read_text().splitlines() if x.strip()]
        pins = dict(line.split("==") for line in lines)
        assert len(pins) == len(lines), f"not every requirement is pinned: {lines}"
        assert {"torch", "transformers", "peft", "mlflow", "pandas"} <= set(pins)
        for package, pinned in pins.items():
            assert _normalise(package) in published, f"{package} is not in constraints.txt (unpublished?)"
            assert pinned == installed_version(package).split("+")[0]
        code = folder / "code"
        assert (code / "perl_core" / "policy" / "rl.py").is_file() and not (code / "flows").exists()


def test_the_anchor_is_stored_once_and_referenced_by_both_models(registered):
    mlflow.set_tracking_uri(registered["uri"])
    weights = registered["anchor"] / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    copies = [p for p in (registered["root"] / "mlartifacts").rglob("*") if p.is_file()
              and p.stat().st_size == weights.stat().st_size and hashlib.sha256(p.read_bytes()).hexdigest() == digest]
    assert len(copies) == 1 and registered["anchor_run"] in copies[0].parts
    expected = f"runs:/{registered['anchor_run']}/anchor"
    client = mlflow.MlflowClient()
    for name in (RM_NAME, POLICY_NAME):
        conf = mlflow.models.Model.load(str(_model_folder(name) / "MLmodel")).flavors["python_function"]
        assert conf["config"] == {"anchor_uri": expected} and set(conf["artifacts"]) == {"model"}
        assert client.get_model_version_by_alias(name, "champion").tags["perl.anchor_uri"] == expected


# Runs in a fresh interpreter: no PYTHONPATH, cwd elsewhere, and the project's editable install
# switched off, so perl_core can only come from the model's own code_paths.
LOAD_SCRIPT = r"""
import ast, importlib.metadata, importlib.util, json, sys
repo = sys.argv[1]
# the checkout off the path, the environment kept (CI builds its virtualenv inside the checkout)
sys.path = [p for p in sys.path if p not in ("", ".") and (p.startswith(sys.prefix) or not p.startswith(repo))]
sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
reachable_before = [m for m in ("perl_core", "flows") if importlib.util.find_spec(m) is not None]
import mlflow, pandas as pd
rm = mlflow.pyfunc.load_model(f"models:/{sys.argv[2]}@champion")
score = float(rm.predict(pd.DataFrame({"prompt": [sys.argv[4]], "response": [sys.argv[5]]}))["score"][0])
policy = mlflow.pyfunc.load_model(f"models:/{sys.argv[3]}@champion")
response = policy.predict(pd.DataFrame({"prompt": [sys.argv[4]]}), params={"seed": 3})
# every distribution a loaded perl_core module imports (and that got imported): it must be a requirement
dists, by_module = set(), importlib.metadata.packages_distributions()
for name, module in list(sys.modules.items()):
    if name.startswith("perl_core") and getattr(module, "__file__", None):
        for node in ast.walk(ast.parse(open(module.__file__).read())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for top in {n.split(".")[0] for n in names} - {"perl_core"}:
                if top in sys.modules:
                    dists.update(by_module.get(top, []))
import perl_core
print(json.dumps({"reachable_before": reachable_before, "perl_core": perl_core.__file__, "score": score,
                  "response": response["response"][0], "dists": sorted(dists),
                  "flows_or_prefect": [m for m in sys.modules if m.split(".")[0] in ("flows", "prefect")]}))
"""


def _clean_env(registered) -> dict:
    """No PYTHONPATH; this interpreter's scripts first on PATH, as in an activated environment (serve runs `uvicorn`)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    path = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return {**env, "PATH": path, "MLFLOW_TRACKING_URI": registered["uri"], "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}


def _direct(registered) -> tuple[float, str]:
    """The same models through the project's own paths on the training folders: the scorer, and
    `perl-rlhf policy generate` with nothing but a seed (it samples as the policy was trained)."""
    from typer.testing import CliRunner

    from flows.cli import app

    score = float(RewardScorer.load(registered["rm"]).score([PROMPT], [RESPONSE])[0])
    done = CliRunner().invoke(app, ["policy", "generate", "--model", str(registered["policy"]), "--prompt", PROMPT,
                                    "--seed", "3"])
    assert done.exit_code == 0, done.output
    return score, json.loads(done.output.strip().splitlines()[-1])["response"]


def test_a_served_policy_defaults_to_how_it_was_trained(registered):
    """The signature's params default to the policy's recorded generation settings, not MLflow's or ours."""
    mlflow.set_tracking_uri(registered["uri"])
    signature = mlflow.models.Model.load(str(_model_folder(POLICY_NAME) / "MLmodel")).signature
    defaults = {p.name: p.default for p in signature.params.params}
    trained = _policy_cfg().generation
    assert defaults == {"seed": 0, "max_new_tokens": trained.max_new_tokens, "temperature": trained.temperature,
                        "top_p": trained.top_p}
    assert (trained.max_new_tokens, trained.temperature) == (6, 0.7)  # neither is a library default
    assert PolicyGenerator.load(registered["policy"]).defaults == {k: v for k, v in defaults.items() if k != "seed"}


def test_pyfunc_loads_from_its_own_code_paths_without_the_repository(registered, tmp_path):
    out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(REPO), RM_NAME, POLICY_NAME, PROMPT, RESPONSE],
                         cwd=tmp_path, env=_clean_env(registered), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["reachable_before"] == [] and got["flows_or_prefect"] == []
    assert "/code/perl_core/" in got["perl_core"] and not got["perl_core"].startswith(str(REPO))
    required = {_normalise(line.split("==")[0]) for line in registry.pinned_requirements()}
    assert {_normalise(d) for d in got["dists"]} <= required
    score, response = _direct(registered)
    assert got["score"] == pytest.approx(score, abs=1e-5) and got["response"] == response


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_answers_invocations(registered, tmp_path):
    """`mlflow models serve --env-manager local` for both models, one `/invocations` request each."""
    servers = {}
    try:
        for name in (RM_NAME, POLICY_NAME):
            port, log = _free_port(), open(tmp_path / f"{name}.log", "w")
            proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion",
                                     "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], cwd=tmp_path,
                                    env=_clean_env(registered), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            servers[name] = (proc, f"http://127.0.0.1:{port}", log)
        deadline = time.time() + 240
        for name, (proc, url, _) in servers.items():
            while True:
                try:
                    if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None and time.time() < deadline, (tmp_path / f"{name}.log").read_text()[-3000:]
                time.sleep(1)
        rm_url, policy_url = servers[RM_NAME][1], servers[POLICY_NAME][1]
        scored = httpx.post(f"{rm_url}/invocations", timeout=60,
                            json={"dataframe_records": [{"prompt": PROMPT, "response": RESPONSE}]})
        generated = httpx.post(f"{policy_url}/invocations", timeout=60,
                               json={"dataframe_records": [{"prompt": PROMPT}], "params": {"seed": 3}})
        assert scored.status_code == 200 and generated.status_code == 200, scored.text + generated.text
        score, response = _direct(registered)
        assert scored.json()["predictions"][0]["score"] == pytest.approx(score, abs=1e-5)
        assert generated.json()["predictions"][0]["response"] == response
    finally:
        for proc, _, log in servers.values():
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    proc.wait(timeout=30)
            log.close()


OLD_CODE_FILE = '''import mlflow

from flows.registry import PerlPyfunc


class PerlModel(PerlPyfunc, mlflow.pyfunc.PythonModel):
    pass


mlflow.models.set_model(PerlModel())
'''


def test_versions_registered_with_a_bundled_anchor_still_load(registered, tmp_path):
    """Older versions: a code file importing the pyfunc from flows.registry, the anchor inside the version."""
    mlflow.set_tracking_uri(registered["uri"])
    code = tmp_path / "mlflow_model.py"
    code.write_text(OLD_CODE_FILE)
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="reward_model", python_model=str(code),
                                       artifacts={"model": str(registered["rm"]), "anchor": str(registered["anchor"])})
    model = mlflow.pyfunc.load_model(info.model_uri)
    import pandas as pd

    score = model.predict(pd.DataFrame({"prompt": [PROMPT], "response": [RESPONSE]}))["score"][0]
    assert score == pytest.approx(_direct(registered)[0], abs=1e-5)
