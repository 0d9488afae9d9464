"""Recalibrate a checkpoint: new BatchNorm running statistics from its own training data.

Statistics go stale after pruning, after fine-tuning with BN frozen, or when replicas
drifted apart; the weights are fine. This job reloads the checkpoint's model and data,
recomputes every BN layer's statistics exactly over N batches (``bn_statistics.recompute_running_stats``),
and writes a new checkpoint beside the old one, which it never overwrites unless asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..artifacts import library_versions
from .bn_statistics import Recalibration, batchnorm_layers, recompute_running_stats, training_batches
from ..data import epoch_order
from ..errors import BnexportError
from ..tables import format_table
from ..train.loop import evaluate, reopen_checkpoint, save_payload


def default_output(checkpoint: Path) -> Path:
    """``run/checkpoint.pt`` → ``run/checkpoint.recalibrated.pt``."""
    return checkpoint.with_name(f"{checkpoint.stem}.recalibrated{checkpoint.suffix or '.pt'}")


@dataclass
class RecalibrationResult:
    source: str
    output: str
    recalibration: Recalibration
    accuracy_before: float
    accuracy_after: float

    def to_json(self) -> dict:
        return {"source": self.source, "output": self.output, **self.recalibration.to_json(),
                "test_accuracy_before": self.accuracy_before, "test_accuracy_after": self.accuracy_after}

    def table(self) -> str:
        rows = [("BatchNorm layer", "values/channel", "max mean change (std)", "max var change", "momentum=None avg error")]
        for name, layer in self.recalibration.layers.items():
            rows.append((name, f"{layer.values_per_channel:,}", f"{layer.mean_change_in_std:.3g}",
                         f"{layer.var_change_relative:.2%}", f"{layer.cumulative_average_var_error:.2e}"))
        return (format_table(rows) + f"\n{self.recalibration.samples} training samples in {self.recalibration.batches} batches; "
                f"test accuracy {self.accuracy_before:.2%} before, {self.accuracy_after:.2%} after")


def recalibrate_checkpoint(checkpoint: str | Path, output: str | Path | None = None, *, batches: int | None = None,
                           batch_size: int | None = None, in_place: bool = False) -> RecalibrationResult:
    """Write ``output`` (default: beside the input) with exactly recomputed BN statistics.

    The batches come from the checkpoint's own training data, in its seeded order and
    without augmentation; ``batches=None`` means the whole training set.
    """
    checkpoint = Path(checkpoint)
    output = Path(output) if output is not None else (checkpoint if in_place else default_output(checkpoint))
    if output.resolve() == checkpoint.resolve() and not in_place:
        raise BnexportError(f"-o {output}: that is the input checkpoint; pass --in-place to overwrite it")
    if output.is_dir():
        raise BnexportError(f"-o {output}: is a folder; name the new checkpoint file")
    if not output.parent.is_dir():
        raise BnexportError(f"-o {output}: folder {output.parent} does not exist")
    run = reopen_checkpoint(checkpoint)
    payload, model, config, dataset = run.payload, run.model, run.config, run.dataset
    if not batchnorm_layers(model):
        raise BnexportError(f"{checkpoint}: the model has no BatchNorm layers to recalibrate")
    accuracy_before = evaluate(model, dataset.test_images, dataset.test_labels)
    images = dataset.train_images
    order = epoch_order(len(images), seed=config.seed, epoch=0)
    report = recompute_running_stats(model, training_batches(images, order, batch_size=batch_size or config.batch_size,
                                                 max_batches=batches))
    model.eval()
    accuracy_after = evaluate(model, dataset.test_images, dataset.test_labels)
    result = RecalibrationResult(str(checkpoint), str(output), report, accuracy_before, accuracy_after)
    new_payload = {**payload, "state_dict": model.state_dict(), "versions": library_versions(),
                   "bn_recalibration": result.to_json()}
    save_payload(new_payload, output)
    return result
