"""The image's install recipe and the compose stack, run for real without containers.

1. `docker/install.sh`, the Dockerfile's install step, into a fresh virtualenv from a copy of
   exactly what the Dockerfile copies; the image's entrypoint answers `--help`.
2. The stack's services as processes on localhost, each started with the command and environment
   that `docker compose config` gives it, service host names rewritten to loopback ports:
   PostgreSQL (Debian's package: a throwaway cluster, with the image's init script), the MLflow
   server and the Prefect server on it. A tiny pipeline then runs with the worker's environment
   and the image's provenance variables, and registers its models there.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from compose_cli import ENV_EXAMPLE, ROOT, resolved_stack

DOCKERFILE = ROOT / "docker" / "Dockerfile"
PG_PASSWORD = "change-me"  # the one in docker/.env.example: the stack runs as compose resolves it


# ---------------------------------------------------------------- 1. the image's install, replayed
def _copied_by_dockerfile() -> list[str]:
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += line.split()[1:-1]
    return sources


def _dockerfile_env() -> dict[str, str]:
    """The runtime stage's ENV keys (values as written, ${...} unresolved)."""
    final = re.split(r"(?m)^FROM ", DOCKERFILE.read_text())[-1]
    env = {}
    for block in re.findall(r"(?ms)^ENV (.*?)(?<!\\)$", final):
        for key, value in re.findall(r"(\w+)=(\S+)", block.replace("\\\n", " ")):
            env[key] = value
    return env


def _local_torch_wheels() -> str:
    """Where pip finds torch on this machine (its configured find-links); the image uses the PyTorch CPU index."""
    links = os.environ.get("PIP_FIND_LINKS")
    if not links:
        done = subprocess.run(["python3", "-m", "pip", "config", "get", "global.find-links"], capture_output=True, text=True)
        links = done.stdout.strip()
    if not links or not any(Path(d).glob("torch-2.13.0*.whl") for d in links.split()):
        pytest.skip("no local torch 2.13.0 wheel in pip's find-links: the install test would pull CUDA torch from PyPI")
    return links.split()[0]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A fresh venv made by docker/install.sh from a build-context copy; returns its paths."""
    uv = shutil.which("uv") or str(Path(os.sys.executable).with_name("uv"))
    assert Path(uv).exists(), "uv not found: install the dev extra"
    base = tmp_path_factory.mktemp("image")
    app = base / "app"  # plays /opt/perl/app
    for src in _copied_by_dockerfile():
        src = src.rstrip("/")
        target = app / src
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / src).is_dir():
            shutil.copytree(ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / src, target)
    env = {**os.environ, "PATH": f"{Path(uv).parent}:{os.environ['PATH']}", "TORCH_FIND_LINKS": _local_torch_wheels()}
    env.pop("TORCH_INDEX_URL", None)
    venv, lock = base / "venv", base / "perl" / "requirements.lock"
    done = subprocess.run(["sh", "docker/install.sh", str(venv), str(lock)], cwd=app, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"docker/install.sh failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return {"app": app, "venv": venv, "bin": venv / "bin", "lock": lock}


def test_install_recipe_gives_the_pinned_set_and_the_entrypoint(image):
    lock = dict(line.split("==", 1) for line in image["lock"].read_text().splitlines() if "==" in line)
    pins = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    pins = {norm(k): v for k, v in pins.items()}
    lock = {norm(k): v for k, v in lock.items()}
    assert lock["torch"] == "2.13.0+cpu"  # the CPU build, never the CUDA one from PyPI
    for name in ("transformers", "peft", "prefect", "mlflow", "dvc", "psycopg2-binary", "boto3"):
        assert lock[name] == pins[name], name
    drift = {k: (v, pins[k]) for k, v in lock.items() if k in pins and k != "torch" and v != pins[k]}
    assert not drift, f"installed versions differ from constraints.txt: {drift}"

    done = subprocess.run([str(image["bin"] / "perl-rlhf"), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Usage: perl-rlhf" in done.stdout and "run" in done.stdout


# ---------------------------------------------------------------- 2. the stack as local processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        pytest.skip("PostgreSQL is not installed (.ci/run installs Debian's `postgresql`)")
    return found[-1].parent


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres():
    """A throwaway cluster set up as the postgres image does for compose: superuser + password,
    database `mlflow` (POSTGRES_DB), then docker/postgres/create-prefect-db.sh."""
    bin_dir, port = _pg_bin(), _free_port()
    home = Path(tempfile.mkdtemp(prefix="perl-pg-"))  # not under pytest's root-only tmp: the server runs as postgres
    data, pwfile = home / "data", home / "pw"
    pwfile.write_text(PG_PASSWORD + "\n")
    if os.geteuid() == 0:
        shutil.chown(home, "postgres")
        shutil.chown(pwfile, "postgres")
    run = lambda cmd: subprocess.run(_as_postgres(cmd), capture_output=True, text=True, timeout=120)  # noqa: E731
    done = run([str(bin_dir / "initdb"), "-D", str(data), "-U", "perl", f"--pwfile={pwfile}", "-E", "UTF8",
                "--auth-local=trust", "--auth-host=scram-sha-256"])
    assert done.returncode == 0, done.stderr
    done = run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(home / "log"), "-w", "-t", "120", "-o",
                f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start"])
    assert done.returncode == 0, done.stderr + (home / "log").read_text()
    try:
        env = {**os.environ, "PGHOST": str(home), "PGPORT": str(port)}
        subprocess.run(["psql", "-U", "perl", "-d", "postgres", "-c", "CREATE DATABASE mlflow"], env=env, check=True,
                       capture_output=True, timeout=60)
        init = subprocess.run(["sh", str(ROOT / "docker" / "postgres" / "create-prefect-db.sh")], capture_output=True,
                              text=True, env={**env, "POSTGRES_USER": "perl", "POSTGRES_DB": "mlflow"}, timeout=60)
        assert init.returncode == 0, init.stderr
        yield {"port": port, "socket_dir": home}
    finally:
        run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"])
        shutil.rmtree(home, ignore_errors=True)


def _sql(pg: dict, db: str, query: str) -> list[tuple]:
    """psql over TCP with the password (scram), the way the servers connect; rows as tuples of text."""
    done = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(pg["port"]), "-U", "perl", "-d", db, "-At", "-F", "\t",
                           "-v", "ON_ERROR_STOP=1", "-c", query], env={**os.environ, "PGPASSWORD": PG_PASSWORD},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [tuple(line.split("\t")) for line in done.stdout.splitlines()]


def _localise(env: dict, ports: dict[str, int], app_dir: Path) -> dict[str, str]:
    """A compose service's environment on this machine: service names -> loopback ports, the
    image's /opt/perl/app -> a local folder."""
    out = {}
    for key, value in env.items():
        value = str(value)
        for service, port in ports.items():
            value = re.sub(rf"(?<=[/@]){service}:\d+", f"127.0.0.1:{port}", value)
        out[key] = value.replace("/opt/perl/app", str(app_dir))
    return out


def _image_env(image: dict, commit: str) -> dict[str, str]:
    """The Dockerfile's runtime ENV with the image's paths and build args mapped onto the test's venv."""
    env = {}
    for key, value in _dockerfile_env().items():
        value = (value.replace("${GIT_COMMIT}", commit).replace("${TORCH_VARIANT}", "cpu")
                 .replace("/opt/perl/requirements.lock", str(image["lock"])).replace("/opt/perl/app", str(image["app"]))
                 .replace("/opt/perl/dvc-remote", str(image["app"].parent / "dvc-remote"))
                 .replace("/opt/venv/bin", str(image["bin"])).replace("${PATH}", os.environ["PATH"]))
        env[key] = value
    assert "/opt/" not in "".join(env.values()), env
    return env


def _start(cmd: list[str], env: dict, log: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{url}: the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=3).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"{url} not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


def _stop(*procs: subprocess.Popen) -> None:
    """SIGTERM to each process group (server + its workers), a few seconds' grace, then SIGKILL."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 8
    for proc in running:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def stack(image, postgres, tmp_path_factory):
    """MLflow and Prefect servers started as compose starts them, on the throwaway PostgreSQL."""
    base = tmp_path_factory.mktemp("stack")
    services = resolved_stack(base / "docker-config", env_file=ENV_EXAMPLE)["services"]
    ports = {"postgres": postgres["port"], "mlflow": _free_port(), "prefect-server": _free_port()}
    procs = []
    try:
        for name, port_key, host_key in (("mlflow", "MLFLOW_PORT", "MLFLOW_HOST"),
                                         ("prefect-server", "PREFECT_SERVER_API_PORT", "PREFECT_SERVER_API_HOST")):
            svc = services[name]
            workdir = base / name  # this service container's /opt/perl/app
            workdir.mkdir()
            env = _localise(svc["environment"], ports, workdir)
            # compose binds 0.0.0.0 inside the container; here only loopback, on a free port
            env.update({port_key: str(ports[name]), host_key: "127.0.0.1", "PREFECT_HOME": str(workdir / ".prefect")})
            cmd = [str(image["bin"] / svc["entrypoint"][0]), *svc["entrypoint"][1:], *svc["command"]]
            log = base / f"{name}.log"
            procs.append((_start(cmd, {**os.environ, **env, "PATH": f"{image['bin']}:{os.environ['PATH']}"}, log, workdir), log))
        urls = (f"http://127.0.0.1:{ports['mlflow']}/health", f"http://127.0.0.1:{ports['prefect-server']}/api/health")
        for url, (proc, log) in zip(urls, procs):
            _wait_healthy(url, proc, log)
        yield {"services": services, "ports": ports, "base": base, "postgres": postgres,
               "mlflow": f"http://127.0.0.1:{ports['mlflow']}"}
    finally:
        _stop(*(proc for proc, _ in procs))


def test_mlflow_accepts_the_worker_host_header_only(stack):
    """MLFLOW_SERVER_ALLOWED_HOSTS from compose: the worker's `mlflow:5000` passes, a stranger does not."""
    url = f"{stack['mlflow']}/api/2.0/mlflow/experiments/search?max_results=1"
    assert httpx.get(url, headers={"Host": "mlflow:5000"}, timeout=60).status_code == 200
    assert httpx.get(url, headers={"Host": "evil.example:5000"}, timeout=60).status_code == 403


def test_scheduled_deployment_runs_on_the_worker_and_registers_models(image, stack):
    """The deploy service's command, then the worker; one run of the nightly deployment, triggered
    now instead of at 03:00, trains the tiny preset and registers its models on the stack."""
    from perl_core.config import load_config

    services, app = stack["services"], image["app"]  # app plays the worker's /opt/perl/app
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    env = {**os.environ, **_image_env(image, commit), **_localise(services["worker"]["environment"], stack["ports"], app)}
    assert env["MLFLOW_TRACKING_URI"] == stack["mlflow"] and env["PERL_IMAGE_COMMIT"] == commit

    deploy = services["deploy"]
    done = subprocess.run([*deploy["entrypoint"], *deploy["command"]], cwd=app, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"deploy failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    worker_svc, log = services["worker"], stack["base"] / "worker.log"
    worker = _start([str(image["bin"] / worker_svc["entrypoint"][0]), *worker_svc["command"]],
                    {**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}, log, app)
    try:
        params = json.dumps({"cfg": load_config("tiny").model_dump(mode="json")})
        done = subprocess.run([str(image["bin"] / "prefect"), "deployment", "run", "perl-pipeline/perl-nightly",
                               "--params", params, "--watch", "--watch-interval", "3", "--watch-timeout", "900"],
                              cwd=app, env=env, capture_output=True, text=True, timeout=960)
    finally:
        _stop(worker)
    assert done.returncode == 0, f"the flow run failed:\n{done.stdout[-2000:]}\nworker log:\n{log.read_text()[-5000:]}"

    pg = stack["postgres"]
    # The Prefect server (on PostgreSQL) holds the deployment with its cron schedule and the completed run.
    schedules = _sql(pg, "prefect", "SELECT s.schedule::text FROM deployment_schedule s JOIN deployment d "
                                    "ON d.id = s.deployment_id WHERE d.name = 'perl-nightly'")
    assert any("0 3 * * *" in row[0] for row in schedules), schedules
    runs = _sql(pg, "prefect", "SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id "
                               "WHERE r.deployment_id IS NOT NULL")
    assert ("perl-pipeline", "COMPLETED") in runs, runs

    # The models are in the registry of the MLflow server, whose backend store is this PostgreSQL ...
    registered = dict(_sql(pg, "mlflow", "SELECT name, count(*) FROM model_versions GROUP BY name"))
    assert registered == {"perl-reward-model": "1", "perl-policy": "1"}
    aliases = set(_sql(pg, "mlflow", "SELECT name, alias FROM registered_model_aliases"))
    assert {("perl-policy", "candidate"), ("perl-policy", "champion")} <= aliases
    # ... and their files went through the server's proxy into its artifact volume.
    assert list((stack["base"] / "mlflow" / "mlartifacts").rglob("*.safetensors"))

    # Provenance: the image's commit and resolved package set are on the pipeline's parent run.
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=stack["mlflow"])
    experiment = client.get_experiment_by_name("perl").experiment_id
    (parent,) = client.search_runs([experiment], filter_string="tags.`mlflow.parentRunId` IS NULL")
    assert parent.data.tags["perl.git_commit"] == commit
    lock = client.download_artifacts(parent.info.run_id, "image/requirements.lock", str(stack["base"] / "download"))
    assert Path(lock).read_text() == image["lock"].read_text()
    # The data version: DVC in the image (no git, core.no_scm) recorded it in data.dvc; the run's dataset input carries it.
    dvc_md5 = yaml.safe_load((app / "data.dvc").read_text())["outs"][0]["md5"]
    assert parent.data.tags["perl.data_version"] == dvc_md5 != "untracked"
    # The run wrote where the worker's volumes are mounted, beside the code.
    assert list((app / "artifacts").glob("policy/*/manifest.json"))
