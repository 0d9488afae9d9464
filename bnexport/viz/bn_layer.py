"""One BatchNorm layer's input against its output, channel by channel.

The article shows a BN layer's effect with ``plt.imshow(output[0].squeeze(), cmap='gray')``
on a 16-channel tensor, which matplotlib refuses: an image has 1, 3 or 4 channels, and
a BN output has one 2-D map per channel. BatchNorm acts per channel, so the honest
picture is per channel too: a histogram of each channel before and after, and each
channel of one sample drawn as its own image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from matplotlib.lines import Line2D

from .activations import NO_BN_MESSAGE, LayerActivations
from .common import COLOR_BEFORE, COLOR_EVAL, COLOR_TRAIN, message_figure, new_figure, save_figure, value_range

MAX_CHANNELS_SHOWN = 16
IMAGE_COLUMNS = 8


def _channel_values(values: np.ndarray, channel: int) -> np.ndarray:
    return np.moveaxis(values, 1, 0)[channel].ravel()


def _ridge(axes, rows: list[list[tuple[np.ndarray, str, object]]], bins: np.ndarray, notes: list[str]) -> None:
    """One histogram per row, stacked: height is log density scaled to the row, so tails stay visible."""
    centres = (bins[:-1] + bins[1:]) / 2
    for row, series in enumerate(rows):
        base = -row
        for index, (values, color, style) in enumerate(series):
            density, _ = np.histogram(values, bins=bins, density=True)
            height = np.log10(density + 1e-4) + 4  # 1e-4 is the floor: 0 height
            height = 0.9 * height / max(height.max(), 1e-12)
            if index == 0:
                axes.fill_between(centres, base, base + height, color=color, alpha=0.25, linewidth=0)
            axes.plot(centres, base + height, color=color, linewidth=1.1, linestyle=style)
        axes.text(1.01, base + 0.3, notes[row], transform=axes.get_yaxis_transform(), fontsize=7, va="center")
    axes.set_yticks([-r for r in range(len(rows))], [f"ch {r}" for r in range(len(rows))])
    axes.set_ylim(-len(rows) + 0.8, 1.0)
    axes.tick_params(axis="y", length=0)


def plot_channel_histograms(layer: LayerActivations | None, path: str | Path) -> Path:
    """Each channel's histogram before BN, and after it in train and in eval mode, with μ and σ.

    Two panels, channels stacked as rows: before BN every channel sits at its own centre and
    width; after BN they line up, each at its own β with spread γ. One panel per side keeps the
    x-axes honest (before and after differ in scale) and the figure quick to draw.
    """
    title = "One BatchNorm layer, channel by channel"
    if layer is None:
        return message_figure(path, title, NO_BN_MESSAGE)
    shown = min(layer.channels, MAX_CHANNELS_SHOWN)
    figure = new_figure(12, 0.5 * shown + 1.8)
    which = f"channels 0–{shown - 1} of {layer.channels}" if shown < layer.channels else f"all {layer.channels} channels"
    figure.suptitle(f"{title}: {layer.name}, {which}, on {layer.before.shape[0]} test images")
    before_axes, after_axes = figure.subplots(1, 2)
    before = [_channel_values(layer.before, c) for c in range(shown)]
    train = [_channel_values(layer.after_train, c) for c in range(shown)]
    evaluated = [_channel_values(layer.after_eval, c) for c in range(shown)]
    _ridge(before_axes, [[(v, COLOR_BEFORE, "-")] for v in before], np.linspace(*value_range(before), 60),
           [f"μ={v.mean():+.2f} σ={v.std():.2f}" for v in before])
    _ridge(after_axes, [[(e, COLOR_EVAL, "-"), (t, COLOR_TRAIN, (0, (3, 2)))] for t, e in zip(train, evaluated)],
           np.linspace(*value_range(train + evaluated), 60),
           [f"eval μ={e.mean():+.2f} σ={e.std():.2f}\ntrain μ={t.mean():+.2f} σ={t.std():.2f}" for t, e in zip(train, evaluated)])
    before_axes.set_title("input of BN (conv output)")
    after_axes.set_title("output of BN")
    for axes in (before_axes, after_axes):
        axes.set_xlabel("activation value")
        axes.grid(axis="x", alpha=0.3)
    before_axes.set_ylabel("channel (row height: log density)")
    legend = [Line2D([], [], color=COLOR_BEFORE, label="before BN"),
              Line2D([], [], color=COLOR_TRAIN, linestyle=(0, (3, 2)), label="after, train mode (batch statistics)"),
              Line2D([], [], color=COLOR_EVAL, label="after, eval mode (running statistics, as exported)")]
    figure.legend(handles=legend, loc="outside lower center", ncols=3)
    return save_figure(figure, path)


def _montage(maps: np.ndarray, columns: int, gap: int = 2) -> np.ndarray:
    """Channel maps tiled into one image, NaN between tiles (drawn blank)."""
    count, height, width = maps.shape
    rows = -(-count // columns)
    canvas = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap), np.nan)
    for index in range(count):
        r, c = divmod(index, columns)
        canvas[r * (height + gap):r * (height + gap) + height, c * (width + gap):c * (width + gap) + width] = maps[index]
    return canvas


def plot_sample_channels(layer: LayerActivations | None, sample_image: np.ndarray | None, path: str | Path,
                         *, sample_index: int = 0) -> Path:
    """One sample's channels as separate images, before BN and after it (eval mode).

    Each panel shares one colour scale, symmetric about 0 and shown by its colour bar, so a
    channel that BN shifts or rescales looks different between the panels.
    """
    title = "One sample's channels before and after BatchNorm"
    if layer is None:
        return message_figure(path, title, NO_BN_MESSAGE)
    shown = min(layer.channels, MAX_CHANNELS_SHOWN)
    before, after = layer.before[sample_index][:shown], layer.after_eval[sample_index][:shown]
    if before.ndim != 3:  # BatchNorm1d: no spatial map to draw
        return message_figure(path, title, f"{layer.name} normalises {before.ndim - 1}-D features, not image channels.")
    columns = min(IMAGE_COLUMNS, shown)
    rows = -(-shown // columns)
    height, width = before.shape[1:]
    figure = new_figure(13, 0.8 * rows + 1.9)
    figure.suptitle(f"{title}: {layer.name}, test image {sample_index}, eval mode (ch = channel; μ, σ over the map)")
    input_axes, before_axes, after_axes = figure.subplots(1, 3, width_ratios=[0.5, columns, columns])
    if sample_image is not None:
        input_axes.imshow(sample_image[0] if sample_image.shape[0] == 1 else np.moveaxis(sample_image[:3], 0, -1),
                          cmap="gray")  # the input is an image; the BN maps below are not
        input_axes.set_title("input")
    input_axes.set_axis_off()
    for axes, maps, label in ((before_axes, before, "before BN"), (after_axes, after, "after BN")):
        limit = float(np.abs(maps).max()) or 1.0
        image = axes.imshow(_montage(maps, columns), cmap="RdBu_r", vmin=-limit, vmax=limit)
        for channel in range(shown):
            r, c = divmod(channel, columns)
            axes.text(c * (width + 2) + width / 2, r * (height + 2) + 1, f"ch {channel}", ha="center", va="top",
                      fontsize=6.5, color="black")
            axes.text(c * (width + 2) + width / 2, r * (height + 2) + height - 1,
                      f"μ={maps[channel].mean():+.2f}\nσ={maps[channel].std():.2f}", ha="center", va="bottom",
                      fontsize=6, color="black")
        axes.set_title(label)
        axes.set_axis_off()
        figure.colorbar(image, ax=axes, shrink=0.8, label="value", location="bottom")
    return save_figure(figure, path)
