"""What the fold, parity and bench commands accept: an ONNX file or a bnexport checkpoint.

A checkpoint is a zip archive (``torch.save``) not named ``.onnx``; anything else is read as ONNX. Either way
the caller gets the model, and for a checkpoint the input shape a check should feed it. An ONNX file
never loads torch.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..config import INPUT_NAME, MACHINE_EPSILON
from ..errors import BnexportError
from ..fold.onnx_file import model_input_shape, read_onnx
from .inputs import Feed, input_feeds, model_float_dtype


@dataclass
class Source:
    """A model named on the command line."""

    path: Path
    onnx_model: object | None = None  # an onnx.ModelProto, for an ONNX file
    module: object | None = None  # a torch.nn.Module in eval mode, for a checkpoint
    input_shape: tuple[int, ...] | None = None  # batch 1 for a checkpoint; for ONNX, the one input's when asked for
    external_data: bool = False  # the ONNX file keeps tensors in external data files

    @property
    def kind(self) -> str:
        return "onnx" if self.onnx_model is not None else "checkpoint"


def is_checkpoint(path: str | Path) -> bool:
    """A zip archive not named .onnx (weight bytes of an ONNX file could, rarely, look like a zip's end)."""
    path = Path(path)
    return path.suffix.lower() != ".onnx" and path.is_file() and zipfile.is_zipfile(path)


def load_source(path: str | Path, *, needs_input_shape: bool = True, input_shape: tuple[int, ...] | None = None) -> Source:
    """Read an ONNX file or a bnexport checkpoint; a one-line ``BnexportError`` when it is neither.

    ``needs_input_shape`` resolves an ONNX model's one input shape (``input_shape`` checked against
    it, or its own with dynamic dims guessed); models with several inputs resolve theirs with
    ``bnexport.parity.inputs.input_feeds`` instead.
    """
    path = Path(path)
    if not path.exists():
        raise BnexportError(f"{path}: file not found")
    if path.is_dir():
        raise BnexportError(f"{path}: is a folder, not a model file")
    if is_checkpoint(path):
        from ..train.loop import load_checkpoint, model_from_checkpoint

        module, spec = model_from_checkpoint(load_checkpoint(path), path=path)
        return Source(path, module=module, input_shape=(1, *spec.input_shape))
    model, external_data = read_onnx(path)
    shape = None
    if needs_input_shape:
        try:
            shape = model_input_shape(model, input_shape)
        except BnexportError as err:
            flag = "--input-shape: " if input_shape is not None else ""
            raise BnexportError(f"{path}: {flag}{err}") from None
    return Source(path, onnx_model=model, input_shape=shape, external_data=external_data)


def coarsest_dtype(*sources: Source) -> str:
    """The float dtype whose rounding bounds a comparison of these models: the coarsest of theirs
    (a checkpoint computes in float32)."""
    dtypes = [model_float_dtype(s.onnx_model) if s.kind == "onnx" else "float32" for s in sources]
    return max(dtypes, key=MACHINE_EPSILON.__getitem__)


def parity_feeds(reference: Source, candidate: Source, shapes=None) -> list[Feed]:
    """What a comparison of two models feeds them: the inputs of the first ONNX model of the two,
    with ``shapes`` (as ``input_feeds`` takes them) or its own; a checkpoint alone takes its one
    image batch. Without ``shapes``, two ONNX models must resolve to the same input shapes, and a
    checkpoint's shape replaces the guess for an ONNX model's one dynamic input."""
    onnx_sources = [s for s in (reference, candidate) if s.kind == "onnx"]
    if not onnx_sources:
        return [Feed(INPUT_NAME, "float32", tuple(single_shape(reference.path, shapes) or reference.input_shape))]
    first = onnx_sources[0]
    try:
        feeds = input_feeds(first.onnx_model, shapes)
    except BnexportError as err:
        raise BnexportError(f"{first.path}: {'--input-shape ' if shapes is not None else ''}{err}") from None
    if shapes is not None:
        return feeds
    if len(onnx_sources) == 1:
        checkpoint = candidate if first is reference else reference
        if len(feeds) == 1 and feeds[0].guessed:  # the checkpoint knows the shape its model takes
            feeds = [Feed(feeds[0].name, feeds[0].dtype, tuple(checkpoint.input_shape))]
        return feeds
    other = [list(f.shape) for f in input_feeds(candidate.onnx_model)]
    if other != [list(f.shape) for f in feeds]:
        raise BnexportError(f"{candidate.path}: input shapes {other} differ from {reference.path}'s "
                            f"{[list(f.shape) for f in feeds]}; pass --input-shape if both accept one")
    return feeds


def single_shape(path: Path, shapes) -> tuple[int, ...] | None:
    """The one shape of a one-input model (a checkpoint's): a bare shape, or one NAME=shape whatever the name."""
    if shapes is None or isinstance(shapes, tuple):
        return shapes
    if len(shapes) != 1:
        raise BnexportError(f"{path}: --input-shape: the model takes one input, not {len(shapes)}")
    return next(iter(shapes.values()))
