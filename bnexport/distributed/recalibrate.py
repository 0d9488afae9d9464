"""Recalibrate a model: new BatchNorm running statistics, from a checkpoint's own training data or from a user's.

Statistics go stale after pruning, after fine-tuning with BN frozen, or when replicas
drifted apart; the weights are fine. For a checkpoint, this job reloads its model and data,
recomputes every BN layer's statistics exactly over N batches (``bn_statistics.recompute_running_stats``),
and writes a new checkpoint beside the old one, which it never overwrites unless asked. For a
model spec (``bnexport.model_spec``), it recomputes them over ``--data``, layer by layer in eval
mode (``bn_statistics.recompute_running_stats_layerwise``), and writes the model's state dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..artifacts import library_versions
from .bn_statistics import (Recalibration, batchnorm_layers, recompute_running_stats, recompute_running_stats_layerwise,
                            training_batches)
from ..config import DEFAULT_SEED, TrainConfig
from ..data import epoch_order
from ..errors import BnexportError, first_line
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
    accuracy_before: float | None = None  # a checkpoint's test accuracy; a model spec's data has no labels
    accuracy_after: float | None = None
    data: str | None = None  # where a model spec's samples came from

    def to_json(self) -> dict:
        result = {"source": self.source, "output": self.output}
        if self.data is not None:
            result["data"] = self.data
        result.update(self.recalibration.to_json())
        if self.accuracy_before is not None:
            result.update(test_accuracy_before=self.accuracy_before, test_accuracy_after=self.accuracy_after)
        return result

    def table(self) -> str:
        rows = [("BatchNorm layer", "values/channel", "max mean change (std)", "max var change", "momentum=None avg error")]
        for name, layer in self.recalibration.layers.items():
            rows.append((name, f"{layer.values_per_channel:,}", f"{layer.mean_change_in_std:.3g}",
                         f"{layer.var_change_relative:.2%}", f"{layer.cumulative_average_var_error:.2e}"))
        if self.data is not None:
            return (format_table(rows) + f"\n{self.data} in {self.recalibration.batches} batches; each BatchNorm has its "
                    "input's exact statistics at inference (eval mode, layer by layer)")
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
    _check_output(output, "checkpoint")
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


def _check_output(output: Path, what: str) -> None:
    if output.is_dir():
        raise BnexportError(f"-o {output}: is a folder; name the new {what} file")
    if not output.parent.is_dir():
        raise BnexportError(f"-o {output}: folder {output.parent} does not exist")


def recalibrate_model(spec: str, data: str | Path | None, output: str | Path | None = None, *,
                      weights: str | Path | None = None, input_shapes=None, batches: int | None = None,
                      batch_size: int | None = None, in_place: bool = False, seed: int = DEFAULT_SEED) -> RecalibrationResult:
    """Recompute the BatchNorm statistics of the model ``spec`` names over every sample of ``data``,
    and write the model's state dict (``torch.save`` of a dict of tensors) to ``output``.

    The model is filled from ``weights`` (else seeded with ``seed``), and its inputs are shaped by
    ``input_shapes``, else by the samples of an .npy/.npz file, else by what the model says it
    takes. ``data`` is read with ``bnexport.data.load_samples``, in its own order, in batches of
    ``batch_size`` (the first ``batches`` of them, when given); the statistics are the same for any
    batch size (``recompute_running_stats_layerwise``). ``output`` is required and is never the
    ``weights`` file, unless ``in_place`` asks to replace that file (a plain state dict) itself.
    The file reads back with ``torch.load(weights_only=True)`` and as ``--weights`` of any command.
    """
    from ..data import array_shapes, load_samples
    from ..model_spec import load_model, resolve_shapes, run_checked
    from ..train.loop import save_payload

    output = _spec_output(spec, None if output is None else Path(output), weights=weights, in_place=in_place)
    if data is None:
        raise BnexportError(f"--data: {spec} is a model spec; give the samples to recalibrate it over "
                            "(a folder of images in class folders, or an .npy/.npz file)")
    loaded = load_model(spec, weights=weights, seed=seed)
    model = loaded.module
    if not batchnorm_layers(model):
        raise BnexportError(f"{spec}: the model has no BatchNorm layers to recalibrate")
    given = input_shapes if input_shapes is not None else array_shapes(data, loaded.input_names)
    shapes = resolve_shapes(loaded, given)
    batch_size = batch_size or TrainConfig().batch_size
    samples = load_samples(shapes, data, limit=None if batches is None else batches * batch_size)
    split = sample_batches(samples.inputs, batch_size)
    first = split[0]
    run_checked(model, first, shapes={name: tuple(t.shape) for name, t in zip(shapes, first)}, spec=spec)
    try:
        report = recompute_running_stats_layerwise(model, split)
    except (RuntimeError, ValueError) as err:
        raise BnexportError(f"{spec}: recomputing BatchNorm statistics over --data {data} failed: {first_line(err)}") from None
    model.eval()
    state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    save_payload(state, output)
    return RecalibrationResult(spec, str(output), report, data=samples.description)


def _spec_output(spec: str, output: Path | None, *, weights, in_place: bool) -> Path:
    """Where a model spec's new state dict goes, after refusing what would lose or clobber a file."""
    weights = None if weights is None else Path(weights)
    if in_place:
        if weights is None:
            raise BnexportError(f"--in-place: {spec} is a model spec with no --weights file to replace; name the new "
                                "state dict with -o")
        if output is not None and output.resolve() != weights.resolve():
            raise BnexportError("--in-place writes over --weights; drop -o or --in-place")
        _check_plain_state_dict(weights)
        return weights
    if output is None:
        raise BnexportError(f"-o OUT.pt is required for a model spec ({spec}): the file to write its state dict to")
    if weights is not None and output.resolve() == weights.resolve():
        raise BnexportError(f"-o {output}: that is the --weights file; name another file, or pass --in-place to replace it")
    _check_output(output, "state dict")
    return output


def _check_plain_state_dict(weights: Path) -> None:
    """--in-place replaces the file with a plain state dict: refuse a file that holds more (an optimizer, an epoch)."""
    import torch

    if not weights.is_file():
        raise BnexportError(f"--weights {weights}: file not found")
    try:
        payload = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:
        raise BnexportError(f"--weights {weights}: torch.load(weights_only=True) cannot read it ({first_line(err)})") from None
    if not (isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values())):
        raise BnexportError(f"--in-place: {weights} holds more than a state dict, which --in-place would lose; "
                            "write the new state dict with -o")


def sample_batches(inputs: tuple, batch_size: int) -> list[tuple]:
    """``inputs`` (one tensor per model input) cut into batches of ``batch_size`` samples, in order."""
    return [tuple(tensor[start:start + batch_size] for tensor in inputs) for start in range(0, len(inputs[0]), batch_size)]
