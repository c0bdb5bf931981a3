"""`perl-rlhf config show`: the resolved settings through the loader every command uses."""
import pytest
from typer.testing import CliRunner

from flows.cli import app
from perl_core.config import LoraConfig


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    from flows import cli_common

    monkeypatch.setattr(cli_common.console, "width", 1000)


def invoke(*args):
    return CliRunner().invoke(app, list(args))


def lines_by_path(output: str) -> dict[str, tuple[str, str]]:
    """Each `key: value  # comment` line as (`key: value`, `comment`) under its dotted path (the
    indentation gives the sections)."""
    found, stack = {}, []
    for line in output.splitlines():
        if line.startswith("#"):
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        stack[depth:] = [line.strip().split(":", 1)[0]]
        entry, comment = line.split("  # ", 1)
        found[".".join(stack)] = (entry.strip(), comment)
    return found


def test_a_preset_and_an_override_show_their_values_with_descriptions():
    result = invoke("config", "show", "taskmaster4", "--set", "reward.lora.rank=4")
    assert result.exit_code == 0, result.output
    shown = lines_by_path(result.stdout)
    rank = LoraConfig.model_fields["rank"].description
    assert shown["reward.lora.rank"] == ("rank: 4", f"[changed] {rank} (default: 8)")
    assert shown["sft.lora.rank"] == ("rank: 8", f"{rank} (default: 8)")
    assert shown["data.source"][0] == "source: taskmaster4"
    assert shown["data.source"][1].startswith("[changed] where the rows come from")
    assert shown["reward"] == ("reward:", "The reward model: a scalar score head on a backbone, trained on preferences "
                                          "(`perl-rlhf reward train`).")


def test_an_unknown_key_is_the_error_every_command_gives():
    shown = invoke("config", "show", "--set", "reward.lora.rnak=4")
    other = invoke("data", "card", "--set", "reward.lora.rnak=4")
    assert shown.exit_code == other.exit_code == 2 and isinstance(shown.exception, SystemExit)
    assert "error: invalid config" in shown.output and "reward.lora.rnak: unknown setting" in shown.output
    assert shown.output == other.output and "Traceback" not in shown.output


def test_an_unknown_preset_lists_the_presets():
    result = invoke("config", "show", "no-such-preset")
    assert result.exit_code == 2
    assert "error: unknown preset 'no-such-preset'; presets: " in " ".join(result.output.split())


def test_the_preset_can_be_named_as_every_command_names_it():
    assert invoke("config", "show", "-c", "tiny").stdout == invoke("config", "show", "tiny").stdout
    assert invoke("config", "show", "tiny").stdout != invoke("config", "show").stdout
    twice = invoke("config", "show", "tiny", "-c", "taskmaster4")
    assert twice.exit_code == 2 and "the preset is given twice ('tiny' and --config 'taskmaster4')" in twice.output
