"""The independent oracle for ONNX fold tests: ONNX Runtime, graph optimisations off, on seeded inputs.

Nothing here imports torch, so the hand-built graph tests stay quick.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper


def ort_session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def data_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def seeded_feeds(model: onnx.ModelProto, *, seed: int = 0, dynamic: int = 2, shapes: dict | None = None) -> dict:
    """A value for every data input of ``model``, of its own dtype and shape (dynamic dims set to ``dynamic``)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in data_inputs(model):
        tensor_type = value.type.tensor_type
        shape = (shapes or {}).get(value.name) or [d.dim_value if d.dim_value > 0 else dynamic
                                                    for d in tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if tensor_type.elem_type == TensorProto.BOOL:
            feeds[value.name] = np.ones(shape, dtype=bool)
        elif np.issubdtype(dtype, np.integer):
            feeds[value.name] = np.full(shape, 3, dtype=dtype)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort_session(model).run(None, feeds)


def relative_errors(reference: list[np.ndarray], candidate: list[np.ndarray]) -> list[float]:
    """max|a - b| / max|a| per output, in float64."""
    errors = []
    for a, b in zip(reference, candidate, strict=True):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        assert a.shape == b.shape
        errors.append(float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)))
    return errors


def bn_count(graph: onnx.GraphProto) -> int:
    """BatchNormalization nodes in ``graph`` and, at any depth, its subgraphs."""
    count = 0
    for node in graph.node:
        count += node.op_type == "BatchNormalization"
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                count += bn_count(sub)
    return count


def assert_valid(model: onnx.ModelProto) -> None:
    """The full checker passes and ONNX Runtime loads the model."""
    onnx.checker.check_model(model, full_check=True)
    ort_session(model)


def bn_tensors(prefix: str, channels: int, rng: np.random.Generator, dtype=np.float32) -> dict[str, np.ndarray]:
    """γ, β, μ, σ² named PREFIX_{g,b,m,v}, with trained-looking values."""
    return {f"{prefix}_g": (rng.random(channels) + 0.5).astype(dtype),
            f"{prefix}_b": rng.standard_normal(channels).astype(dtype),
            f"{prefix}_m": rng.standard_normal(channels).astype(dtype),
            f"{prefix}_v": (rng.random(channels) + 0.5).astype(dtype)}


def bn(prefix: str, source: str, output: str, **attrs) -> onnx.NodeProto:
    inputs = [source, *(f"{prefix}_{k}" for k in "gbmv")]
    return helper.make_node("BatchNormalization", inputs, [output], name=prefix, **attrs)
