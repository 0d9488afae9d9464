"""Fold BatchNorm into neighbouring linear layers, in torch modules and ONNX graphs.

``fold_module`` and ``fold_onnx`` return a folded copy and a ``FoldReport``. With
``check=True`` (the default) the copy is run against the original on seeded input and
``report.parity`` holds the result; when they disagree a per-layer drill-down names the
first layer that diverges and ``CheckFailed`` is raised, so a wrong model is never returned.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import torch

from ..config import DEFAULT_SEED, DEFAULT_TOLERANCE, Tolerance
from ..errors import BnexportError, CheckFailed, first_line
from .onnx_fold import fold_graph
from .report import FOLDED, KEPT, FoldRecord, FoldReport
from .torch_fold import EQUIVALENT_NODES, trace
from .torch_fold import fold_module as _fold_module


def fold_module(
    module: torch.nn.Module,
    *,
    check: bool = True,
    example_input: torch.Tensor | None = None,
    input_shape: tuple[int, ...] | None = None,
    seed: int = DEFAULT_SEED,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
) -> tuple[torch.nn.Module, FoldReport]:
    """Fold every BatchNorm of an eval-mode module that folds exactly.

    The input shape comes from ``example_input`` (only its shape is used) or ``input_shape``.
    It lets Linear ↔ BatchNorm1d be folded (their exactness depends on the tensor's rank),
    and with ``check`` the folded copy is compared with the original on seeded normal input
    of that shape.
    """
    if example_input is None and input_shape is not None:
        example_input = torch.zeros(input_shape)
    folded, report = _fold_module(module, example_input=example_input)
    if check and report.folded:
        if example_input is None:
            raise BnexportError("fold_module(check=True) needs example_input or input_shape, or check=False")
        _check_module(module, folded, report, tuple(example_input.shape), seed=seed, tolerance=tolerance)
    return folded, report


def _check_module(module, folded, report: FoldReport, shape: tuple[int, ...], *, seed: int, tolerance: Tolerance) -> None:
    from ..parity import eager_runner, module_drilldown, run_parity, seeded_input

    inputs = seeded_input(shape, seed=seed)
    parity = run_parity(eager_runner(module), {"folded": eager_runner(folded)}, inputs,
                        reference_name="unfolded", seed=seed, tolerance=tolerance)
    report.parity = parity.to_json()
    if not parity.passed:
        divergence = module_drilldown(trace(copy.deepcopy(module)), folded, inputs,
                                      equivalent=folded.meta.get(EQUIVALENT_NODES), tolerance=tolerance)
        _raise_check_failed(report, parity, divergence)


def _raise_check_failed(report: FoldReport, parity, divergence) -> None:
    report.divergence = divergence.to_json() if divergence else None
    result = parity.results[0]
    where = (f"; first diverging layer: {divergence.layer} (max |Δ| {divergence.result.max_abs:.3g}, "
             f"{divergence.result.max_rel:.3g} of scale)") if divergence else "; no single layer exceeds the tolerance"
    raise CheckFailed(f"folded model differs from the original: max |Δ| {result.max_abs:.3g} "
                      f"= {result.max_rel:.3g} of scale > atol {result.atol:g} + rtol {result.rtol:g}{where}", report)


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
) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold every BatchNormalization of an ONNX model that folds exactly.

    With ``check`` the result must pass ``onnx.checker`` (full check), and both graphs run in
    ONNX Runtime, graph optimisations off, on seeded input of ``input_shape`` (default: the
    model's, dynamic dims set to 1); ``report.parity`` holds the result.
    """
    original = load_onnx(model)
    try:
        folded, report = fold_graph(original)
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
        _raise_check_failed(report, parity, onnx_drilldown(original, folded, inputs, tolerance=tolerance))


def _data_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def model_input_shape(model: onnx.ModelProto, *, dynamic: int = 1) -> tuple[int, ...]:
    """The graph's one data input's shape, with each dynamic dim set to ``dynamic``."""
    inputs = _data_inputs(model)
    if len(inputs) != 1:
        raise BnexportError(f"the model has {len(inputs)} inputs; checks feed exactly one (use --no-check)")
    return tuple(d.dim_value if d.HasField("dim_value") else dynamic for d in inputs[0].type.tensor_type.shape.dim)


input_shape = model_input_shape  # the name earlier callers use


def model_input_dtype(model: onnx.ModelProto) -> np.dtype:
    elem_type = _data_inputs(model)[0].type.tensor_type.elem_type
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type) if elem_type else np.dtype(np.float32)


__all__ = ["FOLDED", "KEPT", "CheckFailed", "FoldRecord", "FoldReport", "fold_module", "fold_onnx", "input_shape",
           "load_onnx", "model_input_shape", "uses_external_data"]
