"""What the fold, parity and bench commands accept: an ONNX file or a bnexport checkpoint.

A checkpoint is a zip archive (``torch.save``) not named ``.onnx``; anything else is read as ONNX. Either way
the caller gets the model, and for a checkpoint the input shape a check should feed it. An ONNX file
never loads torch.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import BnexportError
from .fold import load_onnx, model_input_shape


@dataclass
class Source:
    """A model named on the command line."""

    path: Path
    onnx_model: object | None = None  # an onnx.ModelProto, for an ONNX file
    module: object | None = None  # a torch.nn.Module in eval mode, for a checkpoint
    input_shape: tuple[int, ...] | None = None  # batch 1 for a checkpoint; for ONNX, the one input's when asked for

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
    ``bnexport.inputs.input_feeds`` instead.
    """
    path = Path(path)
    if not path.exists():
        raise BnexportError(f"{path}: file not found")
    if path.is_dir():
        raise BnexportError(f"{path}: is a folder, not a model file")
    if is_checkpoint(path):
        from .train import load_checkpoint, model_from_checkpoint

        module, spec = model_from_checkpoint(load_checkpoint(path), path=path)
        return Source(path, module=module, input_shape=(1, *spec.input_shape))
    model = load_onnx(path)
    shape = None
    if needs_input_shape:
        try:
            shape = model_input_shape(model, input_shape)
        except BnexportError as err:
            flag = "--input-shape: " if input_shape is not None else ""
            raise BnexportError(f"{path}: {flag}{err}") from None
    return Source(path, onnx_model=model, input_shape=shape)
