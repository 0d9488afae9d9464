"""``fold_onnx`` and the reading of ONNX files: fold every exact BatchNormalization of a graph.

Nothing here imports torch: folding, inspecting and checking an ONNX file needs only onnx,
numpy and ONNX Runtime.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from ..config import DEFAULT_SEED, Tolerance, tolerance_for
from ..errors import BnexportError, first_line
from .checks import raise_check_failed
from .onnx_patterns import fold_graph
from .onnx_valid import ensure_valid, structure_of
from .fold_report import FoldReport


def load_onnx(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    """The model itself, or the file read with its external data; a one-line ``BnexportError`` otherwise."""
    if isinstance(model, onnx.ModelProto):
        return model
    return read_onnx(model)[0]


def read_onnx(path: str | Path) -> tuple[onnx.ModelProto, bool]:
    """(the model, whether the file keeps tensors in external data files), read once."""
    path = Path(path)
    if not path.is_file():
        raise BnexportError(f"{path}: file not found")
    try:
        loaded = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and onnx's own errors
        raise BnexportError(f"{path}: not a readable ONNX model ({first_line(err)})") from None
    if not loaded.graph.node and not loaded.graph.output:  # protobuf parses many non-ONNX files as an empty message
        raise BnexportError(f"{path}: not an ONNX model (no graph)")
    external = uses_external_data(loaded)
    if external:
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(loaded, str(path.parent))
        except Exception as err:  # OSError, or onnx's ValidationError for a path that is not a file
            raise BnexportError(f"{path}: external data missing or unreadable ({first_line(err)})") from None
    # A truncated file can still parse: the checker catches what is missing, and the stored sizes
    # catch a cut weight. The checker sees the model's structure, its large weights declared by
    # shape, so that it does not copy every weight to check it.
    problem = stored_size_problem(loaded)
    if problem is None:
        try:
            onnx.checker.check_model(structure_of(loaded))
        except Exception as err:
            problem = first_line(err)
    if problem is not None:
        raise BnexportError(f"{path}: not a valid ONNX model ({problem})")
    return loaded, external


# dtypes stored one whole number of bytes per element, whose raw_data length follows from dims
_BYTE_SIZED = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE,
               onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
               onnx.TensorProto.INT32, onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64,
               onnx.TensorProto.BOOL}


def stored_size_problem(model: onnx.ModelProto) -> str | None:
    """Which main-graph initializer holds fewer or more bytes than its shape needs, or None."""
    for tensor in model.graph.initializer:
        if tensor.data_type not in _BYTE_SIZED or not tensor.raw_data:
            continue
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        expected = int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
        if len(tensor.raw_data) != expected:
            return f"initializer '{tensor.name}' holds {len(tensor.raw_data)} bytes, its shape needs {expected}"
    return None


def uses_external_data(model: onnx.ModelProto | str | Path) -> bool:
    """Whether the model, or the file as stored, keeps tensors in external data files."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def fold_onnx(
    model: onnx.ModelProto | str | Path,
    *,
    check: bool = True,
    input_shapes: Mapping[str, tuple[int, ...]] | tuple[int, ...] | None = None,
    seed: int = DEFAULT_SEED,
    tolerance: Tolerance | None = None,
    stored_at: str | Path | None = None,
    fold_overridable: bool = False,
) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold every BatchNormalization of an ONNX model that folds exactly.

    With ``check`` the result must pass ``onnx.checker`` (full check), and both graphs run in
    ONNX Runtime, graph optimisations off, on seeded values for every graph input, each of its
    own dtype. ``input_shapes`` maps input names to shapes (a bare tuple is the shape of a
    model's only input); inputs left out take the model's shape with dynamic dims guessed as
    ``bnexport.parity.inputs.guessed_dim`` says. ``tolerance``
    None follows the model's dtype (``bnexport.config.tolerance_for``). ``report.parity`` holds
    the result, with the shape and dtype of every input fed. ``stored_at`` names the file a
    ModelProto was read from, so that ONNX Runtime reads the reference from disk rather than
    from a re-serialised copy (a model given as a path is its own). Whether checked or not,
    the result passes ``onnx.checker`` and loads in ONNX Runtime (``onnx_valid``), or a
    ``BnexportError`` says why not. ``fold_overridable`` folds BNs whose parameters are
    initializers that are also graph inputs (IR >= 4), which are otherwise kept.
    """
    original = load_onnx(model)
    try:
        folded, report = fold_graph(original, fold_overridable=fold_overridable)
        ensure_valid(original, folded, report)  # with or without the check: never hand back a model that cannot load
    except BnexportError as err:
        if isinstance(model, (str, Path)):
            raise BnexportError(f"{model}: {err}") from None
        raise
    if check and report.folded:
        stored_at = Path(model) if isinstance(model, (str, Path)) else stored_at
        _check_onnx(original, folded, report, input_shapes, seed=seed, tolerance=tolerance, stored_at=stored_at)
    return folded, report


def _check_onnx(original, folded, report: FoldReport, shapes, *, seed: int, tolerance: Tolerance | None,
                stored_at: Path | None) -> None:
    from ..parity.inputs import input_feeds, model_float_dtype, seeded_feeds
    from ..parity.compare import run_parity
    from ..parity.divergence import onnx_drilldown
    from ..parity.runners import onnxruntime_runner

    feeds = input_feeds(original, shapes)
    values = seeded_feeds(feeds, seed=seed)
    if tolerance is None:
        tolerance = tolerance_for(model_float_dtype(original))
    # serialised once, for both the checker and ONNX Runtime: on a large model each copy costs as much as the fold
    data = folded.SerializeToString()
    # every rewrite must leave a valid model; a failure here is a bug, so it is not caught
    onnx.checker.check_model(data, full_check=True)
    reference = onnxruntime_runner(stored_at if stored_at is not None else original.SerializeToString())
    parity = run_parity(reference, {"folded": onnxruntime_runner(data)}, values, reference_name="unfolded", seed=seed,
                        tolerance=tolerance, described=[feed.to_json() for feed in feeds])
    report.parity = parity
    if not parity.passed:
        raise_check_failed(report, parity, onnx_drilldown(original, folded, values, tolerance=tolerance))


def _data_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def model_input_shape(model: onnx.ModelProto, shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The shape a check feeds a one-input model: ``shape`` checked against the graph's, or the
    graph's own with dynamic dims guessed (see ``bnexport.parity.inputs``)."""
    from ..parity.inputs import input_feeds

    if len(_data_inputs(model)) != 1:
        names = ", ".join(i.name for i in _data_inputs(model))
        raise BnexportError(f"the model has {len(_data_inputs(model))} inputs ({names}); this needs one")
    return input_feeds(model, shape)[0].shape
