"""Options and error handling shared by every `perl-rlhf` command."""
from __future__ import annotations

import functools
import sys
from typing import Callable, List, Optional

import typer
from rich.console import Console

from perl_core.config import ConfigError, PerlConfig, load_config

console = Console(stderr=True)

ConfigOpt = typer.Option("default", "--config", "-c", help="preset name in configs/ (default, taskmaster4, ...) or a YAML path")
SetOpt = typer.Option(None, "--set", "-s", help="override a setting, e.g. --set reward.lora.rank=4 (repeatable)")


def cli_config(config: str, overrides: Optional[List[str]]) -> PerlConfig:
    return load_config(config, list(overrides or []))


def friendly_errors(fn: Callable) -> Callable:
    """Expected user errors (bad config, bad data) print one clear message and exit 2, no traceback."""
    from perl_core.errors import UserError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, UserError) as err:
            console.print(f"[bold red]error:[/] {err}", highlight=False, markup=True)
            sys.exit(2)

    return wrapper
