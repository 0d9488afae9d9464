"""``fold_onnx`` and the reading of ONNX files: fold every exact BatchNormalization of a graph.

Nothing here imports torch: folding, inspecting and checking an ONNX file needs only onnx,
numpy and ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from ..config import DEFAULT_SEED, DEFAULT_TOLERANCE, Tolerance
from ..errors import BnexportError, first_line
from .checks import raise_check_failed
from .onnx_patterns import fold_graph
from .onnx_valid import ensure_valid
from .report import FoldReport


def load_onnx(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    """The model itself, or the file read with its external data; a one-line ``BnexportError`` otherwise."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise BnexportError(f"{path}: file not found")
    try:
        loaded = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and onnx's own errors
        raise BnexportError(f"{path}: not a readable ONNX model ({first_line(err)})") from None
    if not loaded.graph.node and not loaded.graph.output:  # protobuf parses many non-ONNX files as an empty message
        raise BnexportError(f"{path}: not an ONNX model (no graph)")
    if uses_external_data(loaded):
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(loaded, str(path.parent))
        except Exception as err:  # OSError, or onnx's ValidationError for a path that is not a file
            raise BnexportError(f"{path}: external data missing or unreadable ({first_line(err)})") from None
    try:
        onnx.checker.check_model(loaded)  # a truncated file can still parse; the checker catches what is missing
    except Exception as err:
        raise BnexportError(f"{path}: not a valid ONNX model ({first_line(err)})") from None
    return loaded


def uses_external_data(model: onnx.ModelProto | str | Path) -> bool:
    """Whether the model, or the file as stored, keeps tensors in external data files."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def fold_onnx(
    model: onnx.ModelProto | str | Path,
    *,
    check: bool = True,
    input_shape: tuple[int, ...] | None = None,
    seed: int = DEFAULT_SEED,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
    fold_overridable: bool = False,
) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold every BatchNormalization of an ONNX model that folds exactly.

    With ``check`` the result must pass ``onnx.checker`` (full check), and both graphs run in
    ONNX Runtime, graph optimisations off, on seeded input of ``input_shape`` (default: the
    model's, dynamic dims set to 1); ``report.parity`` holds the result. Whether checked or
    not, the result passes ``onnx.checker`` and loads in ONNX Runtime (``onnx_valid``), or a
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
        # every rewrite must leave a valid model; a failure here is a bug, so it is not caught
        onnx.checker.check_model(folded, full_check=True)
        _check_onnx(original, folded, report, input_shape or model_input_shape(original), seed=seed, tolerance=tolerance)
    return folded, report


def _check_onnx(original, folded, report: FoldReport, shape, *, seed: int, tolerance: Tolerance) -> None:
    from ..export import onnx_bytes
    from ..parity import onnx_drilldown, onnxruntime_runner, run_parity, seeded_input

    inputs = seeded_input(tuple(shape), seed=seed, dtype=model_input_dtype(original))
    parity = run_parity(onnxruntime_runner(onnx_bytes(original)), {"folded": onnxruntime_runner(onnx_bytes(folded))},
                        inputs, reference_name="unfolded", seed=seed, tolerance=tolerance)
    report.parity = parity.to_json()
    if not parity.passed:
        raise_check_failed(report, parity, onnx_drilldown(original, folded, inputs, tolerance=tolerance))


def _data_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def model_input_shape(model: onnx.ModelProto, *, dynamic: int = 1) -> tuple[int, ...]:
    """The graph's one data input's shape, with each dynamic dim set to ``dynamic``."""
    inputs = _data_inputs(model)
    if len(inputs) != 1:
        raise BnexportError(f"the model has {len(inputs)} inputs; checks feed exactly one (use --no-check)")
    return tuple(d.dim_value if d.HasField("dim_value") else dynamic for d in inputs[0].type.tensor_type.shape.dim)



def model_input_dtype(model: onnx.ModelProto) -> np.dtype:
    elem_type = _data_inputs(model)[0].type.tensor_type.elem_type
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type) if elem_type else np.dtype(np.float32)
