"""BatchNorm running statistics: pooling them by the law of total variance, measuring how
far replicas drifted apart, and recomputing them exactly over a data set.

Conventions
-----------
PyTorch keeps ``running_var`` as an *unbiased* estimate: each training step folds in the
batch variance times m/(m − 1), where m is the number of values per channel in the batch
(N·H·W for BatchNorm2d). Moments travel here as (count, mean, M2), M2 = Σ(x − mean)²,
the form in which pooling groups of values is exact (Chan, Golub and LeVeque):

    n = Σ n_r,   μ = Σ n_r·μ_r / n,   M2 = Σ M2_r + Σ n_r·(μ_r − μ)²

The last sum is the law of total variance: within-group squares plus the spread of the
group means. A group's unbiased variance is v_r = M2_r/(n_r − 1), so a running_var turns
into moments with M2_r = (n_r − 1)·v_r, and the pooled running_var is M2/(n − 1).

``pool`` takes the sum over groups as a function, so the same five lines pool a stacked
tensor in one process (``sum_stacked``) and the ranks of a process group (an all-reduce,
in ``bnexport.distributed.process_group``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..model import BN_TYPES

SumOverGroups = Callable[[torch.Tensor], torch.Tensor]


def sum_stacked(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over a leading group axis: pooling within one process."""
    return tensor.sum(0)


def sum_nothing(tensor: torch.Tensor) -> torch.Tensor:
    """One group only: pooling is the identity."""
    return tensor


@dataclass
class Moments:
    """Per-channel count, mean and M2 = Σ(x − mean)², in float64.

    ``count`` has a trailing axis of size 1 so that it broadcasts against ``mean``; a
    leading axis, when present, indexes groups (ranks).
    """

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def of(cls, values: torch.Tensor) -> "Moments":
        """The exact moments of a (N, C, ...) batch, per channel C."""
        per_channel = values.detach().transpose(0, 1).reshape(values.shape[1], -1).to(torch.float64)
        mean = per_channel.mean(1)
        m2 = ((per_channel - mean[:, None]) ** 2).sum(1)
        # only the per-channel results leave the device: C numbers, not the activations
        return cls(torch.tensor([float(per_channel.shape[1])], dtype=torch.float64), mean.cpu(), m2.cpu())

    @classmethod
    def from_running(cls, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor | float) -> "Moments":
        """Moments of ``count`` values whose mean and unbiased variance were ``mean`` and ``var``."""
        count = torch.as_tensor(count, dtype=torch.float64)
        count = count.reshape(*count.shape, 1) if count.ndim < mean.ndim else count
        return cls(count, mean.to(torch.float64), (count - 1) * var.to(torch.float64))

    @classmethod
    def empty(cls, channels: int) -> "Moments":
        zeros = torch.zeros(channels, dtype=torch.float64)
        return cls(torch.zeros(1, dtype=torch.float64), zeros, zeros.clone())

    def combine(self, other: "Moments") -> "Moments":
        """Two groups' moments as one group's (sequential accumulation over batches)."""
        count = self.count + other.count
        delta = other.mean - self.mean
        safe = torch.where(count > 0, count, torch.ones_like(count))
        mean = self.mean + delta * other.count / safe
        m2 = self.m2 + other.m2 + delta ** 2 * self.count * other.count / safe
        return Moments(count, mean, m2)

    def unbiased_var(self) -> torch.Tensor:
        return self.m2 / (self.count - 1).clamp(min=1)


def pool(moments: Moments, *, sum_over: SumOverGroups = sum_stacked) -> Moments:
    """The moments of the union of the groups; the law of total variance (module docstring)."""
    count = sum_over(moments.count)
    mean = sum_over(moments.count * moments.mean) / count
    m2 = sum_over(moments.m2 + moments.count * (moments.mean - mean) ** 2)
    return Moments(count, mean, m2)


def merge_running_stats(counts: torch.Tensor, means: torch.Tensor, variances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool stacked per-group (mean, unbiased var) of ``counts`` values each: (mean, unbiased var).

    ``counts`` is (R,), ``means`` and ``variances`` are (R, C). Exact when each group's
    figures are the exact mean and unbiased variance of its values.
    """
    pooled = pool(Moments.from_running(means, variances, counts))
    return pooled.mean, pooled.unbiased_var()


# Which layers, and what they hold ------------------------------------------------------

def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that keep running statistics, by qualified name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, BN_TYPES) and m.track_running_stats and m.running_mean is not None}


@torch.no_grad()
def values_per_sample(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """For each BN layer, how many values per channel one input sample contributes (H·W for 2d)."""
    layers = batchnorm_layers(model)
    seen: dict[str, int] = {}
    hooks = [layer.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0][0].numel() // args[0].shape[1]))
             for name, layer in layers.items()]
    was_training = model.training
    try:
        device = next(model.parameters()).device
        model.eval()(torch.zeros((1, *input_shape), device=device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return seen


@dataclass
class LayerSpread:
    """How far the ranks' running statistics of one BN layer were apart, before pooling."""

    mean_range: float  # max over channels of (max_r μ_r − min_r μ_r)
    mean_range_in_std: float  # the same, in units of the pooled standard deviation
    var_range_relative: float  # max over channels of (max_r v_r − min_r v_r) / pooled v
    rank0_mean_shift_in_std: float  # how far pooling moved rank 0's mean, in pooled std

    def to_json(self) -> dict:
        return {k: float(v) for k, v in asdict(self).items()}


def layer_spread(mean_max: torch.Tensor, mean_min: torch.Tensor, var_max: torch.Tensor, var_min: torch.Tensor,
                 pooled_mean: torch.Tensor, pooled_var: torch.Tensor, rank0_mean: torch.Tensor) -> LayerSpread:
    std = pooled_var.clamp(min=1e-30).sqrt()
    return LayerSpread(
        mean_range=float((mean_max - mean_min).max()),
        mean_range_in_std=float(((mean_max - mean_min) / std).max()),
        var_range_relative=float(((var_max - var_min) / pooled_var.clamp(min=1e-30)).max()),
        rank0_mean_shift_in_std=float(((rank0_mean - pooled_mean).abs() / std).max()),
    )


# Exact recalibration ---------------------------------------------------------------------

@dataclass
class LayerRecalibration:
    """What recalibrating one BN layer found and changed."""

    values_per_channel: int  # how many values each channel's statistics summarise
    mean_change_in_std: float  # max over channels of |new μ − old μ| / new σ
    var_change_relative: float  # max over channels of |new v − old v| / new v
    cumulative_average_var_error: float  # PyTorch's momentum=None average of batch variances vs exact, relative

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Recalibration:
    batches: int  # batches seen, all ranks together
    samples: int  # samples seen, all ranks together
    layers: dict[str, LayerRecalibration]

    def to_json(self) -> dict:
        return {"batches": self.batches, "samples": self.samples,
                "layers": {name: layer.to_json() for name, layer in self.layers.items()}}


@torch.no_grad()
def recompute_running_stats(model: nn.Module, batches: Iterable[torch.Tensor | tuple[torch.Tensor, ...]], *,
                            sum_over: SumOverGroups = sum_nothing) -> Recalibration:
    """Replace every BN layer's running statistics by the exact statistics of its input over ``batches``
    (each a tensor, or a tuple of tensors for a model with several inputs).

    The model runs in training mode with ``momentum=None``, as ``torch.optim.swa_utils.update_bn``
    does, so every layer sees the activations training produced. PyTorch's own cumulative
    average then averages per-batch variances, which misses the spread between batch means
    and weighs a short last batch like a full one; so each layer's input is also pooled
    exactly, in float64, by the law of total variance, and that is what the layer keeps
    (PyTorch's average is kept only to report how far off it was). ``sum_over`` pools across
    ranks when each rank saw its own part of the data; every rank then gets the same numbers.
    """
    layers = batchnorm_layers(model)
    old = {name: (layer.running_mean.detach().cpu().double(), layer.running_var.detach().cpu().double())
           for name, layer in layers.items()}
    moments = {name: Moments.empty(layer.num_features) for name, layer in layers.items()}
    momenta = {name: layer.momentum for name, layer in layers.items()}
    was_training = model.training
    device = next(model.parameters()).device

    def accumulate(name):
        def hook(module, args):
            moments[name] = moments[name].combine(Moments.of(args[0]))
        return hook

    hooks = [layer.register_forward_pre_hook(accumulate(name)) for name, layer in layers.items()]
    batch_count = samples = 0
    try:
        for layer in layers.values():
            layer.reset_running_stats()
            layer.momentum = None  # cumulative average over the batches, not an exponential one
        model.train()
        for batch in batches:
            inputs = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
            model(*(tensor.to(device) for tensor in inputs))
            batch_count += 1
            samples += len(inputs[0])
    finally:
        for hook in hooks:
            hook.remove()
        for name, layer in layers.items():
            layer.momentum = momenta[name]
        model.train(was_training)

    totals = sum_over(torch.tensor([batch_count, samples], dtype=torch.float64))
    report = {name: _replace_statistics(name, layer, pool(moments[name], sum_over=sum_over), old=old[name],
                                        cumulative_var=layer.running_var.detach().cpu().double(), batches=int(totals[0]))
              for name, layer in layers.items()}
    return Recalibration(batches=int(totals[0]), samples=int(totals[1]), layers=report)


def _replace_statistics(name: str, layer: nn.modules.batchnorm._BatchNorm, pooled: Moments, *,
                        old: tuple[torch.Tensor, torch.Tensor], cumulative_var: torch.Tensor,
                        batches: int) -> LayerRecalibration:
    """Put ``pooled``'s mean and unbiased variance in ``layer``; say how far they moved, and how far
    ``cumulative_var`` (PyTorch's momentum=None average of batch variances) is from the exact one."""
    if float(pooled.count) < 2:
        raise ValueError(f"recalibration of {name} needs at least 2 values per channel, got {int(pooled.count)}")
    mean, var = pooled.mean, pooled.unbiased_var()
    std, safe_var = var.clamp(min=1e-30).sqrt(), var.clamp(min=1e-30)
    old_mean, old_var = old
    recalibration = LayerRecalibration(
        values_per_channel=int(pooled.count),
        mean_change_in_std=float(((mean - old_mean).abs() / std).max()),
        var_change_relative=float(((var - old_var).abs() / safe_var).max()),
        cumulative_average_var_error=float(((cumulative_var - var).abs() / safe_var).max()),
    )
    layer.running_mean.copy_(mean)
    layer.running_var.copy_(var)
    layer.num_batches_tracked.fill_(batches)
    return recalibration


class _ReachedLayer(Exception):
    """Raised inside the forward once the layer being recalibrated has seen its input: the rest is not needed."""


@torch.no_grad()
def recompute_running_stats_layerwise(model: nn.Module, batches: Sequence[torch.Tensor | tuple[torch.Tensor, ...]]) -> Recalibration:
    """Give every BN layer the exact statistics of the input it sees at inference, over all ``batches``.

    The model runs in eval mode, so no layer's output depends on which samples share its batch,
    and the layers are recalibrated one at a time in the order the forward calls them: pass k
    runs every batch up to layer k's input (and stops there), with layers 1..k-1 already holding
    their new statistics. Layer k then keeps its input's mean and unbiased variance, pooled in
    float64 by the law of total variance. So the result is the same for any batch size, and is
    the fixed point an exported model needs: each running mean and variance is that of the
    layer's own input when the whole model normalises with running statistics. This costs up to
    one pass per layer; ``recompute_running_stats`` is the one-pass, training-mode alternative.
    A layer called twice in one forward sees every call, and is recalibrated in a full pass.
    """
    layers = batchnorm_layers(model)
    if not batches:
        raise ValueError("recalibration needs at least one batch")
    device = next(model.parameters()).device
    as_inputs = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in batches]
    was_training = model.training
    model.eval()
    try:
        calls = _call_order(model, layers, as_inputs[0], device)
        report: dict[str, LayerRecalibration] = {}
        for name in dict.fromkeys(calls):
            layer = layers[name]
            stop_early = calls.count(name) == 1
            old = (layer.running_mean.detach().cpu().double(), layer.running_var.detach().cpu().double())
            pooled = Moments.empty(layer.num_features)
            batch_vars = []

            def record(module, args):
                nonlocal pooled
                seen = Moments.of(args[0])
                pooled = pooled.combine(seen)
                batch_vars.append(seen.unbiased_var())
                if stop_early:
                    raise _ReachedLayer

            hook = layer.register_forward_pre_hook(record)
            try:
                for inputs in as_inputs:
                    try:
                        model(*(tensor.to(device) for tensor in inputs))
                    except _ReachedLayer:
                        pass
            finally:
                hook.remove()
            cumulative_var = torch.stack(batch_vars).mean(0)
            report[name] = _replace_statistics(name, layer, pooled, old=old, cumulative_var=cumulative_var,
                                               batches=len(as_inputs))
    finally:
        model.train(was_training)
    return Recalibration(batches=len(as_inputs), samples=sum(len(inputs[0]) for inputs in as_inputs), layers=report)


def _call_order(model: nn.Module, layers: dict, inputs: tuple[torch.Tensor, ...], device) -> list[str]:
    """The BN layers' names in the order one forward calls them, once per call."""
    names = {layer: name for name, layer in layers.items()}
    order: list[str] = []
    hooks = [layer.register_forward_pre_hook(lambda module, args: order.append(names[module])) for layer in layers.values()]
    try:
        model(*(tensor.to(device) for tensor in inputs))
    finally:
        for hook in hooks:
            hook.remove()
    return order


def training_batches(images: torch.Tensor, order: torch.Tensor, *, batch_size: int,
                     max_batches: int | None = None) -> Iterable[torch.Tensor]:
    """Slices of ``images`` in ``order``, without augmentation: the data that the exported model will see."""
    for number, start in enumerate(range(0, len(order), batch_size)):
        if max_batches is not None and number >= max_batches:
            return
        yield images[order[start:start + batch_size]]
