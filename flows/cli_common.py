"""Options and error handling shared by every `perl-rlhf` command."""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console

from perl_core.config import ConfigError, PerlConfig, load_config

# under `accelerate launch` only the main process (RANK 0) prints; errors print on every process
# soft_wrap: a progress or metric line stays one line in a log file, whatever the terminal width
console = Console(stderr=True, soft_wrap=True, quiet=os.environ.get("RANK", "0") != "0")

ConfigOpt = typer.Option("default", "--config", "-c", help="preset name in configs/ (default, taskmaster4, ...) or a YAML path")
SetOpt = typer.Option(None, "--set", "-s", help="override a setting, e.g. --set reward.lora.rank=4 (repeatable)")
MetricsFileOpt = typer.Option(None, "--metrics-file", help="also write the per-step metrics and the final ones as "
                              "JSON lines to this file (the main process; the pipeline reads it under "
                              "launch.num_processes > 1)")


def cli_config(config: str, overrides: Optional[List[str]]) -> PerlConfig:
    return load_config(config, list(overrides or []))


def metrics_file_log(path: Optional[Path]):
    """The `--metrics-file` writer (perl_core.callbacks.JsonlLog) on the main process, else None."""
    if path is None or os.environ.get("RANK", "0") != "0":
        return None
    from perl_core.callbacks import JsonlLog

    return JsonlLog(path)


def check_model_dir(path: Path, *kinds: str) -> None:
    """A model folder named on the command line: its manifest, kind and files, checked before any loading.
    "reward_model" admits a reward-model ensemble too, whose member folders are checked."""
    from perl_core.artifacts import ENSEMBLE_KIND, check_model_files, read_manifest

    kinds = kinds + ((ENSEMBLE_KIND,) if "reward_model" in kinds else ())
    manifest = read_manifest(path, expect_kind=kinds)
    if manifest.get("kind") != ENSEMBLE_KIND:
        check_model_files(path, manifest)
        return
    from perl_core.reward.ensemble import read_ensemble

    for member in read_ensemble(path).member_dirs:
        check_model_files(member, read_manifest(member))


def read_text_file(path: Path, option: str) -> str:
    """A UTF-8 text file named by `option`, or a UserError saying what is wrong with it."""
    from perl_core.data.local import decode_utf8
    from perl_core.errors import UserError

    if not path.is_file():
        raise UserError(f"{option} {path} " + ("is a folder, not a file" if path.exists() else "does not exist"))
    return decode_utf8(path.read_bytes(), str(path))


def metric_lines(metrics: dict) -> list[str]:
    """One `  name  value` line a metric, sorted by name, names aligned, floats to 4 decimals."""
    width = max((len(key) for key in metrics), default=0)
    return [f"  {key:{width}s}  {value:.4f}" if isinstance(value, float) else f"  {key:{width}s}  {value}"
            for key, value in sorted(metrics.items())]


def print_metrics(metrics: dict) -> None:
    """The metrics a command ends with (training, evaluation, comparison), as :func:`metric_lines`."""
    for line in metric_lines(metrics):
        console.print(line, markup=False, highlight=False)


def friendly_errors(fn: Callable) -> Callable:
    """Expected user errors (bad config, bad data) print one clear message and exit 2, no traceback."""
    from perl_core.errors import UserError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, UserError) as err:
            quiet, console.quiet = console.quiet, False  # every process says why it stopped
            console.print(f"[bold red]error:[/] {err}", highlight=False, markup=True)
            console.quiet = quiet
            sys.exit(2)

    return wrapper
