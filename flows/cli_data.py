"""`perl-rlhf data ...`"""
import typer

app = typer.Typer(help="Import, prepare and version preference data (DVC).", no_args_is_help=True)
