"""How the running statistics of a BatchNorm follow the batch statistics during training.

Each training step BN normalises with the statistics of its batch, and updates its running
estimate as r ← (1 − m)·r + m·batch with momentum m (0.1 by default). The running estimate
is what eval mode, and every export, uses; the figure shows how closely, and how late, it
follows the batches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..train.recording import BNStats
from .common import COLOR_BEFORE, COLOR_EVAL, mark_epochs, message_figure, new_figure, save_figure

CHANNELS_SHOWN = 4


def plot_running_statistics(stats: BNStats | None, path: str | Path, *, reason: str | None = None) -> Path:
    """Batch mean/var per step against the running mean/var, for the first channels of the first BN layer."""
    title = "Running statistics against batch statistics during training"
    layers = [layer for layer in (stats.layers if stats else []) if layer.batch_mean]
    if not layers:
        return message_figure(path, title, reason or "No BatchNorm statistics were recorded for this run.")
    layer = layers[0]
    steps = np.asarray(stats.steps[-len(layer.batch_mean):])  # a resumed run records only its own steps
    series = {key: np.asarray(getattr(layer, key)) for key in ("batch_mean", "batch_var", "running_mean", "running_var")}
    shown = min(CHANNELS_SHOWN, series["batch_mean"].shape[1])
    figure = new_figure(3.0 * shown + 0.5, 5.6)
    more = f"; {len(layers)} layers in bn_stats.json" if len(layers) > 1 else ""
    figure.suptitle(f"{title}\n{layer.name}, channels 0–{shown - 1} of {layer.channels}, momentum {layer.momentum}{more}")
    grid = figure.subplots(2, shown, squeeze=False, sharex=True)
    for column in range(shown):
        for row, (stat, label) in enumerate((("mean", "mean"), ("var", "variance"))):
            axes = grid[row, column]
            batch, running = series[f"batch_{stat}"][:, column], series[f"running_{stat}"][:, column]
            axes.plot(steps, batch, color=COLOR_BEFORE, linewidth=0.7, alpha=0.6, label="statistic of each training batch")
            axes.plot(steps, running, color=COLOR_EVAL, linewidth=1.8, label="running estimate (used by eval mode)")
            mark_epochs(axes, stats.epoch_end_step, label=True)
            lag = np.abs(running - batch)
            axes.text(0.98, 0.97, f"mean |running − batch| = {lag.mean():.3g}", ha="right", va="top", fontsize=7,
                      transform=axes.transAxes, bbox=dict(facecolor="white", edgecolor="none", alpha=0.8))
            if row == 0:
                axes.set_title(f"channel {column}")
            if row == 1:
                axes.set_xlabel("training step")
            if column == 0:
                axes.set_ylabel(label)
        grid[1, column].set_yscale("log")
        grid[1, column].minorticks_off()
    handles, labels = grid[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=3)
    return save_figure(figure, path)
