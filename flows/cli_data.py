"""`perl-rlhf data ...`: import/prepare a dataset, show its card, show the DVC data version."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from flows.cli_common import ConfigOpt, SetOpt, cli_config, friendly_errors
from perl_core.config import DATA_SOURCES

app = typer.Typer(help="Import, prepare and version preference data (DVC).", no_args_is_help=True)
out = Console()


@app.command("import")
@friendly_errors
def import_(
    source: str = typer.Argument(..., help=" | ".join(DATA_SOURCES)),
    path: Optional[str] = typer.Option(None, "--path", "-p", help="file or folder (local, hh-rlhf, taskmaster4) or hub dataset name"),
    name: Optional[str] = typer.Option(None, "--name", help="folder under data.data_dir (default: the source name)"),
    fmt: Optional[str] = typer.Option(None, "--format", help="local/hub rows: pairwise | pointwise | sft"),
    on_error: Optional[str] = typer.Option(None, "--on-error", help="raise (default: stop at the first bad row) | skip (write rejects.jsonl)"),
    force: bool = typer.Option(False, "--force", help="regenerate the synthetic default even if it is up to date"),
    config: str = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
):
    """Read SOURCE, validate, normalise, dedupe, split, write data/<name>/ with its card; inside the
    tracked data/ folder also `dvc add` + push (then commit data.dvc)."""
    from perl_core.data import prepare_dataset
    from perl_core.data.versioning import tracking_repo

    from pydantic import ValidationError

    from perl_core.config import ConfigError

    cfg = cli_config(config, overrides)
    for key, value in (("source", source), ("path", path), ("name", name), ("format", fmt), ("on_error", on_error)):
        if value is not None:
            try:
                setattr(cfg.data, key, value)
            except ValidationError as err:
                what = "SOURCE" if key == "source" else f"--{key.replace('_', '-')}"
                raise ConfigError(f"{what} {value!r}: {err.errors()[0]['msg']}") from None
    with out.status(f"importing {source}") as status:
        result = prepare_dataset(cfg, force=force, on_step=lambda msg: status.update(msg))
    m = result.metrics
    if m.get("skipped"):
        out.print(f"{result.out_dir} already up to date (use --force to regenerate)")
    table = Table(title=f"{result.out_dir}")
    for col in ("view", "read", "rejected", "duplicates", "too long", "train", "validation", "test"):
        table.add_column(col, justify="left" if col == "view" else "right")
    for view in ("pairwise", "pointwise", "sft"):
        if f"{view}.read" in m:
            table.add_row(view, *(str(int(m.get(f"{view}.{k}", 0))) for k in
                                  ("read", "rejected", "duplicates", "too_long", "train.rows", "validation.rows", "test.rows")))
    out.print(table)
    if m.get("rejected"):
        out.print(f"[yellow]{int(m['rejected'])} rejected rows with their reasons: {result.out_dir / 'rejects.jsonl'}[/]")
    out.print(f"card: {result.out_dir / 'card.md'}")
    repo = tracking_repo(cfg.data.data_dir)
    if repo is None:
        out.print(f"{cfg.data.data_dir} is not the DVC-tracked data/ folder: data.dvc untouched "
                  f"(the card records the content hash)")
    else:
        from perl_core.data.versioning import data_version

        _print_version(repo)
        if data_version(repo)["dvc_file_committed"] is False:
            out.print("commit the new version with: git add data.dvc && git commit -m 'data: ...'")


@app.command()
@friendly_errors
def status(repo: Path = typer.Option(Path("."), "--repo", help="repository holding data.dvc")):
    """The data version: md5 recorded in data.dvc, git revision, and whether data/ matches it."""
    _print_version(repo)
    data = repo / "data"
    if data.is_dir():
        from perl_core.data.card import read_card
        from perl_core.errors import DataError

        for folder in sorted(p for p in data.iterdir() if p.is_dir()):
            try:
                card = read_card(folder)
            except DataError as err:
                out.print(f"  {folder.name}: [yellow]{err}[/]", highlight=False)
                continue
            if card:
                kept = ", ".join(f"{v} {info.get('kept', '?')}" for v, info in sorted(card["views"].items()))
                out.print(f"  {folder.name}: {kept} rows (content {str(card.get('content_hash'))[:12]})")


@app.command()
@friendly_errors
def card(config: str = ConfigOpt, overrides: Optional[List[str]] = SetOpt):
    """Print the data card (Markdown) of the configured dataset."""
    from perl_core.data.prepare import dataset_dir
    from perl_core.errors import DataError

    cfg = cli_config(config, overrides)
    path = dataset_dir(cfg.data) / "card.md"
    if not path.exists():
        raise DataError(f"{path} not found: run `perl-rlhf data import {cfg.data.source}` first")
    out.print(path.read_text(), markup=False, highlight=False)


def _print_version(repo: Path) -> None:
    from perl_core.data.versioning import data_version

    v = data_version(repo)
    if v["md5"] is None:
        out.print(f"no data.dvc in {repo.resolve()}: data/ is not versioned yet (run `perl-rlhf data import synthetic`)")
        return
    state = "[green]matches[/]" if v["matches_working_copy"] else "[red]does NOT match[/]"
    committed = {True: "committed", False: "modified, not committed", None: "no git"}[v["dvc_file_committed"]]
    out.print(f"data version: md5 {v['md5']} (data.dvc {committed}), git {v['git_rev'] or '-'}")
    out.print(f"working copy data/: {state} (md5 {v['working_copy_md5'] or 'missing'})")
