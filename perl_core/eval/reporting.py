"""The files a report is made of: JSON, Markdown tables and PNG plots (matplotlib, headless).

Evaluation and the efficiency report write only files; orchestration (flows/) decides what to
log. Plots use the non-interactive ``Agg`` backend so they work in CI and in containers.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence


def write_json(path: str | Path, payload: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # NaN is not JSON; a missing value is written as null
    path.write_text(json.dumps(_json_safe(payload), indent=2, sort_keys=False) + "\n")
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats to `digits` significant decimals, None/NaN as an em dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.{digits}g}"
        return f"{value:,.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return (v if isinstance(v, str) else fmt(v)).replace("|", "\\|").replace("\n", " ⏎ ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def reliability_plot(bins: list[dict], path: str | Path, title: str) -> Path:
    """Reliability diagram from :func:`perl_core.metrics.reliability_bins`: observed positive rate
    against mean predicted probability per bin, the diagonal being perfect calibration."""
    plt = _pyplot()
    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=[3, 1], sharex=True)
    full = [b for b in bins if b["count"]]
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot([b["mean_prob"] for b in full], [b["positive_rate"] for b in full], "o-", label="model")
    ax.set_ylabel("observed positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left")
    width = bins[0]["high"] - bins[0]["low"]
    ax_count.bar([b["low"] for b in bins], [b["count"] for b in bins], width=width, align="edge", edgecolor="black")
    ax_count.set_xlabel("predicted probability")
    ax_count.set_ylabel("count")
    return _save(fig, path)


def histograms(groups: dict[str, Sequence[float]], path: str | Path, title: str, xlabel: str, bins: int = 30) -> Path:
    """Overlaid histograms, one per named group (scores by label, rewards by model)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    values = [v for vs in groups.values() for v in vs]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)] if hi > lo else bins
    for name, vs in groups.items():
        ax.hist(list(vs), bins=edges, alpha=0.55, label=f"{name} (n={len(vs)})")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.legend()
    return _save(fig, path)


def line_plot(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, title: str,
              xlabel: str, ylabel: str, logx: bool = False, hline: dict[str, float] | None = None) -> Path:
    """One line per named `(x, y)` series; `hline` draws labelled horizontal references (e.g. full tuning)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), "o-", label=name)
    for name, y in (hline or {}).items():
        ax.axhline(y, linestyle="--", color="grey")
        ax.annotate(name, (0.01, y), xycoords=("axes fraction", "data"), va="bottom", fontsize=8)
    if logx:
        ax.set_xscale("log", base=2)
        xs_all = sorted({x for xs, _ in series.values() for x in xs})
        ax.set_xticks(xs_all, [str(int(x)) if float(x).is_integer() else str(x) for x in xs_all])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if series:
        ax.legend()
    return _save(fig, path)


def bar_plot(values: dict[str, float], path: str | Path, title: str, ylabel: str) -> Path:
    """Labelled bars (peak memory or step time per setting), the value printed on each bar."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(values) + 2), 4))
    names = list(values)
    heights = [values[n] if values[n] is not None and math.isfinite(values[n]) else 0.0 for n in names]
    bars = ax.bar(range(len(names)), heights, edgecolor="black")
    for bar, h in zip(bars, heights):
        label = f"{h:.0f}" if abs(h) >= 100 else f"{h:.3g}"  # 1264, not 1.26e+03
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, h), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    return _save(fig, path)
