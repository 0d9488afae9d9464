"""What every figure shares: the Agg backend, one style, atomic saving, smoothing and value ranges."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ..artifacts import atomic_path  # noqa: E402
from ..config import FIGURE_FORMATS  # noqa: E402

PNG_DPI = 120  # sharp on a laptop screen at 100% zoom, and a few hundred kB per figure

# One colour per meaning, the same in every figure.
COLOR_BEFORE = "#4c72b0"  # BN input
COLOR_TRAIN = "#dd8452"  # BN output, train mode (batch statistics)
COLOR_EVAL = "#55a868"  # BN output, eval mode (running statistics)
COLOR_WITH_BN = "#4c72b0"
COLOR_WITHOUT_BN = "#c44e52"
COLOR_FLAG = "#d62728"
COLOR_MUTED = "#8c8c8c"

plt.rcParams.update({
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "figure.titlesize": 12,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "svg.hashsalt": "bnexport",  # stable ids: the same data gives the same SVG
    "svg.fonttype": "none",  # text stays text in SVG: searchable, and small
})


def new_figure(width: float, height: float) -> Figure:
    """A figure not registered with pyplot, so nothing leaks between calls."""
    return Figure(figsize=(width, height), layout="constrained")


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` atomically; the format follows the suffix (.png or .svg)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FIGURE_FORMATS:
        raise ValueError(f"figure format must be one of {FIGURE_FORMATS}, got {fmt!r}")
    metadata = {"Software": None} if fmt == "png" else {"Date": None, "Creator": None}  # reproducible bytes
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        figure.savefig(handle, format=fmt, dpi=PNG_DPI, metadata=metadata)
    return path


def message_figure(path: str | Path, title: str, message: str) -> Path:
    """A figure that says why there is nothing to plot, so a missing plot is never silent."""
    figure = new_figure(7, 2.2)
    axes = figure.add_subplot()
    axes.set_axis_off()
    axes.set_title(title)
    axes.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=10, transform=axes.transAxes)
    return save_figure(figure, path)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average; the first points average what exists so far (no lag-free cheat)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or window <= 1:
        return values
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    ends = np.arange(1, values.size + 1)
    starts = np.maximum(0, ends - window)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def mark_epochs(axes, epoch_end_step: list[int], *, label: bool = True) -> None:
    """Dotted vertical lines at epoch boundaries, labelled once in the legend."""
    for index, step in enumerate(epoch_end_step[:-1]):
        axes.axvline(step, color=COLOR_MUTED, linestyle=":", linewidth=0.9,
                     label="epoch boundary" if (label and index == 0) else None)


def value_range(arrays: list[np.ndarray], *, low: float = 0.5, high: float = 99.5,
                max_samples: int = 50_000) -> tuple[float, float]:
    """Percentile range over several arrays, on an evenly strided sample: exact enough for bins, and fast."""
    samples = [a.ravel()[:: max(1, a.size // max_samples)] for a in arrays]
    lows = [float(np.percentile(s, low)) for s in samples if s.size]
    highs = [float(np.percentile(s, high)) for s in samples if s.size]
    lo, hi = (min(lows), max(highs)) if lows else (0.0, 1.0)
    return (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)
