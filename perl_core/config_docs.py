"""The config tree, described: one row per setting (dotted path, type, value, default, description),
read from the pydantic model in perl_core/config.py. `perl-rlhf config show` prints a resolved
config as commented YAML; docs/config.md is the same rows as tables:

    python -m perl_core.config_docs > docs/config.md

A setting's description is its `Field(description=...)`; a section's is its class's docstring. A
setting's default is the embedded default at that path (`PerlConfig()`): one class can carry other
defaults in other places (`sft.train.max_steps` is 1000, `reward.train.max_steps` 150).
"""
from __future__ import annotations

import inspect
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Optional, Union

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from perl_core.config import PerlConfig, Section


@dataclass(frozen=True)
class Row:
    path: str  # dotted, as `--set` takes it: reward.lora.rank
    depth: int  # 0 for a top-level key
    type: str  # `int, >= 1`, `linear | cosine | constant`, `section`
    description: str  # one line (a section: its docstring's first paragraph)
    section: Optional[type[Section]] = None  # the class, for a section's row
    value: Any = None  # a setting's value in the config walked (none for a section)
    default: Any = None  # a setting's value in `PerlConfig()`

    @property
    def changed(self) -> bool:
        return self.section is None and self.value != self.default


def docstring(cls: type) -> str:
    """The class's own docstring (not an inherited one), dedented; empty when it has none."""
    return inspect.cleandoc(cls.__dict__.get("__doc__") or "")


def section_description(cls: type[Section]) -> str:
    """A section's one-line description: the first paragraph of its class docstring."""
    return " ".join(docstring(cls).split("\n\n")[0].split())


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, Section)


def type_name(annotation: Any) -> str:
    """`int`, `str | null`, `linear | cosine | constant`, `list[str]`: how a setting's values read in YAML."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(yaml_value(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in typing.get_args(annotation))}]"
    return annotation.__name__


_BOUNDS = {annotated_types.Ge: ">=", annotated_types.Gt: ">", annotated_types.Le: "<=", annotated_types.Lt: "<"}


def _bounds(metadata: list) -> str:
    return ", ".join(f"{_BOUNDS[type(m)]} {yaml_value(getattr(m, type(m).__name__.lower()))}"
                     for m in metadata if type(m) in _BOUNDS)


def yaml_value(value: Any) -> str:
    """A value as one line of YAML flow style (what `--set key=...` and a preset file take)."""
    value = to_jsonable_python(value)  # models (in a list), paths, tuples: as the YAML loader would give them back
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), allow_unicode=True,
                          sort_keys=False)
    text = text.removesuffix("\n...\n").strip()
    return json.dumps(value, ensure_ascii=False) if "\n" in text else text  # a line break: JSON's quoting is YAML too


def rows(cfg: Optional[BaseModel] = None, default: Optional[BaseModel] = None, prefix: str = "") -> Iterator[Row]:
    """Every section and setting of `cfg` (default: the embedded default), in the order the classes
    declare them, a section's row before its settings."""
    cfg = PerlConfig() if cfg is None else cfg
    default = PerlConfig() if default is None else default
    for name, field in type(cfg).model_fields.items():
        path = prefix + name
        depth = path.count(".")
        if _is_section(field.annotation):
            yield Row(path, depth, "section", section_description(field.annotation), section=field.annotation)
            yield from rows(getattr(cfg, name), getattr(default, name), path + ".")
            continue
        kind = type_name(field.annotation)
        bounds = _bounds(field.metadata)
        yield Row(path, depth, f"{kind}, {bounds}" if bounds else kind, " ".join((field.description or "").split()),
                  value=getattr(cfg, name), default=getattr(default, name))


def show_lines(cfg: PerlConfig) -> list[str]:
    """`cfg` as YAML, each setting commented with its description and the embedded default; a setting
    that differs from that default is marked `[changed]`. Without the comments it loads as a preset."""
    lines = [f"# preset {cfg.preset}; [changed] marks a setting that differs from the embedded default"]
    siblings: dict[str, int] = {}  # a section's settings align their comments
    for row in rows(cfg):
        if row.section is None:
            parent = row.path.rpartition(".")[0]
            siblings[parent] = max(siblings.get(parent, 0), len(_entry(row)))
    for row in rows(cfg):
        if row.section is not None:
            lines.append(f"{'  ' * row.depth}{row.path.rpartition('.')[2]}:  # {row.description}")
            continue
        mark = "[changed] " if row.changed else ""
        entry = _entry(row).ljust(min(siblings[row.path.rpartition(".")[0]], 48))
        lines.append(f"{entry}  # {mark}{row.description} (default: {yaml_value(row.default)})")
    return lines


def _entry(row: Row) -> str:
    return f"{'  ' * row.depth}{row.path.rpartition('.')[2]}: {yaml_value(row.value)}"


INTRO = """\
# Configuration reference

Every setting of the pipeline, generated from the typed config tree in `perl_core/config.py`
(`python -m perl_core.config_docs > docs/config.md`; a test fails when this page is stale).

- **Defaults live in one place**: the field defaults of `perl_core/config.py` are the embedded
  default that `make run`, `perl-rlhf run` and the Prefect deployments train. The *default* column
  below is that value at each path: one class can have other defaults in other places
  (`sft.train.max_steps` is 1000, `reward.train.max_steps` 150).
- **Presets** in `configs/` (`--config/-c NAME` or a path to a YAML file) change some settings and
  leave the others at their defaults; `configs/default.yaml` is empty. Each file's header says
  what it is for.
- **Overrides** come last: `--set section.key=value` (repeatable), the value read as YAML
  (`--set reward.lora.target_modules=[q_proj,v_proj]`, `--set policy.reward_clip=null`).
- Every section rejects unknown keys, and every value is checked (the *type* column gives the
  allowed range): a wrong setting stops the command with one message naming its full path.
- `perl-rlhf config show [PRESET] [--set key=value ...]` prints the resolved settings, each with
  its description and default, marking the ones that differ from the default.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown() -> str:
    """docs/config.md: the intro, then one table per section (key, type, default, description)."""
    out = [INTRO]
    tables: dict[str, list[Row]] = {"": []}  # section path -> its own settings; "" the top level
    sections: dict[str, Row] = {}
    for row in rows():
        if row.section is not None:
            tables[row.path], sections[row.path] = [], row
        else:
            tables[row.path.rpartition(".")[0]].append(row)
    for path, settings in tables.items():
        out.append(f"## `{path}`" if path else "## Top level")
        about = docstring(sections[path].section) if path else docstring(PerlConfig)
        if about:
            out.append(about)
        if settings:
            out.append("\n".join(["| key | type | default | description |", "|---|---|---|---|"] + [
                f"| `{r.path}` | {_cell(r.type)} | `{_cell(yaml_value(r.default))}` | {_cell(r.description)} |"
                for r in settings]))
    return "\n\n".join(block.rstrip("\n") for block in out if block) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
