"""Training curves with and without BatchNorm, and the measured difference.

Both runs share the seed, data order, augmentation, optimiser and schedule (see
``recording.train_twin``), so the gap between the curves is the BatchNorm's doing. The
x-axis counts optimizer steps, with epoch boundaries marked: the article's loss plot
labels steps as epochs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..train.recording import ACCURACY_TARGET, PROBE_IMAGES, RunCurves
from .common import COLOR_WITH_BN, COLOR_WITHOUT_BN, mark_epochs, message_figure, new_figure, save_figure, smooth


@dataclass
class RunEffect:
    """The numbers the report states for one run."""

    label: str
    batch_norm: bool
    accuracy_after_epoch_1: float | None
    final_accuracy: float | None
    steps_to_target: int | None  # first probed step with test accuracy ≥ target; None: never (RunCurves.steps_to_reach)
    target: float
    total_steps: int
    train_seconds: float | None

    def to_json(self) -> dict:
        return asdict(self)


def training_effect(runs: list[RunCurves], *, target: float = ACCURACY_TARGET) -> list[RunEffect]:
    """Runs with BatchNorm first."""
    ordered = sorted(runs, key=lambda run: not run.batch_norm)
    return [RunEffect(
        label=run.label, batch_norm=run.batch_norm,
        accuracy_after_epoch_1=run.test_accuracy[0] if run.test_accuracy else None,
        final_accuracy=run.test_accuracy[-1] if run.test_accuracy else None,
        steps_to_target=run.steps_to_reach(target), target=target, total_steps=len(run.step_loss),
        train_seconds=run.train_seconds,
    ) for run in ordered]


def describe_effect(effects: list[RunEffect]) -> list[str]:
    """One plain sentence per run, for the figure and the report."""
    lines = []
    for effect in effects:
        first = "n/a" if effect.accuracy_after_epoch_1 is None else f"{effect.accuracy_after_epoch_1:.1%}"
        reach = (f"{effect.target:.0%} test accuracy after {effect.steps_to_target} steps" if effect.steps_to_target
                 else f"never {effect.target:.0%} in {effect.total_steps} steps")
        seconds = "" if effect.train_seconds is None else f", trained in {effect.train_seconds:.1f} s"
        lines.append(f"{effect.label}: {first} after epoch 1, {reach}{seconds}")
    return lines


def plot_training_curves(runs: list[RunCurves], path: str | Path, *, target: float = ACCURACY_TARGET) -> Path:
    """Per-step loss (raw and smoothed) and test accuracy, for each run; epoch boundaries marked."""
    title = "Training with and without BatchNorm" if len(runs) > 1 else "Training curve"
    if not runs or not runs[0].step_loss:
        return message_figure(path, title, "No training history to plot.")
    figure = new_figure(12, 5.2)
    effects = training_effect(runs, target=target)
    note = "" if len(runs) > 1 else "\n(no twin run without BatchNorm: train-and-export was run with --skip-no-bn)"
    figure.suptitle(f"{title}: same seed, data and hyperparameters{note}")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    steps_per_epoch = runs[0].epoch_end_step[0] if runs[0].epoch_end_step else len(runs[0].step_loss)
    window = max(5, steps_per_epoch // 4)
    for run in sorted(runs, key=lambda r: not r.batch_norm):
        color = COLOR_WITH_BN if run.batch_norm else COLOR_WITHOUT_BN
        steps = np.arange(1, len(run.step_loss) + 1)
        loss_axes.plot(steps, run.step_loss, color=color, alpha=0.25, linewidth=0.8, label=f"{run.label}, per step")
        loss_axes.plot(steps, smooth(run.step_loss, window), color=color, linewidth=2.0,
                       label=f"{run.label}, mean of last {window} steps")
        if run.accuracy_steps:
            accuracy_axes.plot(run.accuracy_steps, np.asarray(run.accuracy_probe) * 100, color=color, linewidth=1.0,
                               alpha=0.7, label=f"{run.label}, every {run.accuracy_steps[0]} steps "
                                                 f"({PROBE_IMAGES} test images)")
        accuracy_axes.plot(run.epoch_end_step, np.asarray(run.test_accuracy) * 100, "o", color=color, markersize=7,
                           label=f"{run.label}, end of each epoch")
    mark_epochs(loss_axes, runs[0].epoch_end_step)
    mark_epochs(accuracy_axes, runs[0].epoch_end_step)
    loss_axes.set_yscale("log")
    loss_axes.set_title("training loss (cross-entropy) per step")
    loss_axes.set_xlabel("optimizer step")
    loss_axes.set_ylabel("loss (log scale)")
    loss_axes.legend(loc="upper right")
    accuracy_axes.axhline(target * 100, color="black", linewidth=0.8, linestyle="--", label=f"{target:.0%} target")
    accuracy_axes.set_title("test accuracy")
    accuracy_axes.set_xlabel("optimizer step")
    accuracy_axes.set_ylabel("test accuracy (%)")
    low = min(min(run.test_accuracy + run.accuracy_probe, default=1.0) for run in runs) * 100
    accuracy_axes.set_ylim(max(0.0, min(low, target * 100) - 5), 100.5)
    accuracy_axes.legend(loc="lower right")
    figure.supxlabel("\n".join(describe_effect(effects)), fontsize=9)
    return save_figure(figure, path)
