"""What training is watched for: BatchNorm statistics step by step, and test accuracy along the way.

``TrainingRecorder`` is one ``on_step`` hook for ``train.train``. It records, per BN layer,
the statistics of each training batch next to the running statistics the layer keeps, so
a figure can show how the running estimate trails the batches; and it measures test
accuracy every few steps, so "steps to reach 90%" is measured rather than read off at
epoch ends. Neither touches a random generator, and neither changes the model's weights,
so a recorded run writes the same checkpoint as an unrecorded one.

``train_twin`` trains the same run with BatchNorm switched (on ↔ off): same seed, data order,
augmentation and schedule, so the difference in the curves is the BatchNorm and nothing else.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from ..config import TrainConfig
from ..data import Dataset
from ..model import BN_TYPES
from .loop import evaluate, new_state, total_steps, train

# Channels recorded per BN layer: enough for the figure, and a ResNet's 512-channel
# layers would otherwise make bn_stats.json tens of megabytes.
MAX_RECORDED_CHANNELS = 16
# Test-accuracy probes per run, the resolution of "steps to reach X%", each on the first
# PROBE_IMAGES test images. 20 probes of 500 images cost about a tenth of SimpleCNN's
# training on the bundled digits; the full test set at every epoch's end stays as before.
PROBES_PER_RUN = 20
PROBE_IMAGES = 500
ACCURACY_TARGET = 0.90


def _rounded(values: torch.Tensor) -> list[float]:
    return [float(f"{v:.6g}") for v in values.tolist()]


@dataclass
class LayerStats:
    """One BN layer's statistics at each recorded step; each entry is a list over channels."""

    name: str
    channels: int  # the layer's channel count; only the first MAX_RECORDED_CHANNELS are recorded
    momentum: float | None
    batch_mean: list[list[float]] = field(default_factory=list)
    batch_var: list[list[float]] = field(default_factory=list)  # unbiased, as the running update uses
    running_mean: list[list[float]] = field(default_factory=list)
    running_var: list[list[float]] = field(default_factory=list)


@dataclass
class BNStats:
    """bn_stats.json: the recorded steps and, per layer, batch vs running statistics."""

    steps: list[int] = field(default_factory=list)
    epoch_end_step: list[int] = field(default_factory=list)
    layers: list[LayerStats] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "BNStats":
        layers = [LayerStats(**layer) for layer in data.get("layers", [])]
        return cls(steps=list(data.get("steps", [])), epoch_end_step=list(data.get("epoch_end_step", [])), layers=layers)


@dataclass
class RunCurves:
    """One training run as the training-curves figure and the report need it."""

    batch_norm: bool
    step_loss: list[float]
    epoch_end_step: list[int]
    test_accuracy: list[float]  # after each epoch
    accuracy_steps: list[int] = field(default_factory=list)  # steps at which test accuracy was probed
    accuracy_probe: list[float] = field(default_factory=list)
    train_seconds: float | None = None  # the training loop alone, probes included

    @property
    def label(self) -> str:
        return "with BatchNorm" if self.batch_norm else "without BatchNorm"

    def steps_to_reach(self, target: float = ACCURACY_TARGET) -> int | None:
        """The first probed step with test accuracy ≥ target (epoch ends when nothing was probed); None if never."""
        points = list(zip(self.accuracy_steps, self.accuracy_probe)) or list(zip(self.epoch_end_step, self.test_accuracy))
        return next((step for step, accuracy in points if accuracy >= target), None)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "RunCurves":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


class TrainingRecorder:
    """The ``on_step`` hook: BN statistics (optional) and test accuracy every few steps."""

    def __init__(self, *, bn_stats: bool = True, probes: int = PROBES_PER_RUN,
                 max_channels: int = MAX_RECORDED_CHANNELS):
        self.record_bn = bn_stats
        self.probes = probes
        self.probe_every = 1
        self.max_channels = max_channels
        self.stats = BNStats()
        self.accuracy_steps: list[int] = []
        self.accuracy_probe: list[float] = []
        self.seconds = 0.0
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._bn_modules: dict[str, nn.Module] = {}
        self._handles: list = []
        self._started: float | None = None

    def attach(self, model: nn.Module, dataset: Dataset, *, total_steps: int) -> "TrainingRecorder":
        """Hook into ``model``'s BN layers; probe accuracy on ``dataset``'s test split."""
        self.test_images, self.test_labels = dataset.test_images[:PROBE_IMAGES], dataset.test_labels[:PROBE_IMAGES]
        self.probe_every = max(1, total_steps // max(1, self.probes))
        if self.record_bn:
            for name, module in model.named_modules():
                if isinstance(module, BN_TYPES):
                    self._bn_modules[name] = module
                    self.stats.layers.append(LayerStats(name, module.num_features, module.momentum))
                    self._handles.append(module.register_forward_pre_hook(self._batch_hook(name)))
        self._started = time.perf_counter()
        return self

    def _batch_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            if not module.training:  # evaluation passes (the accuracy probe) use running stats
                return
            with torch.no_grad():
                x = inputs[0].detach()[:, :self.max_channels]
                dims = [d for d in range(x.ndim) if d != 1]
                self._pending[name] = (x.mean(dims), x.var(dims, unbiased=True))
        return hook

    def __call__(self, model: nn.Module, step: int) -> None:
        # Under DDP the hook gets the wrapper; probing through the bare module keeps the
        # probe local to this rank (no collective in its forward).
        model = getattr(model, "module", model)
        for name, module in list(self._bn_modules.items()):
            current = model.get_submodule(name)
            if current is not module:  # swapped during training (SyncBatchNorm under --sync-bn): follow it
                self._bn_modules[name] = current
                self._handles.append(current.register_forward_pre_hook(self._batch_hook(name)))
        if self._bn_modules:
            self.stats.steps.append(step)
            for layer in self.stats.layers:
                module = self._bn_modules[layer.name]
                mean, var = self._pending.pop(layer.name, (None, None))
                if mean is None or module.running_mean is None:
                    continue
                layer.batch_mean.append(_rounded(mean))
                layer.batch_var.append(_rounded(var))
                layer.running_mean.append(_rounded(module.running_mean[:self.max_channels]))
                layer.running_var.append(_rounded(module.running_var[:self.max_channels]))
        if step % self.probe_every == 0:
            self.accuracy_steps.append(step)
            self.accuracy_probe.append(round(evaluate(model, self.test_images, self.test_labels), 6))
            model.train()  # evaluate() left it in eval mode; the epoch goes on training

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._started is not None:
            self.seconds = time.perf_counter() - self._started

    def bn_stats(self, history) -> BNStats:
        self.stats.epoch_end_step = list(history.epoch_end_step)
        return self.stats

    def curves(self, history, *, batch_norm: bool) -> RunCurves:
        return RunCurves(
            batch_norm=batch_norm, step_loss=list(history.step_loss), epoch_end_step=list(history.epoch_end_step),
            test_accuracy=list(history.test_accuracy), accuracy_steps=list(self.accuracy_steps),
            accuracy_probe=list(self.accuracy_probe), train_seconds=round(self.seconds, 3),
        )


def train_twin(config: TrainConfig, dataset: Dataset, *, progress: bool = True) -> RunCurves:
    """Train ``config`` with BatchNorm switched, from scratch, and return its curves.

    Only the training loop runs: no checkpoint, export or parity, so the comparison costs
    the twin's training time and no more.
    """
    twin_config = replace(config, batch_norm=not config.batch_norm)
    state = new_state(twin_config, dataset)
    recorder = TrainingRecorder(bn_stats=False)
    recorder.attach(state.model, dataset, total_steps=total_steps(twin_config, dataset))
    try:
        train(state, dataset, progress=progress, on_step=recorder)
    finally:
        recorder.close()
    return recorder.curves(state.history, batch_norm=twin_config.batch_norm)
