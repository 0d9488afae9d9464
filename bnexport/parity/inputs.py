"""What a check feeds an ONNX model: every graph input, with its own dtype and a concrete shape.

A graph input is an entry of ``graph.input`` that is not an initializer. Its shape is the one
the caller gives, or the model's own, with each dynamic dim (``-1``, symbolic or missing) set
to a size a real input would have: batch 1, an image's height and width 224, a sequence 128
(``guessed_dim`` has the rule). On 1×1 images a 3×3 conv sees its padding almost alone and a
strided net shrinks to nothing, so such a check says little; a guess is never 1 where a real
input is larger, and the command that guessed says so.

Values come from one seed, per input index: input ``i`` always gets
``default_rng([seed, i])``'s draw, whatever the other inputs are. Floats are standard normal in the
input's dtype (bfloat16 through ``ml_dtypes``, which onnx depends on); integers are 0..9, so an
index-like input stays in range; bools are fair coin flips.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from ..config import (DEFAULT_SEED, GUESSED_BATCH, GUESSED_CHANNELS, GUESSED_CLIP_FRAMES, GUESSED_CLIP_SIDE,
                      GUESSED_IMAGE_SIDE, GUESSED_LENGTH, MACHINE_EPSILON)
from ..errors import BnexportError

Shape = tuple[int, ...]
Dim = int | str | None  # fixed size, name of a dynamic dim, or an unnamed dynamic dim

INTEGER_VALUES = 10  # integer inputs draw from 0..9


@dataclass(frozen=True)
class InputSpec:
    """A graph input as the model declares it."""

    name: str
    dtype: str  # numpy's name: "float32", "float16", "bfloat16", "int64", "bool", ...
    dims: tuple[Dim, ...] | None  # None when the model declares no shape at all


@dataclass(frozen=True)
class Feed:
    """What a check feeds one input: its dtype and the shape used."""

    name: str
    dtype: str
    shape: Shape
    guessed: tuple[int, ...] = ()  # the axes whose size bnexport chose because the model left them dynamic

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "guessed_dims": list(self.guessed)}


def dtype_name(elem_type: int) -> str:
    """numpy's name of an ONNX element type; float32 when the model leaves it unset."""
    if not elem_type:
        return "float32"
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name


def numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":  # numpy has no bfloat16; ml_dtypes adds it
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs a caller must feed, in the graph's order."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        kind = value.type.WhichOneof("value")
        if kind not in (None, "tensor_type"):
            raise BnexportError(f"input {value.name!r} is a {kind.replace('_type', '')}, not a tensor: "
                                "bnexport can only feed tensors")
        tensor = value.type.tensor_type
        dims = None
        if tensor.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
                         for d in tensor.shape.dim)
        specs.append(InputSpec(value.name, dtype_name(tensor.elem_type), dims))
    return specs


def guessed_dim(rank: int, axis: int, dims: tuple[Dim, ...]) -> int:
    """The size a check uses for a dynamic dim, from the input's rank and where the dim sits.

    Axis 0 of a batched input (rank >= 2) is the batch: 1. A 4-D input is an image, NCHW, or NHWC
    when its last dim is fixed at 4 or less while axis 1 is dynamic: channels 3, height and width
    224. A 5-D input is a clip: channels 3, 16 frames of 112×112. Anything else (a sequence's
    length, a feature count, a 1-D input) gets 128.
    """
    if axis == 0 and rank >= 2:
        return GUESSED_BATCH
    if rank == 4:
        channels_last = isinstance(dims[3], int) and dims[3] <= 4 and not isinstance(dims[1], int)
        spatial, channel = ((1, 2), 3) if channels_last else ((2, 3), 1)
        return GUESSED_IMAGE_SIDE if axis in spatial else GUESSED_CHANNELS if axis == channel else GUESSED_LENGTH
    if rank == 5:
        return {1: GUESSED_CHANNELS, 2: GUESSED_CLIP_FRAMES}.get(axis, GUESSED_CLIP_SIDE)
    return GUESSED_LENGTH


def input_feeds(model: onnx.ModelProto, shapes: Mapping[str, Shape] | Shape | None = None) -> list[Feed]:
    """The shape and dtype a check feeds each graph input.

    ``shapes`` names the shape of some or all inputs; a bare tuple is the shape of a model's
    only input. An input left out takes the model's shape, each dynamic dim guessed by
    ``guessed_dim``; a dynamic dim whose name (``dim_param``) an earlier input already fixed
    takes that size, so inputs that share a named dim stay consistent. When some shapes are given,
    every input left out must be fixed by the model or by those shared names. Raises a one-line
    ``BnexportError`` for a name the model lacks, a wrong rank, a non-positive dim, a size the
    model fixes otherwise, or an input of several whose shape is dynamic and not given.
    """
    specs = input_specs(model)
    names = [s.name for s in specs]
    given = _given_by_name(shapes, names)
    sizes: dict[str, int] = {}  # dim_param → size, from the given shapes first
    for spec in specs:
        if spec.name in given:
            _check_given(spec, given[spec.name])
            for dim, size in zip(spec.dims or (), given[spec.name]):
                if isinstance(dim, str):
                    sizes.setdefault(dim, size)
    feeds = []
    for spec in specs:
        if spec.name in given:
            feeds.append(Feed(spec.name, spec.dtype, tuple(given[spec.name])))
            continue
        if spec.dims is None:
            raise BnexportError(f"input {spec.name!r} declares no shape; pass --input-shape {spec.name}=DIMS")
        unknown = [dim for dim in spec.dims if not isinstance(dim, int) and dim not in sizes]
        if unknown and len(specs) > 1 and given:
            raise BnexportError(f"input {spec.name!r} has dynamic shape {_dims_text(spec.dims)} and no --input-shape "
                                f"{spec.name}=DIMS; with several inputs, give each one whose dims the others do not fix")
        shape, guessed = [], []
        for axis, dim in enumerate(spec.dims):
            if isinstance(dim, int):
                shape.append(dim)
            elif isinstance(dim, str) and dim in sizes:
                shape.append(sizes[dim])
            else:
                size = guessed_dim(len(spec.dims), axis, spec.dims)
                if isinstance(dim, str):
                    sizes[dim] = size
                shape.append(size)
                guessed.append(axis)
        feeds.append(Feed(spec.name, spec.dtype, tuple(shape), tuple(guessed)))
    return feeds


def _given_by_name(shapes, names: list[str]) -> dict[str, Shape]:
    if shapes is None:
        return {}
    if not isinstance(shapes, Mapping):
        if len(names) != 1:
            listed = ", ".join(names) if names else "none"
            raise BnexportError(f"{_shape_text(shapes)} names no input, and the model has {len(names)} ({listed}): "
                                "give each as NAME=DIMS")
        return {names[0]: tuple(shapes)}
    unknown = [name for name in shapes if name not in names]
    if unknown:
        raise BnexportError(f"the model has no input {unknown[0]!r} (its inputs: {', '.join(names) or 'none'})")
    return {name: tuple(shape) for name, shape in shapes.items()}


def _check_given(spec: InputSpec, shape: Shape) -> None:
    where = f"{spec.name}={_shape_text(shape)}"
    if any(not isinstance(size, (int, np.integer)) or size < 1 for size in shape):
        raise BnexportError(f"{where}: every dim must be a positive integer")
    if spec.dims is None:
        return
    if len(shape) != len(spec.dims):
        raise BnexportError(f"{where}: rank {len(shape)}, but the model's input {spec.name!r} has rank "
                            f"{len(spec.dims)} {_dims_text(spec.dims)}")
    for axis, (dim, size) in enumerate(zip(spec.dims, shape)):
        if isinstance(dim, int) and dim != size:
            raise BnexportError(f"{where}: dim {axis} is {size}, but the model fixes it at {dim} {_dims_text(spec.dims)}")


def _shape_text(shape) -> str:
    return ",".join(map(str, shape))


def _dims_text(dims: tuple[Dim, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def seeded_value(shape: Shape, dtype: str, *, seed: int = DEFAULT_SEED, index: int = 0) -> np.ndarray:
    """Input ``index``'s value: the same for the same (seed, index, shape, dtype), whatever else is fed."""
    rng = np.random.default_rng([seed, index])
    target = numpy_dtype(dtype)
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if dtype == "bfloat16" or np.issubdtype(target, np.floating):
        return rng.standard_normal(shape).astype(target)
    if np.issubdtype(target, np.integer):
        return rng.integers(0, INTEGER_VALUES, shape).astype(target)
    raise BnexportError(f"bnexport cannot make {dtype} input values")


def seeded_feeds(feeds: list[Feed], *, seed: int = DEFAULT_SEED) -> dict[str, np.ndarray]:
    """A seeded value for every feed, seeded by the input's index."""
    values = {}
    for index, feed in enumerate(feeds):
        try:
            values[feed.name] = seeded_value(feed.shape, feed.dtype, seed=seed, index=index)
        except BnexportError as err:
            raise BnexportError(f"input {feed.name!r}: {err}") from None
    return values


def model_float_dtype(model: onnx.ModelProto) -> str:
    """The coarsest floating dtype among the model's inputs, outputs and initializers: the one whose
    rounding decides how far a folded model may drift. float32 when it has none."""
    graph = model.graph
    elem_types = [t.data_type for t in graph.initializer]
    elem_types += [v.type.tensor_type.elem_type for v in (*graph.input, *graph.output) if v.type.HasField("tensor_type")]
    floats = {dtype_name(t) for t in elem_types if t} & set(MACHINE_EPSILON)
    return max(floats, key=MACHINE_EPSILON.__getitem__, default="float32")
