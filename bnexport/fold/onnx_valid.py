"""Refuse to hand back a folded ONNX model that the checker or ONNX Runtime would reject.

The check runs on the model's structure: each large initializer of the main graph is
declared as a graph input of the same dtype and shape instead of carrying its bytes. The
checker (full check, with shape inference) and ONNX Runtime's loader then see every node,
name, subgraph read and type the folded model has, but neither has to copy the weights, so
the check costs milliseconds on a 100 MB model. Small initializers, such as the shapes a
Reshape reads, keep their values, so shape inference sees them. The fold writes each
weight's bytes from an array of the declared shape, so their sizes cannot disagree.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..errors import BnexportError, first_line
from .onnx_graph import copy_without_initializers
from .fold_report import FoldReport

# initializers with more elements than this are declared by dtype and shape only
SKELETON_MAX_ELEMENTS = 1024


def ensure_valid(original: onnx.ModelProto, folded: onnx.ModelProto, report: FoldReport) -> None:
    """Raise a one-line ``BnexportError`` when ``folded`` fails ``onnx.checker`` (full check) or
    does not load in ONNX Runtime while ``original`` does.

    An unfolded result is the input itself and is not checked again. When ONNX Runtime cannot
    load the input either (it lacks a kernel, e.g. a float64 Conv), the folded model is judged
    by the checker alone and ``report.notes`` says so.
    """
    if not report.folded:
        return
    skeleton = structure_of(folded)
    problem = checker_problem(skeleton)
    if problem is not None:
        original_problem = checker_problem(structure_of(original))
        if original_problem is None:
            raise BnexportError(f"the folded model would be invalid ({problem}); nothing was written")
        # a fold cannot repair its input: say so, and still require that ONNX Runtime loads the result
        report.notes.append(f"the input model fails onnx.checker's full check ({original_problem}); so does the folded one")
    problem = ort_load_problem(skeleton)
    if problem is None:
        return
    original_problem = ort_load_problem(structure_of(original))
    if original_problem is None:
        raise BnexportError(f"the folded model would not load in ONNX Runtime ({problem}); nothing was written")
    report.notes.append(f"ONNX Runtime cannot load the input model ({original_problem}); the folded model was judged by "
                        "onnx.checker alone. To run either, convert it to a dtype or opset ONNX Runtime has kernels for "
                        "(e.g. float32), or use a runtime that has them")


def structure_of(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each large main-graph initializer declared as a typed input instead of holding its bytes."""
    skeleton = copy_without_initializers(model)
    declared = {i.name for i in skeleton.graph.input}
    for tensor in model.graph.initializer:
        if int(np.prod(tensor.dims, dtype=np.int64)) <= SKELETON_MAX_ELEMENTS:
            skeleton.graph.initializer.add().CopyFrom(tensor)
        elif tensor.name not in declared and model.ir_version >= 4:  # IR < 4 declares every initializer already
            skeleton.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return skeleton


def checker_problem(model: onnx.ModelProto) -> str | None:
    """Why ``onnx.checker`` (full check, with shape inference) rejects ``model``, or None when it passes."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:  # onnx's ValidationError and InferenceError
        return first_line(err)
    return None


def ort_load_problem(model: onnx.ModelProto) -> str | None:
    """Why ONNX Runtime (CPU, graph optimisations off) refuses to load ``model``, or None when it loads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # its warnings about unused initializers are not ours to print
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own Fail, InvalidGraph and NotImplemented types
        return first_line(err)
    return None

