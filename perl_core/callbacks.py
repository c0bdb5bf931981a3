"""How training code reports: a callable it is handed. It never knows who listens (MLflow, Prefect, a test)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Protocol


class MetricsCallback(Protocol):
    def __call__(self, metrics: dict[str, float], step: int) -> None: ...


class SamplesCallback(Protocol):
    """What RL generated at `step`: one row per response (`prompt`, `response`, `reward`, `gold_score` if known)."""

    def __call__(self, rows: list[dict[str, Any]], step: int) -> None: ...


def null_callback(metrics: dict[str, float], step: int) -> None:
    return None


def null_samples(rows: list[dict[str, Any]], step: int) -> None:
    return None


def collect(into: list[tuple[int, dict[str, float]]]) -> Callable[[dict[str, float], int], None]:
    """A callback that appends `(step, metrics)` to a list (tests, summaries)."""

    def _cb(metrics: dict[str, float], step: int) -> None:
        into.append((step, dict(metrics)))

    return _cb


def prefixed(callback: MetricsCallback, prefix: str) -> Callable[[dict[str, float], int], None]:
    def _cb(metrics: dict[str, float], step: int) -> None:
        callback({f"{prefix}{k}": v for k, v in metrics.items()}, step)

    return _cb


class JsonlLog:
    """A metrics callback (and, as `.samples`, a samples callback) that appends one JSON line per call.

    The file of a stage run in other processes (`perl-rlhf <stage> train --metrics-file`), read back
    line by line with :func:`replay`: `{"step", "metrics"}`, `{"step", "samples"}`, and last
    `{"result": {"metrics", "artifacts"}}` once the stage has finished. Each line is written whole
    and closed at once, so a reader that follows the file while training runs sees only whole lines.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def _write(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        self._write({"step": int(step), "metrics": {k: float(v) for k, v in metrics.items()}})

    def samples(self, rows: list[dict[str, Any]], step: int) -> None:
        self._write({"step": int(step), "samples": rows})

    def result(self, metrics: dict[str, Any], artifacts: dict[str, Any]) -> None:
        self._write({"result": {"metrics": metrics, "artifacts": {k: str(v) for k, v in artifacts.items()}}})


def replay(line: str, callback: MetricsCallback = null_callback,
           samples_callback: SamplesCallback = null_samples) -> Optional[dict[str, Any]]:
    """Hand one line of a :class:`JsonlLog` to the callbacks; the stage's `result` record, else None."""
    record = json.loads(line)
    if "metrics" in record:
        callback(record["metrics"], record["step"])
    elif "samples" in record:
        samples_callback(record["samples"], record["step"])
    return record.get("result")
