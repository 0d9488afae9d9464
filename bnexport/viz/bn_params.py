"""BatchNorm parameters per channel, and their health before folding.

Folding scales the conv's weights by s = γ/√(σ²+ε) per output channel. Two things can go
wrong, and both show up here per channel:

* **dead channels**: γ≈0 (the channel is multiplied away) or σ²≈0 (its input never varied
  in training, so ε, not the data, sets s);
* **float16 range**: a folded weight w·s or bias (b−μ)·s+β that is infinite in float16
  (|x| > 65504), or one that float16 held before the fold and rounds to 0 after it
  (|x| < 2⁻²⁵). A model folded in float32 and then converted to half precision breaks on
  exactly these channels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from torch import fx, nn

from ..errors import BnexportError
from ..fold.maths import bn_scale_shift, fold_into_output_channels
from ..fold.torch_graph import CONV_TYPES, trace
from ..model import BN_TYPES
from .activations import NO_BN_MESSAGE
from .common import COLOR_BEFORE, COLOR_FLAG, message_figure, new_figure, save_figure

GAMMA_DEAD = 1e-5  # |γ| at or below this multiplies the channel away


@dataclass
class LayerHealth:
    """One BN layer: per-channel parameters and the channels that need attention."""

    name: str
    eps: float
    folds_into: str | None  # the conv whose weights a fold scales; None: checked on s and t alone
    running_mean: list[float]
    running_var: list[float]
    gamma: list[float]
    beta: list[float]
    scale: list[float]  # γ/√(σ²+ε)
    dead_gamma: list[int] = field(default_factory=list)
    dead_variance: list[int] = field(default_factory=list)
    fp16_overflow: list[int] = field(default_factory=list)
    fp16_underflow: list[int] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return len(self.scale)

    @property
    def dead(self) -> list[int]:
        return sorted(set(self.dead_gamma) | set(self.dead_variance))

    @property
    def healthy(self) -> bool:
        return not (self.dead or self.fp16_overflow or self.fp16_underflow)

    def to_json(self) -> dict:
        return {**asdict(self), "channels": self.channels, "healthy": self.healthy}


def _fp16_problems(folded: np.ndarray, unfolded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row (output channel): does a folded value overflow float16, and does folding make a value vanish in it.

    Underflow counts only values that float16 holds before the fold and rounds to 0 after it:
    a big layer always has a few initial weights too small for float16, and the fold is not
    to blame for those.
    """
    rows, before = folded.reshape(folded.shape[0], -1), unfolded.reshape(unfolded.shape[0], -1)
    with np.errstate(over="ignore"):
        half, half_before = rows.astype(np.float16), before.astype(np.float16)
    overflow = np.isinf(half).any(axis=1) & np.isfinite(rows).all(axis=1)
    underflow = ((half == 0) & (rows != 0) & (half_before != 0)).any(axis=1)  # γ=0 zeros are exact, not lost
    return overflow, underflow


def layer_health(name: str, bn: nn.Module, conv: nn.Module | None = None, *, conv_name: str | None = None) -> LayerHealth:
    """Parameters and flags of one eval-mode BN layer, folded (in float64) into ``conv`` if given."""
    if bn.running_mean is None or bn.running_var is None:
        raise BnexportError(f"{name}: no running statistics (track_running_stats=False); nothing to fold")
    mean = bn.running_mean.detach().double().numpy()
    var = bn.running_var.detach().double().numpy()
    gamma = bn.weight.detach().double().numpy() if bn.weight is not None else np.ones_like(mean)
    beta = bn.bias.detach().double().numpy() if bn.bias is not None else np.zeros_like(mean)
    scale, shift = bn_scale_shift(gamma, beta, mean, var, bn.eps)
    if conv is not None:
        weight = conv.weight.detach().double().numpy()
        bias = conv.bias.detach().double().numpy() if conv.bias is not None else np.zeros_like(mean)
        folded_weight, folded_bias = fold_into_output_channels(weight, bias, scale, shift)
        folded = np.concatenate([folded_weight.reshape(len(scale), -1), folded_bias[:, None]], axis=1)
        unfolded = np.concatenate([weight.reshape(len(scale), -1), bias[:, None]], axis=1)
    else:  # BN on its own: y·s + t against the identity it replaces
        folded = np.stack([scale, shift], axis=1)
        unfolded = np.ones_like(folded)
    overflow, underflow = _fp16_problems(folded, unfolded)
    return LayerHealth(
        name=name, eps=float(bn.eps), folds_into=conv_name if conv is not None else None,
        running_mean=mean.tolist(), running_var=var.tolist(), gamma=gamma.tolist(), beta=beta.tolist(),
        scale=scale.tolist(),
        dead_gamma=np.flatnonzero(np.abs(gamma) <= GAMMA_DEAD).tolist(),
        dead_variance=np.flatnonzero(var <= bn.eps).tolist(),
        fp16_overflow=np.flatnonzero(overflow).tolist(),
        fp16_underflow=np.flatnonzero(underflow).tolist(),
    )


def conv_before_each_bn(model: nn.Module) -> dict[str, str]:
    """BN module name → the conv module that feeds it, found by tracing; {} if untraceable."""
    try:
        graph_module = trace(model)
    except BnexportError:
        return {}
    modules = dict(graph_module.named_modules())
    pairs = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), BN_TYPES) and node.args:
            producer = node.args[0]
            if isinstance(producer, fx.Node) and producer.op == "call_module" \
                    and isinstance(modules.get(producer.target), CONV_TYPES):
                pairs[node.target] = producer.target
    return pairs


def model_health(model: nn.Module) -> list[LayerHealth]:
    """Health of every BN layer with running statistics, in module order."""
    modules = dict(model.named_modules())
    pairs = conv_before_each_bn(model)
    report = []
    for name, module in modules.items():
        if isinstance(module, BN_TYPES) and module.running_mean is not None:
            conv_name = pairs.get(name)
            report.append(layer_health(name, module, modules.get(conv_name) if conv_name else None, conv_name=conv_name))
    return report


def plot_bn_parameters(health: list[LayerHealth], path: str | Path) -> Path:
    """Per channel: running mean and var, γ, β and the fold scale; flagged channels in red."""
    title = "BatchNorm parameters per channel"
    if not health:
        return message_figure(path, title, NO_BN_MESSAGE)
    quantities = [
        ("running mean μ", "running_mean", False),
        ("running variance σ²", "running_var", True),
        ("γ (weight)", "gamma", False),
        ("β (bias)", "beta", False),
        ("|fold scale| γ/√(σ²+ε)", "scale", True),
    ]
    values = {key: np.concatenate([np.asarray(getattr(layer, key)) for layer in health]) for _, key, _ in quantities}
    offsets = np.cumsum([0] + [layer.channels for layer in health])
    dead = np.concatenate([np.asarray(layer.dead, dtype=int) + offset for layer, offset in zip(health, offsets)])
    fp16 = np.concatenate([np.asarray(sorted(set(layer.fp16_overflow) | set(layer.fp16_underflow)), dtype=int) + offset
                           for layer, offset in zip(health, offsets)])
    total = int(offsets[-1])
    x = np.arange(total)
    figure = new_figure(max(8.0, min(16.0, 0.25 * total + 4)), 8.5)
    counts = (f"{len(health)} layer{'s' if len(health) > 1 else ''}, {total} channels: "
              f"{sum(len(h.dead) for h in health)} dead, "
              f"{sum(len(h.fp16_overflow) for h in health)} overflow and "
              f"{sum(len(h.fp16_underflow) for h in health)} underflow float16 when folded")
    figure.suptitle(f"{title}\n{counts}")
    grid = figure.subplots(len(quantities), 1, sharex=True, squeeze=False)[:, 0]
    for axes, (label, key, log) in zip(grid, quantities):
        y = np.abs(values[key]) if key == "scale" else values[key]
        if total <= 64:
            axes.bar(x, y, color=COLOR_BEFORE, width=0.7)
        else:
            axes.plot(x, y, ".", color=COLOR_BEFORE, markersize=3)
        if log:
            axes.set_yscale("log")
        if len(dead):
            axes.plot(dead, y[dead], "X", color=COLOR_FLAG, markersize=8, label="dead: γ≈0 or σ²≈0")
        if len(fp16):
            axes.plot(fp16, y[fp16], "s", mfc="none", color="black", markersize=9,
                      label="folded weights out of float16 range")
        axes.set_ylabel(label)
        for boundary in offsets[1:-1]:
            axes.axvline(boundary - 0.5, color="black", linewidth=0.6)
    if len(dead) or len(fp16):
        grid[0].legend(loc="upper right")
    if len(health) > 1:
        for layer, offset in zip(health, offsets):
            grid[0].text(offset + layer.channels / 2 - 0.5, 1.02, layer.name, transform=grid[0].get_xaxis_transform(),
                         ha="center", va="bottom", fontsize=7, rotation=90 if len(health) > 6 else 0)
    grid[-1].set_xlabel("channel" if len(health) == 1 else "channel (layers side by side)")
    return save_figure(figure, path)
