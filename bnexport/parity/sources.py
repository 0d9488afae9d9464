"""What the fold, parity and bench commands accept: an ONNX file, a bnexport checkpoint or a model spec.

A checkpoint is a zip archive (``torch.save``) not named ``.onnx``. A model spec names no file: it is
``torchvision:NAME``, ``timm:NAME``, ``package.module:callable`` or ``path/to/file.py:callable``
(``bnexport.model_spec``), filled from ``--weights`` or seeded. Anything else is read as ONNX. Either
way the caller gets the model, and for a torch module the inputs it takes. An ONNX file never loads
torch, and neither does a missing file without a colon in its name.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..config import DEFAULT_SEED, INPUT_NAME, MACHINE_EPSILON, SPEC_FORMS
from ..errors import BnexportError
from ..fold.onnx_file import model_input_shape, read_onnx
from .inputs import Feed, input_feeds, model_float_dtype


@dataclass
class Source:
    """A model named on the command line."""

    path: Path  # for a model spec, its text as a path: ``name`` is the text itself
    onnx_model: object | None = None  # an onnx.ModelProto, for an ONNX file
    module: object | None = None  # a torch.nn.Module in eval mode, for a checkpoint or a model spec
    input_shape: tuple[int, ...] | None = None  # batch 1 for a checkpoint; for ONNX, the one input's when asked for
    external_data: bool = False  # the ONNX file keeps tensors in external data files
    loaded: object | None = None  # the bnexport.model_spec.LoadedModel of a model spec
    spec: str | None = None  # the model spec as given

    @property
    def kind(self) -> str:
        if self.onnx_model is not None:
            return "onnx"
        return "spec" if self.loaded is not None else "checkpoint"

    @property
    def name(self) -> str:
        """What the user typed: the model spec, or the file's path."""
        return self.spec if self.spec is not None else str(self.path)

    @property
    def input_names(self) -> tuple[str, ...]:
        """A torch module's inputs, in the order forward takes them; a checkpoint's one image input."""
        return tuple(self.loaded.input_names) if self.loaded is not None else (INPUT_NAME,)

    def default_shapes(self) -> list[tuple[int, ...]]:
        """The shapes a torch module says it takes, by position: a checkpoint's, a timm model's; [] when unknown."""
        if self.kind == "checkpoint":
            return [tuple(self.input_shape)]
        if self.kind == "spec" and self.loaded.default_shapes:
            return [tuple(shape) for shape in self.loaded.default_shapes.values()]
        return []


def is_checkpoint(path: str | Path) -> bool:
    """A zip archive not named .onnx (weight bytes of an ONNX file could, rarely, look like a zip's end)."""
    path = Path(path)
    return path.suffix.lower() != ".onnx" and path.is_file() and zipfile.is_zipfile(path)


def names_a_spec(text: str | Path) -> bool:
    """Text that names no file and has a colon: a model spec, or a mistyped one (``load_source`` tells which)."""
    return ":" in str(text) and not Path(text).exists()


def load_source(path: str | Path, *, needs_input_shape: bool = True, input_shape: tuple[int, ...] | None = None,
                weights: str | Path | None = None, seed: int = DEFAULT_SEED) -> Source:
    """Read an ONNX file, a bnexport checkpoint or a model spec; a one-line ``BnexportError`` when it is none.

    ``needs_input_shape`` resolves an ONNX model's one input shape (``input_shape`` checked against
    it, or its own with dynamic dims guessed); models with several inputs resolve theirs with
    ``bnexport.parity.inputs.input_feeds`` instead, and torch modules with ``module_feeds``.
    ``weights`` (a state dict file) fills a model spec's model, which is otherwise seeded with ``seed``;
    it is an error for a file, which holds its own weights.
    """
    text = str(path)
    path = Path(path)
    if not path.exists():
        if ":" in text:
            return _spec_source(text, weights=weights, seed=seed)
        raise BnexportError(f"{path}: file not found")
    if path.is_dir():
        raise BnexportError(f"{path}: is a folder, not a model file")
    checkpoint = is_checkpoint(path)
    if weights is not None:
        what = "a bnexport checkpoint" if checkpoint else "an ONNX file"
        raise BnexportError(f"--weights {weights}: {path} is {what}, with weights of its own; --weights fills the model "
                            "of a model spec, such as torchvision:NAME or path/to/file.py:callable")
    if checkpoint:
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


def _spec_source(text: str, *, weights, seed: int) -> Source:
    from ..model_spec import load_model, looks_like_spec

    if not looks_like_spec(text):
        forms = SPEC_FORMS.replace(" or a bnexport checkpoint", "")
        raise BnexportError(f"{text}: file not found, and not a model spec ({forms})")
    loaded = load_model(text, weights=weights, seed=seed)
    return Source(Path(text), module=loaded.module, loaded=loaded, spec=text)


def module_feeds(source: Source, shapes=None) -> list[Feed]:
    """What a torch module (a checkpoint's or a model spec's) is fed: float32 inputs of ``shapes``
    (a bare shape for a one-input model, or shapes by input name), else of what the model says it takes."""
    if source.kind == "checkpoint":
        return [Feed(INPUT_NAME, "float32", tuple(single_shape(source.path, shapes) or source.input_shape))]
    from ..model_spec import resolve_shapes

    return [Feed(name, "float32", tuple(shape)) for name, shape in resolve_shapes(source.loaded, shapes).items()]


def coarsest_dtype(*sources: Source) -> str:
    """The float dtype whose rounding bounds a comparison of these models: the coarsest of theirs
    (a torch module computes in float32)."""
    dtypes = [model_float_dtype(s.onnx_model) if s.kind == "onnx" else "float32" for s in sources]
    return max(dtypes, key=MACHINE_EPSILON.__getitem__)


def parity_feeds(reference: Source, candidate: Source, shapes=None) -> list[Feed]:
    """What a comparison of two models feeds them: the inputs of the first ONNX model of the two,
    with ``shapes`` (as ``input_feeds`` takes them) or its own; two torch modules take the
    reference's (``module_feeds``). Without ``shapes``, two ONNX models must resolve to the same
    input shapes, and the shapes a torch module says it takes (a checkpoint's, a timm model's)
    replace the guesses for an ONNX model's dynamic inputs."""
    onnx_sources = [s for s in (reference, candidate) if s.kind == "onnx"]
    if not onnx_sources:
        return module_feeds(reference, shapes)
    first = onnx_sources[0]
    try:
        feeds = input_feeds(first.onnx_model, shapes)
    except BnexportError as err:
        raise BnexportError(f"{first.path}: {'--input-shape ' if shapes is not None else ''}{err}") from None
    if len(onnx_sources) == 1:
        module = candidate if first is reference else reference
        names = module.input_names
        if len(feeds) < len(names):
            raise BnexportError(f"{first.path} takes {len(feeds)} input(s) ({', '.join(f.name for f in feeds)}), "
                                f"{module.name} takes {len(names)} ({', '.join(names)})")
        if shapes is None:
            known = module.default_shapes()
            feeds = [Feed(f.name, f.dtype, known[i]) if f.guessed and i < len(known) and len(known[i]) == len(f.shape)
                     else f for i, f in enumerate(feeds)]
        return feeds
    if shapes is not None:
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
