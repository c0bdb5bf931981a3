"""The training tasks under `launch.num_processes` N > 1: the stage runs as `accelerate launch ... perl-rlhf
<stage> train` in a subprocess, and its JSON-lines metrics reach the task's callbacks.

Without a Prefect server: the tasks' functions are called directly (`.fn`), their progress artifact
switched off. A fake `Popen` stands in for the launch (argv, config file, hand-written metrics, a
torchrun failure); one real launch of two CPU processes trains the tiny reward model.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("prefect")
from typer.testing import CliRunner  # noqa: E402

from flows import launch, pipeline, tasks  # noqa: E402
from perl_core.artifacts import StageResult  # noqa: E402
from perl_core.callbacks import collect, replay  # noqa: E402
from perl_core.config import load_config  # noqa: E402
from perl_core.errors import UserError  # noqa: E402

SCRIPT = str(Path(sys.executable).with_name("perl-rlhf"))

# what torchrun prints when both processes stop on a perl-rlhf error (rich wraps it at 80 columns)
TORCHRUN_FAILURE = """\
error: data/synthetic/pairwise/train.jsonl not found: run
`perl-rlhf data import synthetic` (or `make run`) first
error: data/synthetic/pairwise/train.jsonl not found: run
`perl-rlhf data import synthetic` (or `make run`) first
E1127 17:12:48.733000 12052 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 2) local_rank: 0 (pid: 12055) of binary: python
Traceback (most recent call last):
  File "accelerate/commands/launch.py", line 1423, in <module>
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
Root Cause (first observed failure):
  exitcode  : 2 (pid: 12055)
============================================================
"""


class FakeLaunch:
    """`subprocess.Popen` for one launch: writes `lines` to the --metrics-file in two parts (the first
    ends mid-line) across two waits, and `output` to the launch's stdout, then exits with `returncode`."""

    def __init__(self, lines=(), output="", returncode=0):
        self.lines, self.output, self.code = list(lines), output, returncode
        self.argv, self.env, self.config_text, self.waits, self.terminated = None, None, None, 0, False

    def __call__(self, argv, stdout, stderr, env):
        self.argv, self.env = list(argv), env
        self.config_text = Path(self.option("--config")).read_text()
        stdout.write(self.output)
        stdout.flush()
        self.returncode = None
        return self

    def option(self, name):
        return self.argv[self.argv.index(name) + 1]

    def _append(self, text):
        with open(self.option("--metrics-file"), "a") as f:
            f.write(text)

    def terminate(self):
        self.terminated = True

    def wait(self, timeout=None):
        self.waits += 1
        text = "".join(line + "\n" for line in self.lines)
        half = len(text) // 2
        if self.waits == 1:  # still running: the follower must hand over whole lines only
            self._append(text[:half])
            raise subprocess.TimeoutExpired(self.argv, timeout)
        self._append(text[half:])
        self.returncode = self.code
        return self.code


@pytest.fixture
def no_progress_artifacts(monkeypatch):
    monkeypatch.setattr(tasks, "create_progress_artifact", lambda **kwargs: None)


def test_a_launched_policy_task_runs_the_stage_command_and_forwards_its_metrics(tmp_path, monkeypatch,
                                                                               no_progress_artifacts):
    cfg = load_config("tiny", [f"artifacts_dir={tmp_path}", "launch.num_processes=2", "launch.mixed_precision=bf16",
                               "launch.cpu=true", "launch.accelerate_args=[--main_process_port, '29611']"])
    out = tmp_path / "policy" / "k1"
    lines = ['{"step": 1, "metrics": {"rl/reward": 0.25, "rl/kl": 0.5}}',
             '{"step": 2, "metrics": {"rl/reward": 0.75, "rl/kl": 1.5}}',
             '{"step": 2, "samples": [{"prompt": "p", "response": "r", "reward": 0.75}]}',
             '{"result": {"metrics": {"steps": 2, "trainable_params": 8, "note": "x"}, '
             f'"artifacts": {{"policy": "{out}"}}}}}}']
    fake = FakeLaunch(lines)
    monkeypatch.setattr(subprocess, "Popen", fake)
    seen, samples = [], []
    result = tasks.train_policy.fn(cfg, key="k1", out_dir=str(out), anchor_dir="/a/anchor", reward_model_dir="/a/rm",
                                   run_id="r1", callback=collect(seen),
                                   samples_callback=lambda rows, step: samples.append((step, rows)))

    folder = tmp_path / "policy" / "k1.launch"
    assert fake.argv == [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                         "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
                         "--main_process_port", "29611", SCRIPT, "policy", "train",
                         "--config", str(folder / "config.yaml"), "--out", str(out), "--resume",
                         "--metrics-file", str(folder / "metrics.jsonl"),
                         "--anchor", "/a/anchor", "--reward-model", "/a/rm"]
    assert fake.env["ACCELERATE_USE_CPU"] == "1"
    # the stage command reads back exactly the config the task was given
    assert load_config(folder / "config.yaml") == cfg
    assert fake.waits == 2
    assert seen == [(1, {"rl/reward": 0.25, "rl/kl": 0.5}), (2, {"rl/reward": 0.75, "rl/kl": 1.5})]
    assert samples == [(2, [{"prompt": "p", "response": "r", "reward": 0.75}])]
    assert result == {"key": "k1", "out_dir": str(out), "metrics": {"steps": 2.0, "trainable_params": 8.0},
                      "artifacts": {"policy": str(out)}, "produced_by_run": "r1"}


def test_a_reward_model_launch_passes_the_anchor_and_the_anchor_task_none(tmp_path, monkeypatch,
                                                                           no_progress_artifacts):
    cfg = load_config("tiny", [f"artifacts_dir={tmp_path}", "launch.num_processes=4"])
    done = ['{"result": {"metrics": {}, "artifacts": {}}}']
    fake = FakeLaunch(done)
    monkeypatch.setattr(subprocess, "Popen", fake)
    tasks.train_reward_model.fn(cfg, key="k", out_dir=str(tmp_path / "rm"), base_model="/a/anchor")
    assert fake.argv[fake.argv.index(SCRIPT):] == [
        SCRIPT, "reward", "train", "--config", str(tmp_path / "rm.launch" / "config.yaml"), "--out", str(tmp_path / "rm"),
        "--resume", "--metrics-file", str(tmp_path / "rm.launch" / "metrics.jsonl"), "--base-model", "/a/anchor"]
    assert fake.option("--num_processes") == "4"
    assert fake.env.get("ACCELERATE_USE_CPU") == os.environ.get("ACCELERATE_USE_CPU")  # launch.cpu false: inherited
    fake = FakeLaunch(done)
    monkeypatch.setattr(subprocess, "Popen", fake)
    tasks.train_anchor.fn(cfg, key="k", out_dir=str(tmp_path / "anchor"))
    assert fake.argv[fake.argv.index(SCRIPT) + 1:fake.argv.index(SCRIPT) + 3] == ["sft", "train"]
    assert fake.argv[-2:] == ["--metrics-file", str(tmp_path / "anchor.launch" / "metrics.jsonl")]


def test_one_process_trains_in_the_task_as_before(tmp_path, monkeypatch, no_progress_artifacts):
    def no_launch(*args, **kwargs):
        raise AssertionError("launch.num_processes=1 must not start a subprocess")

    calls = []

    def fake_anchor(cfg, out_dir, callback, resume):
        calls.append(resume)
        callback({"train/loss": 0.5}, 1)
        return StageResult(Path(out_dir), {"steps": 1})

    monkeypatch.setattr(subprocess, "Popen", no_launch)
    monkeypatch.setattr("perl_core.sft.train_anchor", fake_anchor)
    seen = []
    result = tasks.train_anchor.fn(load_config("tiny"), key="k", out_dir=str(tmp_path / "a"), callback=collect(seen))
    assert calls == [True] and seen == [(1, {"train/loss": 0.5})] and result["metrics"] == {"steps": 1.0}
    assert not (tmp_path / "a.launch").exists()


def test_a_failed_launch_names_the_stage_and_the_error_on_one_line(tmp_path, monkeypatch, no_progress_artifacts):
    cfg = load_config("tiny", [f"artifacts_dir={tmp_path}", "launch.num_processes=2"])
    monkeypatch.setattr(subprocess, "Popen", FakeLaunch(output=TORCHRUN_FAILURE, returncode=1))
    with pytest.raises(launch.LaunchFailed) as err:
        tasks.train_reward_model.fn(cfg, key="k", out_dir=str(tmp_path / "rm"))
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, UserError)  # one line; Prefect does not retry it
    assert message.startswith("reward_model: `accelerate launch --num_processes 2 perl-rlhf reward train` failed "
                              "(exit code 1): ")
    # the processes' own error, once, and not torchrun's report after it
    assert ("error: data/synthetic/pairwise/train.jsonl not found: run | `perl-rlhf data import synthetic` "
            "(or `make run`) first (whole output: ") in message
    assert message.count("not found") == 1 and "ChildFailedError" not in message
    assert message.endswith(f"{tmp_path / 'rm.launch' / 'launch.log'})")

    monkeypatch.setattr(subprocess, "Popen", FakeLaunch(output="done\n"))  # exit 0, no result line
    with pytest.raises(launch.LaunchFailed, match=r"^anchor: .* exited without writing its result to .*metrics\.jsonl"):
        tasks.train_anchor.fn(cfg, key="k", out_dir=str(tmp_path / "a"))


def test_a_task_that_stops_while_the_stage_trains_stops_the_launch(tmp_path, monkeypatch, no_progress_artifacts):
    cfg = load_config("tiny", [f"artifacts_dir={tmp_path}", "launch.num_processes=2"])
    fake = FakeLaunch(['{"step": 1, "metrics": {"train/loss": 1.0}}', '{"step": 2, "metrics": {"train/loss": 0.5}}'])
    monkeypatch.setattr(subprocess, "Popen", fake)

    def tracking_down(metrics, step):
        raise ConnectionError("MLflow went away")

    with pytest.raises(ConnectionError):
        tasks.train_anchor.fn(cfg, key="k", out_dir=str(tmp_path / "a"), callback=tracking_down)
    assert fake.terminated and fake.waits == 2  # terminated, then waited for


@pytest.mark.parametrize("command", ["sft", "reward", "policy"])
def test_the_stage_commands_write_their_metrics_file(tmp_path, monkeypatch, command):
    """`perl-rlhf <stage> train --metrics-file F`: every step, RL's samples and the result, read back by `replay`."""
    from flows import cli_policy
    from flows.cli import app

    def stage(cfg, out_dir, *dirs, callback, resume, samples_callback=None, base_model=None):
        callback({"train/loss": 2.0}, 1)
        callback({"train/loss": 1.0, "eval/loss": 1.5}, 2)
        if samples_callback:
            samples_callback([{"prompt": "p", "response": "r"}], 2)
        return StageResult(Path(out_dir), {"steps": 2, "seconds": 0.5}, {"model": Path(out_dir)})

    target = {"sft": "perl_core.sft.train_anchor", "reward": "perl_core.reward.stage.train_reward_stage",
              "policy": "perl_core.policy.stage.train_policy"}[command]
    monkeypatch.setattr(target, stage)
    monkeypatch.setattr(cli_policy, "check_model_dir", lambda *args: None)
    monkeypatch.setenv("RANK", "0")
    out, metrics_file = tmp_path / "out", tmp_path / "m" / "metrics.jsonl"
    run = CliRunner().invoke(app, [command, "train", "-c", "tiny", "--out", str(out), "--metrics-file", str(metrics_file)])
    assert run.exit_code == 0, run.output
    seen, samples, results = [], [], []
    for line in metrics_file.read_text().splitlines():
        results.append(replay(line, collect(seen), lambda rows, step: samples.append((step, rows))))
    assert seen == [(1, {"train/loss": 2.0}), (2, {"train/loss": 1.0, "eval/loss": 1.5})]
    assert samples == ([(2, [{"prompt": "p", "response": "r"}])] if command == "policy" else [])
    assert results[-1] == {"metrics": {"steps": 2, "seconds": 0.5}, "artifacts": {"model": str(out)}}

    # a process other than the main one writes no metrics file
    monkeypatch.setenv("RANK", "1")
    other = tmp_path / "other.jsonl"
    assert CliRunner().invoke(app, [command, "train", "-c", "tiny", "--out", str(out),
                                    "--metrics-file", str(other)]).exit_code == 0
    assert not other.exists()


def test_the_pipeline_under_accelerate_launch_says_how_to_launch_its_stages(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"not under `accelerate launch`.*--set launch\.num_processes=N"):
        pipeline.perl_pipeline.fn(load_config("tiny"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_train_the_tiny_reward_model_from_the_task(tmp_path, monkeypatch, no_progress_artifacts):
    """A real launch (gloo, ~15 s): the artifact is written, every step's metrics reach the callback once."""
    from perl_core.artifacts import read_manifest
    from perl_core.data import prepare_dataset

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    cfg = load_config("tiny", [f"artifacts_dir={tmp_path / 'artifacts'}", f"data.data_dir={tmp_path / 'data'}",
                               "reward.init_from_anchor=false", "launch.num_processes=2", "launch.cpu=true",
                               f"launch.accelerate_args=[--main_process_port, '{free_port()}']"])
    prepare_dataset(cfg)
    out = tmp_path / "artifacts" / "reward_model" / "k"
    seen = []
    result = tasks.train_reward_model.fn(cfg, key="k", out_dir=str(out), callback=collect(seen))

    manifest = read_manifest(out)
    assert manifest["kind"] == "reward_model" and list(out.glob("*.safetensors"))
    steps = cfg.reward.train.max_steps
    assert [s for s, m in seen if "train/loss" in m] == list(range(1, steps + 1))  # once each: the main process
    assert [s for s, m in seen if "eval/loss" in m] == list(range(cfg.reward.train.eval_every, steps + 1,
                                                                   cfg.reward.train.eval_every))
    assert result["out_dir"] == str(out) and result["metrics"]["trainable_params"] > 0
    assert result["metrics"]["trainable_params"] == manifest["metrics"]["trainable_params"]
