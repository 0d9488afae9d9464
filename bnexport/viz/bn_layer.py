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

MAX_CHANNELS_SHOWN = 16  # of a layer drawn alone
MAX_CHANNELS_PER_LAYER = 8  # of each layer when several are drawn
IMAGE_COLUMNS = 8


def _as_list(layers: LayerActivations | list[LayerActivations] | None) -> list[LayerActivations]:
    if layers is None:
        return []
    return [layers] if isinstance(layers, LayerActivations) else list(layers)


def channel_limit(layer_count: int) -> int:
    """How many channels of each layer a figure of ``layer_count`` layers draws."""
    return MAX_CHANNELS_SHOWN if layer_count <= 1 else MAX_CHANNELS_PER_LAYER


def _which(layer: LayerActivations, channels: list[int]) -> str:
    if len(channels) == layer.channels:
        return f"all {layer.channels} channels"
    if channels == list(range(len(channels))):
        return f"channels 0–{len(channels) - 1} of {layer.channels}"
    return f"{len(channels)} of {layer.channels} channels (flagged first)"


def _channel_values(values: np.ndarray, channel: int) -> np.ndarray:
    return np.moveaxis(values, 1, 0)[channel].ravel()


def _ridge(axes, rows: list[list[tuple[np.ndarray, str, object]]], bins: np.ndarray, notes: list[str],
           channels: list[int]) -> None:
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
    axes.set_yticks([-r for r in range(len(rows))], [f"ch {c}" for c in channels])
    axes.set_ylim(-len(rows) + 0.8, 1.0)
    axes.tick_params(axis="y", length=0)


def plot_channel_histograms(layers: LayerActivations | list[LayerActivations] | None, path: str | Path) -> Path:
    """Each channel's histogram before BN, and after it in train and in eval mode, with μ and σ.

    Two panels per layer, channels stacked as rows: before BN every channel sits at its own
    centre and width; after BN they line up, each at its own β with spread γ. One panel per
    side keeps the x-axes honest (before and after differ in scale) and the figure quick to
    draw. Each layer shows its ``shown_channels`` (flagged ones first), or its first channels.
    """
    title = "One BatchNorm layer, channel by channel"
    layers = _as_list(layers)
    if not layers:
        return message_figure(path, title, NO_BN_MESSAGE)
    limit = channel_limit(len(layers))
    chosen = [layer.channels_to_draw(limit) for layer in layers]
    figure = new_figure(12, sum(0.5 * len(c) + 0.9 for c in chosen) + 0.9)
    samples = layers[0].before.shape[0]
    if len(layers) == 1:
        figure.suptitle(f"{title}: {layers[0].name}, {_which(layers[0], chosen[0])}, on {samples} input samples")
    else:
        figure.suptitle(f"{len(layers)} BatchNorm layers, channel by channel, on {samples} input samples", fontsize=13)
    panels = figure.subfigures(len(layers), 1, squeeze=False, height_ratios=[len(c) + 1.8 for c in chosen])[:, 0]
    for panel, layer, channels in zip(panels, layers, chosen):
        before_axes, after_axes = panel.subplots(1, 2)
        before = [_channel_values(layer.before, c) for c in channels]
        train = [_channel_values(layer.after_train, c) for c in channels]
        evaluated = [_channel_values(layer.after_eval, c) for c in channels]
        _ridge(before_axes, [[(v, COLOR_BEFORE, "-")] for v in before], np.linspace(*value_range(before), 60),
               [f"μ={v.mean():+.2f} σ={v.std():.2f}" for v in before], channels)
        _ridge(after_axes, [[(e, COLOR_EVAL, "-"), (t, COLOR_TRAIN, (0, (3, 2)))] for t, e in zip(train, evaluated)],
               np.linspace(*value_range(train + evaluated), 60),
               [f"eval μ={e.mean():+.2f} σ={e.std():.2f}\ntrain μ={t.mean():+.2f} σ={t.std():.2f}"
                for t, e in zip(train, evaluated)], channels)
        if len(layers) > 1:
            why = f" ({layer.why})" if layer.why else ""
            panel.suptitle(f"{layer.name}{why}: {_which(layer, channels)}", fontsize=10, fontweight="bold")
        before_axes.set_title("input of BN")
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


def _displayable(sample: np.ndarray | None) -> np.ndarray | None:
    """A (C, H, W) input as an image matplotlib draws: grey for one channel, RGB scaled to [0, 1] for three."""
    if sample is None or sample.ndim != 3 or sample.shape[0] not in (1, 3):
        return None
    if sample.shape[0] == 1:
        return sample[0]
    rgb = np.moveaxis(sample, 0, -1).astype(np.float64)
    low, high = rgb.min(), rgb.max()
    return (rgb - low) / (high - low) if high > low else np.zeros_like(rgb)


def plot_sample_channels(layers: LayerActivations | list[LayerActivations] | None, sample_image: np.ndarray | None,
                         path: str | Path, *, sample_index: int = 0) -> Path:
    """One sample's channels as separate images, before BN and after it (eval mode), one row per layer.

    Each panel shares one colour scale, symmetric about 0 and shown by its colour bar, so a
    channel that BN shifts or rescales looks different between the panels.
    """
    title = "One sample's channels before and after BatchNorm"
    layers = _as_list(layers)
    if not layers:
        return message_figure(path, title, NO_BN_MESSAGE)
    spatial = [layer for layer in layers if layer.before.ndim == 4]
    if not spatial:  # BatchNorm1d: no spatial map to draw
        names = ", ".join(layer.name for layer in layers)
        return message_figure(path, title, f"{names} normalise{'s' if len(layers) == 1 else ''} features "
                                           "without a 2-D map, not image channels.")
    limit = channel_limit(len(spatial))
    chosen = [layer.channels_to_draw(limit) for layer in spatial]
    columns = min(IMAGE_COLUMNS, max(len(c) for c in chosen))
    rows = [-(-len(c) // columns) for c in chosen]
    figure = new_figure(13, sum(0.8 * r + 1.3 for r in rows) + 0.6)
    which = spatial[0].name if len(spatial) == 1 else f"{len(spatial)} BatchNorm layers"
    figure.suptitle(f"{title}: {which}, input sample {sample_index}, eval mode (ch = channel; μ, σ over the map)")
    panels = figure.subfigures(len(spatial), 1, squeeze=False, height_ratios=[r + 1.2 for r in rows])[:, 0]
    image = _displayable(sample_image)
    for row, (panel, layer, channels) in enumerate(zip(panels, spatial, chosen)):
        input_axes, before_axes, after_axes = panel.subplots(1, 3, width_ratios=[0.5, columns, columns])
        if image is not None and row == 0:
            input_axes.imshow(image, cmap="gray")  # the input is an image; the BN maps beside it are not
            input_axes.set_title("input")
        input_axes.set_axis_off()
        if len(spatial) > 1:
            why = f" ({layer.why})" if layer.why else ""
            panel.suptitle(f"{layer.name}{why}: {_which(layer, channels)}", fontsize=10, fontweight="bold")
        before = layer.before[sample_index][channels]
        after = layer.after_eval[sample_index][channels]
        height, width = before.shape[1:]
        gap = max(1, round(max(height, width) / 14))
        for axes, maps, label in ((before_axes, before, "before BN"), (after_axes, after, "after BN")):
            limit_value = float(np.abs(maps).max()) or 1.0
            drawn = axes.imshow(_montage(maps, columns, gap), cmap="RdBu_r", vmin=-limit_value, vmax=limit_value)
            for index, channel in enumerate(channels):
                r, c = divmod(index, columns)
                axes.text(c * (width + gap) + width / 2, r * (height + gap), f"ch {channel}", ha="center", va="top",
                          fontsize=6.5, color="black")
                axes.text(c * (width + gap) + width / 2, r * (height + gap) + height - 1,
                          f"μ={maps[index].mean():+.2f}\nσ={maps[index].std():.2f}", ha="center", va="bottom",
                          fontsize=6, color="black")
            axes.set_title(label)
            axes.set_axis_off()
            panel.colorbar(drawn, ax=axes, shrink=0.8, label="value", location="bottom")
    return save_figure(figure, path)
