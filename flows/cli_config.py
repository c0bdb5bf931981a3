"""`perl-rlhf config show`: the resolved settings (a preset, then `--set` overrides), each with its
description and default (perl_core.config_docs, which also writes docs/config.md)."""
from __future__ import annotations

from typing import List, Optional

import typer

from flows.cli_common import ConfigOpt, SetOpt, cli_config, friendly_errors

app = typer.Typer(help="The settings: every key, its value, default and meaning (docs/config.md).",
                  no_args_is_help=True)


@app.command("show")
@friendly_errors
def show(
    preset: Optional[str] = typer.Argument(None, help="preset name in configs/ or a YAML path (the same as --config)"),
    config: str = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
) -> None:
    """Print the resolved config as YAML, each setting commented with its description and default;
    the settings that differ from the embedded default are marked as changed."""
    from perl_core.config_docs import show_lines
    from perl_core.errors import UserError

    if preset is not None and config != "default" and preset != config:
        raise UserError(f"config show: the preset is given twice ({preset!r} and --config {config!r}); give one")
    typer.echo("\n".join(show_lines(cli_config(preset or config, overrides))))
