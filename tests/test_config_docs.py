"""The config documents itself: every setting has a description, docs/config.md is the model's own
rendering, and `config show`'s rows carry the resolved value beside the default at that path."""
import re
import typing
from pathlib import Path

import pytest
import yaml

from perl_core.config import PRESET_DIR, PerlConfig, Section, build_config, load_config
from perl_core.config_docs import docstring, markdown, rows, show_lines, yaml_value

DOCS = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_docs_config_md_is_current():
    assert DOCS.read_text(encoding="utf-8") == markdown(), (
        "docs/config.md is stale: regenerate it with `python -m perl_core.config_docs > docs/config.md`")


def test_every_setting_and_section_has_a_description():
    missing = [r.path for r in rows() if not r.description]
    assert missing == [], f"add a Field(description=...) (a section: a class docstring) for: {', '.join(missing)}"
    assert sum(r.section is None for r in rows()) > 100  # the walk reaches the whole tree


def test_descriptions_render_in_markdown():
    """`<name>` outside a code span is an HTML tag to a Markdown renderer, and vanishes: quote it in backticks."""
    bare = [r.path for r in rows() if re.search(r"<[A-Za-z][^>]*>", re.sub(r"`[^`]*`", "", r.description))]
    assert bare == [], f"put the <...> of these descriptions in backticks: {bare}"


def _classes(annotation) -> set:
    """The Section classes an annotation names, inside list[...], Optional[...] and unions too."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return {annotation} | {c for f in annotation.model_fields.values() for c in _classes(f.annotation)}
    return {c for arg in typing.get_args(annotation) for c in _classes(arg)}


def test_every_section_class_the_tree_reaches_is_described():
    """Also a section reached through a list (`list[SomeSection]`), which the rows show as one value."""
    missing = sorted(f"{cls.__name__}.{name}" for cls in _classes(PerlConfig)
                     for name, field in cls.model_fields.items()
                     if not field.description and not _classes(field.annotation))
    assert missing == [], f"add a Field(description=...) for: {', '.join(missing)}"
    undocumented = sorted(cls.__name__ for cls in _classes(PerlConfig) if not docstring(cls))
    assert undocumented == [], f"give these sections a one-line class docstring: {undocumented}"


def _section_fields(model: type[Section], prefix: str = ""):
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, Section):
            yield prefix + name, field
            yield from _section_fields(field.annotation, prefix + name + ".")


def test_a_section_is_described_by_its_class_docstring_only():
    """One text per section: a Field description on a section-typed field would never be shown."""
    described = [path for path, field in _section_fields(PerlConfig) if field.description]
    assert described == [], f"move these descriptions into the section class's docstring: {described}"


def test_rows_carry_the_value_and_the_default_at_that_path():
    by_path = {r.path: r for r in rows(load_config("default", ["reward.lora.rank=4"]))}
    assert (by_path["reward.lora.rank"].value, by_path["reward.lora.rank"].default) == (4, 8)
    assert by_path["reward.lora.rank"].changed and not by_path["sft.lora.rank"].changed
    # one class, other defaults in other places: the default is PerlConfig()'s, not TrainConfig()'s 300
    assert (by_path["sft.train.max_steps"].default, by_path["reward.train.max_steps"].default) == (1000, 150)
    assert by_path["reward.lora"].section is not None and not by_path["reward.lora"].changed
    assert by_path["reward.lora"].description.startswith("The LoRA adapter a stage trains")
    assert by_path["reward.lora.rank"].description == PerlConfig.model_fields["reward"].annotation \
        .model_fields["lora"].annotation.model_fields["rank"].description


@pytest.mark.parametrize("path, expected", [
    ("data.splits.train", "float, >= 0, <= 1"),
    ("policy.reward_clip", "float | null, > 0"),
    ("sft.train.schedule", "linear | cosine | constant"),
    ("reward.lora.target_modules", "auto | list[str]"),
    ("data.column_map", "dict[str, str]"),
    ("data.chat_template", "auto | 'off'"),  # quoted: a bare off is YAML's false
])
def test_type_column(path, expected):
    assert {r.path: r.type for r in rows()}[path] == expected


@pytest.mark.parametrize("value, text", [
    (3e-4, "0.0003"), (None, "null"), (True, "true"), ("off", "'off'"), ([], "[]"),
    (["--gpu_ids", "0,1"], "[--gpu_ids, '0,1']"), ("a\nb", '"a\\nb"'), (PerlConfig().data.splits,
                                                                      "{train: 0.8, validation: 0.1, test: 0.1}"),
])
def test_values_print_as_one_line_of_yaml(value, text):
    assert yaml_value(value) == text and yaml.safe_load(text) == (value.model_dump() if isinstance(value, Section)
                                                                  else value)


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_config_show_output_loads_back_as_the_same_config(preset):
    """The shown tree is the resolved one: read as YAML (comments dropped), it builds the same config."""
    cfg = load_config(preset, ["reward.lora.target_modules=[q_proj, v_proj]", "data.column_map={text: prompt}",
                               "tracking.experiment=a # b"])
    assert build_config(yaml.safe_load("\n".join(show_lines(cfg)))) == cfg


def test_config_show_marks_what_differs_from_the_default():
    lines = show_lines(load_config("default", ["policy.kl_coef=0.05"]))
    (kl,) = [line for line in lines if line.strip().startswith("kl_coef:")]
    assert kl.startswith("  kl_coef: 0.05")
    assert kl.endswith("  # [changed] beta in r - beta * KL(policy || anchor) (default: 0.2)")
    assert [line.split("#")[0].strip() for line in lines[1:] if "[changed]" in line] == ["kl_coef: 0.05"]
    assert lines[0].startswith("# preset default;")


def test_the_reference_has_one_row_per_setting_and_a_heading_per_section():
    page = markdown()
    for row in rows():
        if row.section is None:
            assert page.count(f"| `{row.path}` |") == 1, row.path
        else:
            assert page.count(f"\n## `{row.path}`\n") == 1, row.path
