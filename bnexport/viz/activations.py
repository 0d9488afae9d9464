"""Activations before and after each BatchNorm, on a batch of inputs, in train mode and in eval mode.

In train mode BN normalises with the statistics of the batch in hand; in eval mode with the
running estimates it kept during training. An exported model always runs eval mode, so
the gap between the two is what a user would see if the running estimates were stale.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..model import BN_TYPES
from .common import COLOR_BEFORE, COLOR_EVAL, COLOR_TRAIN, message_figure, new_figure, save_figure, value_range

MAX_LAYERS_SHOWN = 8
MAX_HISTOGRAM_VALUES = 400_000  # values per histogram: a uniform sample beyond this keeps big layers quick
NO_BN_MESSAGE = "This model has no BatchNorm layers: there are no BN activations to show."


@dataclass
class LayerActivations:
    """One BN layer on one batch: its input and both of its possible outputs, (N, C, ...) arrays."""

    name: str
    before: np.ndarray
    after_train: np.ndarray  # normalised with the batch's own statistics
    after_eval: np.ndarray  # normalised with the running statistics, as exported
    shown_channels: list[int] | None = None  # the channels a per-channel figure draws; None: the first ones
    why: str = ""  # why the report shows this layer in detail, e.g. "#1 by severity, last BN"

    @property
    def channels(self) -> int:
        return self.before.shape[1]

    def gap_per_channel(self) -> np.ndarray:
        """Mean |train-mode output − eval-mode output| per channel."""
        axes = tuple(d for d in range(self.before.ndim) if d != 1)
        return np.abs(self.after_train - self.after_eval).mean(axis=axes)

    def channels_to_draw(self, limit: int) -> list[int]:
        chosen = self.shown_channels if self.shown_channels is not None else range(self.channels)
        return [c for c in chosen if c < self.channels][:limit]


@dataclass
class InputMoments:
    """Per-channel mean and variance (biased: what train mode normalises with) of one BN layer's input."""

    name: str
    count: int  # values per channel
    mean: np.ndarray  # float64, (C,)
    var: np.ndarray

    def merged(self, other: "InputMoments") -> "InputMoments":
        """Both batches as one (a BN module called twice in one forward): Chan's parallel formula."""
        total = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / total
        m2 = self.var * self.count + other.var * other.count + delta ** 2 * self.count * other.count / total
        return InputMoments(self.name, total, mean, m2 / total)


def channel_moments(name: str, x: torch.Tensor) -> InputMoments:
    """Per-channel mean and biased variance of an (N, C, ...) tensor.

    Computed by train-mode BatchNorm itself (momentum 1 copies the batch's statistics into the
    buffers; it stores the unbiased variance), whose kernel is several times faster than
    ``torch.var_mean`` over the non-channel dims.
    """
    channels = x.shape[1]
    count = x.numel() // max(channels, 1)
    if count < 2:  # train mode refuses one value per channel; its variance is 0
        return InputMoments(name, count, x.reshape(channels).double().numpy(), np.zeros(channels))
    mean, var = torch.zeros(channels), torch.ones(channels)
    F.batch_norm(x.float(), mean, var, training=True, momentum=1.0)  # eps affects only the output, unused
    return InputMoments(name, count, mean.double().numpy(), var.double().numpy() * (count - 1) / count)


def _as_tuple(inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _bn_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BN_TYPES)}


def _run_eval(model: nn.Module, inputs: tuple[torch.Tensor, ...], hooks: dict[nn.Module, object]) -> None:
    """One eval-mode forward with a forward pre-hook on each given module; the model's mode is restored."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks.items()]
    was_training = model.training
    try:
        model.eval()
        model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


@dataclass
class StreamedInputs:
    """One forward pass seen from the BN layers: every input's moments, and the few inputs kept whole."""

    moments: dict[str, InputMoments]
    kept: dict[str, torch.Tensor]  # BN name → its input tensor, for the layers asked for


@torch.no_grad()
def stream_bn_inputs(model: nn.Module, inputs: torch.Tensor | tuple[torch.Tensor, ...], *,
                     keep: Collection[str] = (), keep_lowest: int = 0,
                     score: Callable[[str, InputMoments], Any] | None = None) -> StreamedInputs:
    """Per-channel moments of every BN layer's input, in one eval-mode forward of ``inputs``.

    Whole input tensors are kept only for the layers named in ``keep`` and for the
    ``keep_lowest`` layers whose ``score(name, moments)`` is lowest so far: a layer that
    drops out of that set is released at once, so a 200-layer model at 224×224 holds a few
    tensors at a time, not 200. ``score`` is called as each layer runs, with its moments.
    """
    keep = set(keep)
    moments: dict[str, InputMoments] = {}
    kept: dict[str, torch.Tensor] = {}
    lowest: list[tuple[Any, str]] = []  # (score, name), sorted; at most keep_lowest entries

    def hook_for(name: str):
        def hook(module, args):
            x = args[0].detach()
            found = channel_moments(name, x)
            moments[name] = moments[name].merged(found) if name in moments else found
            if name in keep:
                kept[name] = x
            if keep_lowest and score is not None:
                lowest[:] = [entry for entry in lowest if entry[1] != name]
                lowest.append((score(name, moments[name]), name))
                lowest.sort(key=lambda entry: entry[0])
                for _, dropped in lowest[keep_lowest:]:
                    if dropped not in keep:
                        kept.pop(dropped, None)
                del lowest[keep_lowest:]
                if any(entry[1] == name for entry in lowest):
                    kept[name] = x
        return hook

    _run_eval(model, _as_tuple(inputs), {m: hook_for(name) for name, m in _bn_layers(model).items()})
    return StreamedInputs(moments, kept)


def measure_bn_inputs(model: nn.Module, inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> dict[str, InputMoments]:
    """Per-channel moments of every BN layer's input; no tensor is kept."""
    return stream_bn_inputs(model, inputs).moments


@torch.no_grad()
def layer_activations(model: nn.Module, kept: dict[str, torch.Tensor], names: list[str]) -> list[LayerActivations]:
    """Each named BN layer's input (from ``kept``) and both of its outputs, in ``names`` order.

    The train-mode output comes from a copy of the layer, so the model's running statistics
    are never touched. A name with no kept input (a BN the forward never reached) is skipped.
    """
    layers = _bn_layers(model)
    captured = []
    for name in names:
        if name not in kept or name not in layers:
            continue
        bn, x = layers[name], kept[name]
        was_training = bn.training
        after_eval = bn.eval()(x).numpy()
        bn.train(was_training)
        try:
            after_train = copy.deepcopy(bn).train()(x).numpy()
        except ValueError:  # one value per channel: a batch has no statistics to normalise with
            after_train = after_eval.copy()
        captured.append(LayerActivations(name=name, before=x.numpy().copy(), after_train=after_train,
                                         after_eval=after_eval))
    return captured


def capture_bn_activations(model: nn.Module, images: torch.Tensor | tuple[torch.Tensor, ...], *,
                           names: list[str] | None = None) -> list[LayerActivations]:
    """Run ``model`` in eval mode on ``images`` and keep each BN layer's input and outputs.

    ``names`` limits the capture to those layers (in that order): whole tensors are kept, so
    a big model should name a few.
    """
    wanted = list(_bn_layers(model)) if names is None else list(names)
    return layer_activations(model, stream_bn_inputs(model, images, keep=wanted).kept, wanted)


def sample_values(values: np.ndarray, limit: int = MAX_HISTOGRAM_VALUES) -> np.ndarray:
    """All of ``values`` flattened, or a seeded uniform sample of ``limit`` of them."""
    flat = values.ravel()
    if flat.size <= limit:
        return flat
    return flat[np.random.default_rng(0).integers(0, flat.size, size=limit)]


def plot_activation_distributions(layers: list[LayerActivations], path: str | Path) -> Path:
    """Per BN layer: the distribution of all its inputs and outputs, and the train/eval gap per channel."""
    title = "Activations before and after BatchNorm"
    if not layers:
        return message_figure(path, title, NO_BN_MESSAGE)
    shown = layers[:MAX_LAYERS_SHOWN]
    figure = new_figure(10, 2.6 * len(shown) + 0.6)
    suffix = f" (first {len(shown)} of {len(layers)} layers)" if len(layers) > len(shown) else ""
    figure.suptitle(f"{title}{suffix}, on {shown[0].before.shape[0]} input samples")
    panels = figure.subfigures(len(shown), 1, squeeze=False)[:, 0]
    for panel, layer in zip(panels, shown):
        left, right = panel.subplots(1, 2, width_ratios=[1.3, 1])
        series = [("input (before BN)", layer.before, COLOR_BEFORE),
                  ("output, train mode (batch stats)", layer.after_train, COLOR_TRAIN),
                  ("output, eval mode (running stats)", layer.after_eval, COLOR_EVAL)]
        sampled = [sample_values(values) for _, values, _ in series]
        bins = np.linspace(*value_range(sampled, low=0.1, high=99.9), 80)
        for (label, values, color), sample in zip(series, sampled):
            counts, _ = np.histogram(sample, bins=bins, density=True)
            left.stairs(counts, bins, color=color, linewidth=1.4, linestyle=(0, (4, 2)) if "train" in label else "-",
                        label=f"{label}: μ={values.mean():.2f}, σ={values.std():.2f}")
        left.set_yscale("log")
        left.minorticks_off()
        left.set_ylim(top=left.get_ylim()[1] * 300)  # room for the legend above the curves
        if len(shown) > 1:
            why = f" ({layer.why})" if layer.why else ""
            panel.suptitle(f"{layer.name}{why}", fontsize=10, fontweight="bold")
            left.set_title(f"all {layer.channels} channels pooled")
        else:
            left.set_title(f"{layer.name}: all {layer.channels} channels pooled")
        left.set_xlabel("activation value")
        left.set_ylabel("density (log)")
        left.legend(loc="upper center", fontsize=7)

        gap = layer.gap_per_channel()
        if len(gap) <= 64:
            right.bar(np.arange(len(gap)), gap, color=COLOR_TRAIN)
        else:  # one artist, not thousands of bars: a 2048-channel layer draws in milliseconds
            right.stairs(gap, np.arange(len(gap) + 1) - 0.5, fill=True, color=COLOR_TRAIN)
        name = "" if len(shown) > 1 else f"{layer.name}: "
        right.set_title(f"{name}train-mode vs eval-mode output\n(largest gap {gap.max():.3g}, channel "
                        f"{int(gap.argmax())})")
        right.set_xlabel("channel")
        right.set_ylabel("mean |train − eval|")
    return save_figure(figure, path)
