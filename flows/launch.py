"""A training task's stage in N processes: `accelerate launch` as a subprocess of the task.

With `launch.num_processes` N > 1 the anchor, reward-model and policy tasks do not train in their
own process: each runs the stage's command line, the one the README shows for several GPUs,

    python -m accelerate.commands.launch --multi_gpu --num_processes N ... perl-rlhf <stage> train
        --config <out>.launch/config.yaml --out <out> --resume --metrics-file <out>.launch/metrics.jsonl

and waits for it. The flow run stays one process (one Prefect engine, one MLflow parent run); only
the stage is data-parallel. The resolved config, the metrics file and the launch's output
(`launch.log`) lie next to the stage's folder, in `<out>.launch/`, so the model folder holds only
the model. The main process writes each step's metrics as a JSON line
(perl_core.callbacks.JsonlLog); the task follows that file while the launch runs and hands every
line to its callbacks, so MLflow and the Prefect progress artifact see the steps as they happen.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import yaml

from perl_core.artifacts import StageResult
from perl_core.callbacks import MetricsCallback, SamplesCallback, null_samples, replay
from perl_core.config import PerlConfig
from perl_core.errors import UserError

STAGE_COMMANDS = {"anchor": ("sft", "train"), "reward_model": ("reward", "train"), "policy": ("policy", "train")}
# torchrun's own report of a failed child follows the children's output: the cause is above it
_LAUNCHER_REPORT = re.compile(r"torch/distributed/elastic/multiprocessing/api\.py.*failed \(exitcode")
ERROR_LINES = 4


class LaunchFailed(UserError):
    """The launched stage exited with an error; the message carries its last output lines."""


def launched(cfg: PerlConfig) -> bool:
    """Whether the training tasks run their stage through `accelerate launch` (N > 1 processes)."""
    return cfg.launch.num_processes > 1


def launch_dir(out_dir: str | Path) -> Path:
    """`<out>.launch/`, beside the stage's folder: its config, metrics file and launch output."""
    out = Path(out_dir)
    return out.with_name(out.name + ".launch")


def perl_rlhf_script() -> str:
    """The `perl-rlhf` entry point of this environment (beside its python), else the one on PATH."""
    beside = Path(sys.executable).with_name("perl-rlhf")
    found = str(beside) if beside.is_file() else shutil.which("perl-rlhf")
    if found is None:
        raise UserError("launch.num_processes > 1 runs `perl-rlhf <stage> train` under accelerate launch, but no "
                        f"perl-rlhf command is installed beside {sys.executable} or on PATH: pip install the project")
    return found


def command(cfg: PerlConfig, stage: str, out_dir: str | Path, *stage_args: str) -> list[str]:
    """The launch's argv (accelerate launch from this Python, then the stage's own command line)."""
    lc, folder = cfg.launch, launch_dir(out_dir)
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(lc.num_processes),
            "--num_machines", "1", "--mixed_precision", lc.mixed_precision, "--dynamo_backend", "no",
            *lc.accelerate_args, perl_rlhf_script(), *STAGE_COMMANDS[stage], "--config", str(folder / "config.yaml"),
            "--out", str(out_dir), "--resume", "--metrics-file", str(folder / "metrics.jsonl"), *stage_args]


def run_stage(cfg: PerlConfig, stage: str, out_dir: str | Path, callback: MetricsCallback,
              samples_callback: SamplesCallback = null_samples, stage_args: Sequence[str] = (),
              poll_seconds: float = 2.0) -> StageResult:
    """Train `stage` in `cfg.launch.num_processes` processes; its metrics reach `callback` as they are written.

    `--resume` as in the in-process task: an interrupted stage continues from its last checkpoint,
    and the metrics file starts empty, so the callbacks see this attempt's steps only."""
    folder = launch_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    metrics_file, log_file = folder / "metrics.jsonl", folder / "launch.log"
    metrics_file.unlink(missing_ok=True)
    argv = command(cfg, stage, out_dir, *stage_args)
    env = dict(os.environ, **({"ACCELERATE_USE_CPU": "1"} if cfg.launch.cpu else {}))
    offset, result = 0, None
    with log_file.open("w", encoding="utf-8") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                try:
                    proc.wait(timeout=poll_seconds)
                    finished = True
                except subprocess.TimeoutExpired:
                    finished = False
                offset, lines = _new_lines(metrics_file, offset)
                for line in lines:
                    result = replay(line, callback, samples_callback) or result
                if finished:
                    break
        finally:
            if proc.returncode is None:  # the task was cancelled or a callback failed: stop the launch too
                proc.terminate()
                proc.wait()
    what = f"`accelerate launch --num_processes {cfg.launch.num_processes} perl-rlhf {' '.join(STAGE_COMMANDS[stage])}`"
    if proc.returncode != 0:
        raise LaunchFailed(f"{stage}: {what} failed (exit code {proc.returncode}): {last_lines(log_file)} "
                           f"(whole output: {log_file})")
    if result is None:
        raise LaunchFailed(f"{stage}: {what} exited without writing its result to {metrics_file} "
                           f"(whole output: {log_file})")
    return StageResult(Path(out_dir), result["metrics"], {k: Path(v) for k, v in result["artifacts"].items()})


def _new_lines(path: Path, offset: int) -> tuple[int, list[str]]:
    """The whole lines written to `path` since byte `offset`, and the offset after them."""
    if not path.exists():
        return offset, []
    with path.open("rb") as f:
        f.seek(offset)
        chunk = f.read()
    whole = chunk[:chunk.rfind(b"\n") + 1]
    return offset + len(whole), [line for line in whole.decode("utf-8").splitlines() if line.strip()]


def last_lines(log_file: Path, n: int = ERROR_LINES) -> str:
    """The launch's last distinct output lines before torchrun's failure report, joined into one line
    (every process prints the same error: it is shown once)."""
    lines = log_file.read_text(encoding="utf-8", errors="replace").splitlines()
    cut = next((i for i, line in enumerate(lines) if _LAUNCHER_REPORT.search(line)), len(lines))
    distinct = list(dict.fromkeys(line.strip() for line in lines[:cut] if line.strip()))
    return " | ".join(distinct[-n:]) or "(no output)"
