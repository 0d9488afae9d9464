"""BatchNorm parameters per channel, and their health before folding.

Folding scales the conv's weights by s = γ/√(σ²+ε) per output channel. Two things can go
wrong, and both show up here per channel:

* **dead channels**: γ≈0 (the channel is multiplied away) or σ²≈0 (its input never varied
  in training, so ε, not the data, sets s);
* **float16 range**: a folded weight w·s or bias (b−μ)·s+β that is infinite in float16
  (|x| > 65504), or one that float16 held before the fold and rounds to 0 after it
  (|x| < 2⁻²⁵). A model folded in float32 and then converted to half precision breaks on
  exactly these channels.

A third check needs data: **running-statistic drift**, how far the statistics of a batch
entering the layer are from the running statistics the export normalises with (see
``LayerHealth.drift``). Every layer is then ranked by ``severity``: dead channels first,
then float16 overflow, float16 underflow, drift, and healthy layers last.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
from torch import fx, nn

from ..errors import BnexportError
from ..fold.maths import bn_scale_shift, fold_into_output_channels
from ..fold.torch_graph import CONV_TYPES, trace
from ..model import BN_TYPES
from .activations import NO_BN_MESSAGE, InputMoments
from .common import COLOR_BEFORE, COLOR_FLAG, message_figure, new_figure, save_figure

GAMMA_DEAD = 1e-5  # |γ| at or below this multiplies the channel away
DRIFT_FLAG = 1.0  # drift at or above this flags a layer: a batch mean one running σ off, or half or double the variance
PROBLEMS = ("dead", "fp16 overflow", "fp16 underflow", "drift")  # most severe first
DETAIL_LAYERS = 4  # layers the per-channel figures draw: the two most severe, the first and the last


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
    # Measured on a batch (``with_drift``); None when the layer was not measured or never ran.
    mean_shift: list[float] | None = None  # |μ_batch − μ_running| / √(σ²_running + ε), per channel
    variance_ratio: list[float] | None = None  # (σ²_batch + ε) / (σ²_running + ε), per channel

    @property
    def channels(self) -> int:
        return len(self.scale)

    @property
    def dead(self) -> list[int]:
        return sorted(set(self.dead_gamma) | set(self.dead_variance))

    def channel_drift(self) -> np.ndarray | None:
        """Per channel: max(mean shift, |log₂ variance ratio|); None when not measured."""
        if self.mean_shift is None or self.variance_ratio is None:
            return None
        return np.maximum(np.asarray(self.mean_shift), np.abs(np.log2(np.asarray(self.variance_ratio))))

    # Cached: sorting and drawing ask for these thousands of times, and the measured
    # fields are only ever set by ``with_drift``, which makes a new LayerHealth.
    @cached_property
    def drift(self) -> float | None:
        """The largest channel drift: 1 means a batch mean one running σ away, or the variance halved or doubled."""
        drift = self.channel_drift()
        return None if drift is None or drift.size == 0 else float(drift.max())

    @cached_property
    def drifting(self) -> list[int]:
        drift = self.channel_drift()
        return [] if drift is None else np.flatnonzero(drift >= DRIFT_FLAG).tolist()

    def affected(self, problem: str) -> list[int]:
        """The channels with ``problem`` (one of PROBLEMS)."""
        return {PROBLEMS[0]: self.dead, PROBLEMS[1]: self.fp16_overflow, PROBLEMS[2]: self.fp16_underflow,
                PROBLEMS[3]: self.drifting}[problem]

    @property
    def problems(self) -> list[str]:
        return [problem for problem in PROBLEMS if self.affected(problem)]

    @property
    def healthy(self) -> bool:
        return not self.problems

    @property
    def verdict(self) -> str:
        return self.problems[0] if self.problems else "healthy"

    def to_json(self) -> dict:
        return {**asdict(self), "channels": self.channels, "drift": self.drift, "problems": self.problems,
                "healthy": self.healthy}


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


def model_health(model: nn.Module, moments: dict[str, InputMoments] | None = None) -> list[LayerHealth]:
    """Health of every BN layer with running statistics, in module order; with its drift where
    ``moments`` (``activations.measure_bn_inputs``) has the layer's input."""
    modules = dict(model.named_modules())
    pairs = conv_before_each_bn(model)
    report = []
    for name, module in modules.items():
        if isinstance(module, BN_TYPES) and module.running_mean is not None:
            conv_name = pairs.get(name)
            report.append(layer_health(name, module, modules.get(conv_name) if conv_name else None, conv_name=conv_name))
    return add_drift(report, moments or {})


def add_drift(health: list[LayerHealth], moments: dict[str, InputMoments]) -> list[LayerHealth]:
    """Each layer with its drift where ``moments`` has its input, unchanged where not."""
    return [with_drift(layer, moments[layer.name].mean, moments[layer.name].var) if layer.name in moments else layer
            for layer in health]


def with_drift(layer: LayerHealth, batch_mean: np.ndarray, batch_var: np.ndarray) -> LayerHealth:
    """``layer`` with its running-statistic drift, from the per-channel mean and biased variance of a batch's input.

    mean shift δ_c = |μ_batch − μ_running| / √(σ²_running + ε) and variance ratio
    v_c = (σ²_batch + ε) / (σ²_running + ε): in eval mode the normalised channel has mean ±δ_c
    and variance v_c where train mode gives 0 and 1. ε on both sides keeps a dead channel finite.
    """
    mean, var = np.asarray(layer.running_mean), np.asarray(layer.running_var)
    batch_mean, batch_var = np.asarray(batch_mean, dtype=np.float64), np.asarray(batch_var, dtype=np.float64)
    shift = np.abs(batch_mean - mean) / np.sqrt(var + layer.eps)
    ratio = (batch_var + layer.eps) / (var + layer.eps)
    return replace(layer, mean_shift=shift.tolist(), variance_ratio=ratio.tolist())


def severity(layer: LayerHealth) -> tuple:
    """Sort key, most severe first: the worst problem (PROBLEMS order); within dead and float16 problems,
    more affected channels first; then the larger drift. Healthy layers come last, the most drifting first."""
    problems = layer.problems
    rank = PROBLEMS.index(problems[0]) if problems else len(PROBLEMS)
    hit = len(layer.affected(problems[0])) if problems and problems[0] != "drift" else 0
    return rank, -hit, -(layer.drift if layer.drift is not None else -1.0)


def by_severity(health: list[LayerHealth]) -> list[LayerHealth]:
    """Most severe first; layers that tie keep module order."""
    return sorted(health, key=severity)


def detail_layers(health: list[LayerHealth], *, limit: int = DETAIL_LAYERS) -> dict[str, str]:
    """The few layers drawn channel by channel, in module order, each with why: the two most
    severe (``by_severity``), the first and the last BN, then the next most severe until ``limit``."""
    if not health or limit < 1:
        return {}
    ranked = by_severity(health)
    rank = {layer.name: index + 1 for index, layer in enumerate(ranked)}
    why: dict[str, list[str]] = {}
    candidates = [ranked[0], *ranked[1:2], health[0], health[-1], *ranked[2:]]
    reasons = {health[0].name: ["first BN"]}
    reasons.setdefault(health[-1].name, []).append("last BN")
    for layer in candidates:
        if len(why) >= limit:
            break
        if layer.name not in why:
            an_end_only = layer.name in reasons and rank[layer.name] > 2
            why[layer.name] = ([] if an_end_only else [f"#{rank[layer.name]} by severity"]) + reasons.get(layer.name, [])
    order = {layer.name: index for index, layer in enumerate(health)}
    return {name: ", ".join(text) for name, text in sorted(why.items(), key=lambda item: order[item[0]])}


def channels_to_show(layer: LayerHealth, limit: int) -> list[int]:
    """Up to ``limit`` channels in index order: the flagged ones first (most severe first), then the first ones."""
    drift = layer.channel_drift()
    flagged = layer.dead + layer.fp16_overflow + layer.fp16_underflow
    if drift is not None:
        flagged += [int(c) for c in np.argsort(-drift, kind="stable") if drift[c] >= DRIFT_FLAG]
    chosen = list(dict.fromkeys(flagged))[:limit]
    for channel in range(layer.channels):
        if len(chosen) >= limit:
            break
        if channel not in chosen:
            chosen.append(channel)
    return sorted(chosen)


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


def _tick_names(axes, health: list[LayerHealth], detail: set[str]) -> None:
    step = max(1, -(-len(health) // 120))  # at most 120 names: beyond that they would overlap
    shown = [i for i in range(len(health)) if i % step == 0 or health[i].name in detail]
    axes.set_xticks(shown, [health[i].name for i in shown], rotation=90, fontsize=5.5 if len(health) > 40 else 7)
    for label, index in zip(axes.get_xticklabels(), shown):
        if health[index].name in detail:
            label.set_fontweight("bold")
            label.set_color(COLOR_FLAG)


def plot_health_overview(health: list[LayerHealth], path: str | Path, *, detail: Collection[str] = ()) -> Path:
    """Every BN layer in module order: fold-scale range, drift and flagged channels, one column per layer."""
    title = "BatchNorm health, layer by layer"
    if not health:
        return message_figure(path, title, NO_BN_MESSAGE)
    detail = set(detail)
    x = np.arange(len(health))
    figure = new_figure(max(10.0, min(18.0, 0.08 * len(health) + 6)), 8.0)
    figure.suptitle(f"{title}: {len(health)} layers in module order; the layers drawn channel by channel in red")
    scale_axes, drift_axes, count_axes = figure.subplots(3, 1, sharex=True, height_ratios=[1, 1, 0.8])
    low = [min(abs(v) for v in h.scale) for h in health]
    high = [max(abs(v) for v in h.scale) for h in health]
    low, high = np.maximum(low, 1e-30), np.maximum(high, 1e-30)  # a log axis: γ = 0 sits at its floor
    scale_axes.vlines(x, low, high, color=COLOR_BEFORE, linewidth=1.5)
    scale_axes.plot(x, low, "v", x, high, "^", color=COLOR_BEFORE, markersize=3)
    scale_axes.set_yscale("log")
    scale_axes.set_ylabel("|γ/√(σ²+ε)|\nmin – max over channels")
    measured = [h for h in health if h.mean_shift is not None]
    if measured:
        shift = [max(h.mean_shift, default=np.nan) if h.mean_shift is not None else np.nan for h in health]
        ratio = [float(np.abs(np.log2(h.variance_ratio)).max()) if h.variance_ratio else np.nan for h in health]
        drift_axes.plot(x, shift, "o", color=COLOR_BEFORE, markersize=3, label="max mean shift δ (running σ)")
        drift_axes.plot(x, ratio, "^", color="#dd8452", markersize=3, label="max |log₂ variance ratio|")
        drift_axes.axhline(DRIFT_FLAG, color=COLOR_FLAG, linewidth=0.8, linestyle="--", label=f"flag at {DRIFT_FLAG:g}")
        drift_axes.set_yscale("symlog", linthresh=1.0)
        drift_axes.set_ylim(bottom=0)
        drift_axes.legend(loc="upper right", fontsize=7)
    else:
        drift_axes.text(0.5, 0.5, "drift not measured", ha="center", va="center", transform=drift_axes.transAxes)
    drift_axes.set_ylabel("running-stat drift")
    edges = np.arange(len(health) + 1) - 0.5
    bottom = np.zeros(len(health))
    for problem, color in zip(PROBLEMS[:3], (COLOR_FLAG, "black", "#8172b3")):
        counts = np.array([len(h.affected(problem)) for h in health])
        if counts.any():  # stacked steps, one artist each: 200 layers draw as fast as 2
            count_axes.stairs(bottom + counts, edges, baseline=bottom, fill=True, color=color, label=problem)
        bottom += counts
    count_axes.set_ylabel("flagged channels")
    if bottom.any():
        count_axes.legend(loc="upper right", fontsize=7)
    else:
        count_axes.set_ylim(0, 1)
        count_axes.text(0.5, 0.5, "no dead or float16-unsafe channel in any layer", ha="center", va="center",
                        transform=count_axes.transAxes)
    for axes in (scale_axes, drift_axes, count_axes):
        for index, layer in enumerate(health):
            if layer.name in detail:
                axes.axvspan(index - 0.5, index + 0.5, color=COLOR_FLAG, alpha=0.12, linewidth=0)
    count_axes.set_xlim(-0.5, len(health) - 0.5)
    _tick_names(count_axes, health, detail)
    return save_figure(figure, path)
