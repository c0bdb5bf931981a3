"""DVC versioning of `data/`: one `data.dvc` at the repo top level tracks the whole folder.

`data_version()` is what later stages log for lineage: the md5 DVC recorded in `data.dvc`, the
git revision, and whether the working copy still matches. The working-copy md5 is computed
here the way DVC computes a directory hash (md5 of the sorted JSON list of `{md5, relpath}`
entries, plus ".dir"), so checking costs no DVC start-up and does not depend on DVC's caches.

The default remote needs no configuration: a local folder outside the repo
(`$PERL_DVC_REMOTE`, else `$XDG_CACHE_HOME/perl-rlhf/dvc-remote`, else
`~/.cache/perl-rlhf/dvc-remote`), registered per machine in `.dvc/config.local` as `perl-local`.
A default remote configured by the user (`dvc remote add -d storage s3://...`) takes precedence.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml

from perl_core.artifacts import file_hash
from perl_core.errors import UserError

DVC_FILE = "data.dvc"
DATA_DIR = "data"
LOCAL_REMOTE = "perl-local"


def tracking_repo(data_dir: str | Path) -> Optional[Path]:
    """The repo whose `data.dvc` versions `data_dir`, or None (data outside the tracked `data/`)."""
    path = Path(data_dir).resolve()
    root = path.parent
    if path.name == DATA_DIR and (root / ".dvc").is_dir():
        return root
    return None


def dir_md5(path: str | Path) -> Optional[str]:
    """DVC 3's hash of a directory (`hash: md5`), or None when it does not exist."""
    path = Path(path)
    if not path.is_dir():
        return None
    entries = sorted(
        ({"md5": file_hash(p, "md5"), "relpath": p.relative_to(path).as_posix()} for p in path.rglob("*") if p.is_file()),
        key=lambda e: e["relpath"],
    )
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def recorded_md5(repo_root: str | Path = ".") -> Optional[str]:
    dvc_file = Path(repo_root) / DVC_FILE
    if not dvc_file.exists():
        return None
    try:
        outs = yaml.safe_load(dvc_file.read_text())["outs"]
        return next(o["md5"] for o in outs if o.get("path") == DATA_DIR)
    except (yaml.YAMLError, KeyError, TypeError, StopIteration):
        raise UserError(f"{dvc_file}: not a DVC file with an output 'path: {DATA_DIR}' and its md5") from None


def _git(repo_root: Path, *args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=repo_root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def data_version(repo_root: str | Path = ".") -> dict:
    """{md5 (from data.dvc), git_rev, matches_working_copy, working_copy_md5, dvc_file_committed}."""
    root = Path(repo_root)
    md5 = recorded_md5(root)
    working = dir_md5(root / DATA_DIR)
    committed = None
    if md5 is not None and _git(root, "rev-parse", "--git-dir") is not None:
        committed = _git(root, "status", "--porcelain", "--", DVC_FILE) == ""
    return {
        "md5": md5,
        "git_rev": _git(root, "rev-parse", "HEAD"),
        "matches_working_copy": md5 is not None and working == md5,
        "working_copy_md5": working,
        "dvc_file_committed": committed,
    }


def recorded_version(repo_root: str | Path = ".") -> dict:
    """What a stage's manifest records as its data version: `data_version()`, or why there is none
    (`{"unavailable": ...}`: no DVC-tracked data here, as in tests and ad-hoc runs)."""
    try:
        return data_version(repo_root)
    except Exception as err:
        return {"unavailable": str(err)[:200]}


# ---------------------------------------------------------------- DVC commands
def _dvc(repo_root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo_root, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise UserError(f"`dvc {' '.join(args)}` failed in {repo_root} (exit {proc.returncode}):\n"
                        f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def default_remote_url() -> Path:
    if os.environ.get("PERL_DVC_REMOTE"):
        return Path(os.environ["PERL_DVC_REMOTE"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "perl-rlhf" / "dvc-remote"


def ensure_remote(repo_root: Path) -> str:
    """The remote to push to: the user's default if one is set, else the local `perl-local` folder."""
    from dvc.config import Config  # read in-process: cheaper than two `dvc remote` start-ups

    conf = Config(dvc_dir=str(Path(repo_root) / ".dvc"))
    name = conf["core"].get("remote")
    if name:
        return name
    url = default_remote_url()
    url.mkdir(parents=True, exist_ok=True)
    if conf["remote"].get(LOCAL_REMOTE, {}).get("url") != str(url):
        with conf.edit("local") as local:
            local["remote"][LOCAL_REMOTE] = {"url": str(url)}
    return LOCAL_REMOTE


def commit_data(repo_root: str | Path) -> dict:
    """`dvc add data` then push to the remote; returns the new data version (commit data.dvc with git)."""
    root = Path(repo_root)
    _dvc(root, "add", DATA_DIR)
    remote = ensure_remote(root)
    _dvc(root, "push", "-r", remote, DVC_FILE)
    return {**data_version(root), "remote": remote}


def pull(repo_root: str | Path) -> bool:
    """Try to restore `data/` from the remote; False when the remote lacks the objects."""
    root = Path(repo_root)
    if recorded_md5(root) is None:
        return False
    remote = ensure_remote(root)
    proc = _dvc(root, "pull", "-r", remote, DVC_FILE, check=False)
    return proc.returncode == 0 and data_version(root)["matches_working_copy"]
