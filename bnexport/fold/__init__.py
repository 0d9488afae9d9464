"""Fold BatchNorm into neighbouring linear layers, in torch modules and ONNX graphs.

``fold_module`` and ``fold_onnx`` return a folded copy and a ``FoldReport``; with
``check=True`` (the default) the copy is verified against the original on seeded input.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch

from ..config import DEFAULT_SEED, DEFAULT_TOLERANCE, Tolerance
from ..errors import BnexportError
from .onnx_fold import fold_graph
from .report import FOLDED, KEPT, FoldRecord, FoldReport
from .torch_fold import fold_module as _fold_module


def fold_module(
    module: torch.nn.Module,
    *,
    check: bool = True,
    example_input: torch.Tensor | None = None,
    seed: int = DEFAULT_SEED,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
) -> tuple[torch.nn.Module, FoldReport]:
    """Fold every BatchNorm of an eval-mode module that folds exactly.

    With ``check`` the folded copy is compared with the original on ``example_input``
    (its shape is used, filled with seeded normal values) and ``report.parity`` holds the result.
    """
    folded, report = _fold_module(module)
    if check and report.folded:
        if example_input is None:
            raise BnexportError("fold_module(check=True) needs example_input for its shape, or check=False")
        from ..parity import eager_runner, run_parity, seeded_input

        inputs = seeded_input(tuple(example_input.shape), seed=seed)
        parity = run_parity(eager_runner(module), {"folded": eager_runner(folded)}, inputs,
                            reference_name="unfolded", seed=seed, tolerance=tolerance)
        report.parity = parity.to_json()
    return folded, report


def load_onnx(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise BnexportError(f"{path}: file not found")
    try:
        return onnx.load(str(path))
    except Exception as err:  # protobuf's DecodeError and onnx's own errors
        raise BnexportError(f"{path}: not a readable ONNX model ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'parse error'})") from None


def fold_onnx(
    model: onnx.ModelProto | str | Path,
    *,
    check: bool = True,
    seed: int = DEFAULT_SEED,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold every BatchNormalization of an ONNX model that folds exactly.

    With ``check`` both graphs run in ONNX Runtime, graph optimisations off, on seeded input
    (dynamic dims set to 1), and ``report.parity`` holds the result.
    """
    original = load_onnx(model)
    folded, report = fold_graph(original)
    if check and report.folded:
        from ..export import onnx_bytes
        from ..parity import onnxruntime_runner, run_parity, seeded_input

        inputs = seeded_input(input_shape(original), seed=seed)
        parity = run_parity(onnxruntime_runner(onnx_bytes(original)), {"folded": onnxruntime_runner(onnx_bytes(folded))},
                            inputs, reference_name="unfolded", seed=seed, tolerance=tolerance)
        report.parity = parity.to_json()
    return folded, report


def input_shape(model: onnx.ModelProto, *, dynamic: int = 1) -> tuple[int, ...]:
    """The first graph input's shape, with each dynamic dim set to ``dynamic``."""
    initializers = {t.name for t in model.graph.initializer}
    first = next(i for i in model.graph.input if i.name not in initializers)
    return tuple(d.dim_value if d.HasField("dim_value") else dynamic for d in first.type.tensor_type.shape.dim)


__all__ = ["FOLDED", "KEPT", "FoldRecord", "FoldReport", "fold_module", "fold_onnx", "input_shape", "load_onnx"]
