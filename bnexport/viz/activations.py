"""Activations before and after each BatchNorm, on real data, in train mode and in eval mode.

In train mode BN normalises with the statistics of the batch in hand; in eval mode with the
running estimates it kept during training. An exported model always runs eval mode, so
the gap between the two is what a user would see if the running estimates were stale.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..model import BN_TYPES
from .common import COLOR_BEFORE, COLOR_EVAL, COLOR_TRAIN, message_figure, new_figure, save_figure, value_range

MAX_LAYERS_SHOWN = 8
NO_BN_MESSAGE = "This model has no BatchNorm layers: there are no BN activations to show."


@dataclass
class LayerActivations:
    """One BN layer on one batch: its input and both of its possible outputs, (N, C, ...) arrays."""

    name: str
    before: np.ndarray
    after_train: np.ndarray  # normalised with the batch's own statistics
    after_eval: np.ndarray  # normalised with the running statistics, as exported

    @property
    def channels(self) -> int:
        return self.before.shape[1]

    def gap_per_channel(self) -> np.ndarray:
        """Mean |train-mode output − eval-mode output| per channel."""
        axes = tuple(d for d in range(self.before.ndim) if d != 1)
        return np.abs(self.after_train - self.after_eval).mean(axis=axes)


@torch.no_grad()
def capture_bn_activations(model: nn.Module, images: torch.Tensor) -> list[LayerActivations]:
    """Run ``model`` in eval mode on ``images`` and keep each BN layer's input and outputs.

    The train-mode output comes from a copy of the layer, so the model's running
    statistics are never touched.
    """
    inputs: dict[str, torch.Tensor] = {}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, BN_TYPES)}
    handles = [m.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0].detach()))
               for name, m in layers.items()]
    was_training = model.training
    try:
        model.eval()
        model(images)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    captured = []
    for name, bn in layers.items():
        if name not in inputs:  # a BN the forward pass never reached
            continue
        x = inputs[name]
        train_copy = copy.deepcopy(bn).train()
        captured.append(LayerActivations(
            name=name, before=x.numpy().copy(), after_train=train_copy(x).numpy(), after_eval=bn.eval()(x).numpy(),
        ))
    return captured


def plot_activation_distributions(layers: list[LayerActivations], path: str | Path) -> Path:
    """Per BN layer: the distribution of all its inputs and outputs, and the train/eval gap per channel."""
    title = "Activations before and after each BatchNorm"
    if not layers:
        return message_figure(path, title, NO_BN_MESSAGE)
    shown = layers[:MAX_LAYERS_SHOWN]
    figure = new_figure(10, 2.6 * len(shown) + 0.6)
    suffix = f" (first {len(shown)} of {len(layers)} layers)" if len(layers) > len(shown) else ""
    figure.suptitle(f"{title}{suffix}, on {shown[0].before.shape[0]} test images")
    grid = figure.subplots(len(shown), 2, squeeze=False, width_ratios=[1.3, 1])
    for row, layer in enumerate(shown):
        left, right = grid[row]
        series = [("input (before BN)", layer.before, COLOR_BEFORE),
                  ("output, train mode (batch stats)", layer.after_train, COLOR_TRAIN),
                  ("output, eval mode (running stats)", layer.after_eval, COLOR_EVAL)]
        bins = np.linspace(*value_range([v for _, v, _ in series], low=0.1, high=99.9), 80)
        for label, values, color in series:
            counts, _ = np.histogram(values, bins=bins, density=True)
            left.stairs(counts, bins, color=color, linewidth=1.4, linestyle=(0, (4, 2)) if "train" in label else "-",
                        label=f"{label}: μ={values.mean():.2f}, σ={values.std():.2f}")
        left.set_yscale("log")
        left.minorticks_off()
        left.set_ylim(top=left.get_ylim()[1] * 300)  # room for the legend above the curves
        left.set_title(f"{layer.name}: all {layer.channels} channels pooled")
        left.set_xlabel("activation value")
        left.set_ylabel("density (log)")
        left.legend(loc="upper center", fontsize=7)

        gap = layer.gap_per_channel()
        right.bar(np.arange(len(gap)), gap, color=COLOR_TRAIN)
        right.set_title(f"{layer.name}: train-mode vs eval-mode output\n(largest gap {gap.max():.3g}, channel "
                        f"{int(gap.argmax())})")
        right.set_xlabel("channel")
        right.set_ylabel("mean |train − eval|")
    return save_figure(figure, path)
