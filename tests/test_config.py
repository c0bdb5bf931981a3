from pathlib import Path

import pytest
import yaml

from perl_core.config import (PRESET_DIR, ConfigError, PerlConfig, TrainConfig, build_config, flatten, load_config,
                              parse_override)


def test_default_preset_loads_and_overrides_apply():
    cfg = load_config("default", ["reward.lora.rank=4", "policy.kl_coef=0.2", "data.splits.train=0.7",
                                  "data.splits.test=0.2"])
    assert cfg.reward.lora.rank == 4
    assert cfg.policy.kl_coef == 0.2
    assert cfg.data.splits.train == 0.7 and cfg.data.splits.test == 0.2
    assert cfg.preset == "default"


def test_override_values_are_parsed_as_yaml():
    assert parse_override("reward.lora.target_modules=[q_proj, v_proj]") == ("reward.lora.target_modules", ["q_proj", "v_proj"])
    assert parse_override("policy.reward_clip=null") == ("policy.reward_clip", None)
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("reward.lora.rank")


@pytest.mark.parametrize("override, needle", [
    ("reward.lora.rank=0", "reward.lora.rank"),
    ("sft.train.learning_rate=0", "sft.train.learning_rate"),
    ("reward.lora.rnak=4", "reward.lora.rnak: unknown setting"),
    ("data.splits.train=0.5", "must sum to 1"),
    ("policy.k=1", "policy.k must be >= 2"),
    ("reward.tuning=half", "reward.tuning"),
])
def test_invalid_settings_name_the_setting(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("default", [override])
    assert needle in str(err.value)


def test_rank_error_says_what_is_allowed():
    with pytest.raises(ConfigError) as err:
        build_config({}, ["reward.lora.rank=0"])
    assert "greater than or equal to 1" in str(err.value)


def test_unknown_preset_lists_the_presets(tmp_path):
    with pytest.raises(ConfigError, match="presets: .*default"):
        load_config("no-such-preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("reward: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_flatten_gives_dotted_keys():
    flat = flatten(PerlConfig())
    assert flat["reward.lora.rank"] == 8
    assert flat["data.splits.train"] == 0.8
    assert "reward.lora" not in flat


def test_a_partial_override_keeps_the_sections_own_defaults():
    cfg = build_config({}, ["sft.train.learning_rate=0.005"])
    assert cfg.sft.train.learning_rate == 0.005
    assert cfg.sft.train.max_steps == PerlConfig().sft.train.max_steps == 1000 != TrainConfig().max_steps
    assert build_config({"reward": {"train": {"max_steps": 5}}}).reward.train.eval_every == PerlConfig().reward.train.eval_every


def test_the_typed_tree_is_the_embedded_default():
    """One source of defaults: `PerlConfig()` (Prefect's `parameters: {}`) is the `default` preset (`make run`)."""
    assert yaml.safe_load((PRESET_DIR / "default.yaml").read_text()) == {}
    assert PerlConfig() == load_config("default")
    # the measured setting the README reports (docs/policy.md, "The current default")
    cfg = PerlConfig()
    assert (cfg.sft.train.max_steps, cfg.policy.kl_coef, cfg.policy.generation.temperature,
            cfg.policy.train.learning_rate, cfg.policy.train.max_steps) == (1000, 0.2, 0.7, 3e-4, 150)


@pytest.mark.slow
def test_a_non_editable_install_finds_its_presets_from_any_folder(tmp_path):
    """`pip install .` (not -e) into a fresh folder, then commands from elsewhere: the presets come
    with the package, and every package folder of the checkout is in it."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    src, site, elsewhere = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    skip = shutil.ignore_patterns("__pycache__")
    for name in ("perl_core", "flows", "bench", "configs"):
        shutil.copytree(root / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(src)], check=True, capture_output=True)
    packages = lambda base, top: {str(p.parent.relative_to(base)) for p in (base / top).rglob("__init__.py")}  # noqa: E731
    for top in ("perl_core", "flows", "bench"):
        assert packages(root, top) <= packages(site, top), "pyproject.toml's package list misses a folder"
    assert sorted(p.name for p in (site / "perl_core" / "configs").glob("*.yaml")) == \
        sorted(p.name for p in (root / "configs").glob("*.yaml"))

    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    run = lambda *args: subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True)  # noqa: E731
    check = run("-c", "import perl_core.config as c; from bench import report; "
                      "assert c.PerlConfig() == c.load_config('default'); "
                      "print(c.PRESET_DIR, [c.load_config(p).preset for p in ('tiny', 'taskmaster4')])")
    assert check.returncode == 0, check.stderr
    assert check.stdout.split()[0] == str(site / "perl_core" / "configs") and "['tiny', 'taskmaster4']" in check.stdout
    for args in (["--help"], ["report", "efficiency", "--help"]):
        shown = run("-m", "flows.cli", *args)
        assert shown.returncode == 0 and "Usage" in shown.stdout, shown.stderr
    made = run("-m", "flows.cli", "data", "import", "synthetic", "-c", "tiny", "--set", "data.synthetic.n_prompts=20")
    assert made.returncode == 0, made.stdout + made.stderr
    assert (elsewhere / "data" / "synthetic" / "pairwise" / "train.jsonl").stat().st_size > 0


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_every_preset_loads(preset):
    """A preset holding a setting the config refuses (say `policy.train.eval_every`) fails here, not in a run."""
    assert load_config(preset).preset == preset


def test_readme_pyproject_and_image_name_the_same_python():
    """The Python the README promises is pyproject's lower bound, the Docker image's and the one running the tests."""
    import re
    import sys
    import tomllib

    root = Path(__file__).resolve().parent.parent
    floor = tomllib.loads((root / "pyproject.toml").read_text())["project"]["requires-python"]
    readme = re.search(r"^Python (3\.\d+)", (root / "README.md").read_text(), re.M).group(1)
    image = re.search(r"^ARG PYTHON_VERSION=(3\.\d+)", (root / "docker" / "Dockerfile").read_text(), re.M).group(1)
    assert floor == f">={readme}" and image == readme == f"{sys.version_info[0]}.{sys.version_info[1]}"
