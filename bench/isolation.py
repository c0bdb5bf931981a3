"""Process isolation: each benchmark setting runs in a FRESH Python process.

Peak memory is a high-water mark, so two settings measured in one process would contaminate
each other (the allocator keeps freed pages, the first setting's peak stays the process's
peak). :func:`run_isolated` therefore starts ``python -m bench.isolation <target>``,
which imports torch/transformers/peft, records the baseline memory, calls the workload
``module:function(**kwargs)`` and adds a ``memory`` block to the dict it returns:

    peak_rss_mb                   absolute peak resident set size of the child process
    baseline_rss_mb               resident set size after the imports, before any model exists
    peak_above_baseline_mb        peak_rss_mb - baseline_rss_mb: the whole run (model loading and
                                  evaluation included)
    steps_peak_above_baseline_mb  the peak resident set while the training steps ran (:class:`MemoryTimeline`),
                                  minus the baseline: the training's own memory (weights, gradients,
                                  optimizer state, activations), without the peaks of loading the model
                                  or of the final evaluation. None when the workload marked no steps
                                  (:func:`step_ended`)
    phase_peaks_above_baseline_mb the peak before the first step, during the steps, after the last:
                                  where the whole run's peak falls
    cuda_peak_allocated_mb        torch.cuda.max_memory_allocated() when a GPU exists, else null
    ratio_basis                   the key :func:`peak_memory_mb` (and so every LoRA/full ratio) uses:
                                  cuda_peak_allocated_mb on a GPU, else steps_peak_above_baseline_mb
                                  (peak_above_baseline_mb for a workload that marks no steps). The
                                  ~0.5 GB of imported libraries is the same for every setting and
                                  would only dilute the ratio; the absolute peak is reported beside it

A workload is any importable function returning a JSON-able dict (``bench/reward.py``,
``bench/policy.py``, ``bench/trl_compare.py``); it receives the whole config it trains and calls
:func:`step_ended` after each training step.

    python -m bench.isolation bench.reward:reward_workload --kwargs '{"config": {...}}' --out r.json
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import psutil

MB = 1024 * 1024


# ---------------------------------------------------------------- the parent side
def run_isolated(target: str, kwargs: Optional[dict] = None, timeout: Optional[float] = None) -> dict:
    """Run `target` ("package.module:function") with `kwargs` in a fresh interpreter; return its
    dict plus the `memory` block. Raises RuntimeError with the child's stderr tail on failure."""
    with tempfile.TemporaryDirectory() as tmp:
        out, args = Path(tmp) / "result.json", Path(tmp) / "kwargs.json"
        # a file, not an argument: a config plus a few hundred long prompts can exceed the kernel's 128 KiB per argument
        args.write_text(json.dumps(kwargs or {}))
        cmd = [sys.executable, "-m", "bench.isolation", target, "--kwargs-file", str(args), "--out", str(out)]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"benchmark setting {target} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out.read_text())


def peak_memory_mb(result: dict) -> float:
    """The peak memory a ratio should use (see `ratio_basis` in the module docstring)."""
    mem = result["memory"]
    return float(mem[mem["ratio_basis"]])


def median_step_seconds(step_seconds: Sequence[float], warmup: int = 2) -> float:
    """Median optimizer-step time, skipping the first `warmup` steps (allocator and kernel warm-up)."""
    times = list(step_seconds)[warmup:] or list(step_seconds)
    if not times:
        raise ValueError("no step times were recorded")
    return float(statistics.median(times))


def ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def bench_config(preset: str, measure: Sequence[str], overrides: Sequence[str], stage: str):
    """One benchmark setting's config: preset <- the benchmark's measurement setting <- `overrides`
    (the caller's, which win). `stage` ("reward", "policy") checkpoints once, at its last step, and
    the reward model evaluates once there (RL does not evaluate while it trains), unless the
    overrides say otherwise."""
    from perl_core.config import load_config

    steps = getattr(load_config(preset, [*measure, *overrides]), stage).train.max_steps
    once = [f"{stage}.train.checkpoint_every={steps}"]
    if stage != "policy":
        once.append(f"{stage}.train.eval_every={steps}")
    return load_config(preset, [*measure, *once, *overrides])


def tuning_settings(preset: str, measure: Sequence[str], overrides: Sequence[str], stage: str,
                    full_learning_rate: float, order: Sequence[str]) -> dict:
    """A benchmark's two settings, in `order`: LoRA as configured, and full tuning differing only in
    `<stage>.tuning` and its own learning rate (full tuning moves every weight: a smaller step)."""
    cfg = bench_config(preset, measure, overrides, stage)
    settings = {}
    for tuning in order:
        setting = cfg.model_copy(deep=True)
        getattr(setting, stage).tuning = tuning
        if tuning == "full":
            getattr(setting, stage).train.learning_rate = full_learning_rate
        settings[tuning] = setting
    return settings


def cost_summary(lora: dict, full: dict, parts: Sequence[str] = ()) -> dict:
    """LoRA / full ratios of two workload results: peak memory (on the `ratio_basis`), absolute peak
    RSS, median step time, then each of `parts` ("generate", ...) and the trainable parameters."""
    return {
        "memory_ratio": ratio(peak_memory_mb(lora), peak_memory_mb(full)),
        "memory_ratio_basis": lora["memory"]["ratio_basis"],
        "absolute_peak_rss_ratio": ratio(lora["memory"]["peak_rss_mb"], full["memory"]["peak_rss_mb"]),
        "step_time_ratio": ratio(lora["median_step_seconds"], full["median_step_seconds"]),
        **{f"{part}_time_ratio": ratio(lora[f"median_{part}_seconds"], full[f"median_{part}_seconds"])
           for part in parts},
        "trainable_param_ratio": ratio(lora["trainable_params"], full["trainable_params"]),
    }


def machine() -> dict:
    """The machine a result describes (absolute seconds and megabytes hold only there)."""
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count()}


def as_overrides(options: dict[str, Any]) -> list[str]:
    """Command-line shorthand options as the `setting=value` overrides they stand for; None = not given."""
    return [f"{key}={value}" for key, value in options.items() if value is not None]


# ---------------------------------------------------------------- the child side
def _rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class MemoryTimeline:
    """Where a run's memory peaks fall: before its first training step (loading), during its steps,
    after its last (evaluation, saving). Workloads mark each step's end (:func:`step_ended`).

    The steps are contiguous: a step runs from the previous step's end (the first from its end minus
    its duration) to its own end, so work between steps (RL's bookkeeping) counts as the next step's.
    A daemon thread samples the resident set every `interval` seconds; on Linux each step's peak is
    also read exactly, from the kernel's high-water mark, which is reset at every step's end
    (`/proc/self/clear_refs`), so a transient shorter than the interval is not missed (from the
    second step on; the first step's high-water mark still holds the loading). Memory use is
    constant after the first step."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.n_steps = interval, 0
        self.before: Optional[int] = None     # peak before the first step
        self.steps: Optional[int] = None      # peak during the steps
        self.pending: Optional[int] = None    # peak since the last step's end (after the steps, at the end)
        self.process_peak = 0                 # the whole run's peak (the kernel's mark is reset between steps)
        self.resets = False                   # the kernel's mark was reset at the last step's end
        self._early: list[tuple[float, int]] = []  # samples until the first step ends
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._process = psutil.Process()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.add(time.perf_counter(), self._process.memory_info().rss)
            self._stop.wait(self.interval)

    def start(self) -> "MemoryTimeline":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.add(time.perf_counter(), self._process.memory_info().rss,
                 exact=_high_water_bytes() if self.resets else None)

    def add(self, t: float, rss: int, exact: Optional[int] = None) -> None:
        """One sample (`exact`: the kernel's high-water mark since the last reset, when known)."""
        with self._lock:
            self.process_peak = max(self.process_peak, rss, exact or 0)
            if self.n_steps == 0:
                self._early.append((t, rss))
                if len(self._early) > 20000:  # no step marked for minutes: keep the peak, not every sample
                    top = max(self._early, key=lambda sample: sample[1])
                    self._early = [top, self._early[-1]]
            self.pending = max(self.pending or 0, rss, exact or 0) if self.n_steps else None

    def mark_step(self, now: float, seconds: float, rss: int, exact: Optional[int] = None,
                  process_high: Optional[int] = None) -> None:
        """A step ended at `now` after `seconds`; `rss` now; `exact` the high-water mark since the last step's
        end (not for the first step: it still holds the loading); `process_high` the mark before its first reset."""
        with self._lock:
            self.process_peak = max(self.process_peak, rss, exact or 0, process_high or 0)
            if self.n_steps == 0:
                start = now - seconds
                self.before = max((r for t, r in self._early if t < start), default=None)
                self.steps = max([r for t, r in self._early if t >= start] + [rss])
                self._early = []
            else:
                self.steps = max(self.steps or 0, self.pending or 0, rss, exact or 0)
            self.pending = 0
            self.n_steps += 1

    def phase_peaks(self) -> dict[str, Optional[int]]:
        """Peak bytes before the first step, during the steps, after the last step (None: not seen)."""
        with self._lock:
            if self.n_steps == 0:
                return {"before_steps": max((r for _, r in self._early), default=None), "steps": None,
                        "after_steps": None}
            return {"before_steps": self.before, "steps": self.steps, "after_steps": self.pending or None}


def _high_water_bytes() -> Optional[int]:
    """The kernel's peak resident set since the process started or the mark was last reset (Linux), else None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_TIMELINE: Optional[MemoryTimeline] = None


def step_ended(seconds: float) -> None:
    """Mark a training step that ended now and took `seconds` (a workload calls this from its metrics
    callback); outside an isolated benchmark process it does nothing."""
    timeline = _TIMELINE
    if timeline is None:
        return
    now = time.perf_counter()
    high = _high_water_bytes()
    # since the last reset, the kernel's mark is this step's exact peak (from the second step on, and only
    # where the reset works: elsewhere it would still hold the loading's peak)
    exact = high if timeline.n_steps and timeline.resets else None
    timeline.mark_step(now, seconds, _rss_bytes(), exact, process_high=high if timeline.n_steps == 0 else None)
    timeline.resets = _reset_high_water()


def steps_peak_bytes() -> Optional[int]:
    """The peak resident set during the marked steps so far (None outside a benchmark process or before any step)."""
    return _TIMELINE.phase_peaks()["steps"] if _TIMELINE is not None else None


def process_peak_bytes(timeline: Optional[MemoryTimeline] = None) -> int:
    """The process's peak resident set so far: ru_maxrss, and what `timeline` (default: this benchmark
    process's) saw before it reset the kernel's mark."""
    timeline = timeline or _TIMELINE
    return max(_peak_rss_bytes(), timeline.process_peak if timeline is not None else 0)


def memory_report(baseline_bytes: int, timeline: Optional[MemoryTimeline] = None) -> dict[str, Any]:
    import torch

    peak = process_peak_bytes(timeline)
    cuda = torch.cuda.max_memory_allocated() / MB if torch.cuda.is_available() else None
    phases = timeline.phase_peaks() if timeline is not None else {}
    above = {name: (value - baseline_bytes) / MB if value is not None else None for name, value in phases.items()}
    steps = above.get("steps")
    return {
        "peak_rss_mb": peak / MB,
        "baseline_rss_mb": baseline_bytes / MB,
        "peak_above_baseline_mb": (peak - baseline_bytes) / MB,
        "steps_peak_above_baseline_mb": steps,
        "phase_peaks_above_baseline_mb": above,
        "cuda_peak_allocated_mb": cuda,
        "ratio_basis": "cuda_peak_allocated_mb" if cuda is not None else
                       "steps_peak_above_baseline_mb" if steps is not None else "peak_above_baseline_mb",
    }


def _resolve(target: str):
    module, _, name = target.partition(":")
    if not name:
        raise ValueError(f"benchmark target {target!r} must look like package.module:function")
    return getattr(importlib.import_module(module), name)


def _child(target: str, kwargs: dict, out: Path) -> None:
    import peft  # noqa: F401  the libraries every setting needs are in the baseline
    import torch
    import transformers  # noqa: F401

    # run as `python -m`, this file is __main__: the workloads' step_ended reads the importable module's timeline
    from bench import isolation

    fn = _resolve(target)
    baseline = _rss_bytes()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    timeline = isolation._TIMELINE = MemoryTimeline().start()
    try:
        result = fn(**kwargs)
    finally:
        timeline.stop()
    result["memory"] = memory_report(baseline, timeline)
    out.write_text(json.dumps(result, indent=2, default=str))


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Run one benchmark setting (used by run_isolated).")
    parser.add_argument("target", help="package.module:function returning a dict")
    parser.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments")
    parser.add_argument("--kwargs-file", help="a file holding that JSON object (instead of --kwargs)")
    parser.add_argument("--out", required=True, help="where to write the result JSON")
    args = parser.parse_args(argv)
    kwargs = json.loads(Path(args.kwargs_file).read_text() if args.kwargs_file else args.kwargs)
    _child(args.target, kwargs, Path(args.out))


if __name__ == "__main__":
    main()
