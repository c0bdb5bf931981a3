"""How training code reports: a callable it is handed. It never knows who listens (MLflow, Prefect, a test)."""
from __future__ import annotations

from typing import Any, Callable, Protocol


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
