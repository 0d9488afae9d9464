"""The ONNX fold's constant evaluation: each op of ``CONSTANT_OPS`` gives the value ONNX Runtime computes.

The fold reads a weight or bias through these ops (``GraphIndex.constant``); a wrong value
there would be folded into the model. The oracle is ONNX Runtime with graph optimisations
off, running the same node on the same initializers.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnexport.fold.onnx_graph import CONSTANT_OPS, GraphIndex

RNG = np.random.default_rng(0)
W = RNG.standard_normal((2, 3, 4)).astype(np.float32)

# op -> (the node's inputs as initializers, its attributes); every node writes "y"
CASES = {
    "Constant": ({}, {"value": numpy_helper.from_array(W, "v")}),
    "Identity": ({"w": W}, {}),
    "Shape": ({"w": W}, {"start": 1}),
    "Expand": ({"w": W[:, :1], "shape": np.array([3, 2, 5, 4], np.int64)}, {}),
    "CastLike": ({"w": W, "like": np.zeros(1, np.float16)}, {}),
    "Cast": ({"w": W}, {"to": TensorProto.DOUBLE}),
    "ConstantOfShape": ({"shape": np.array([2, 3], np.int64)},
                        {"value": numpy_helper.from_array(np.array([1.5], np.float32), "v")}),
    "Concat": ({"a": W, "b": W[:, :2]}, {"axis": 1}),
    "Reshape": ({"w": W, "shape": np.array([0, -1], np.int64)}, {}),
    "Unsqueeze": ({"w": W, "axes": np.array([0, -1], np.int64)}, {}),
    "Squeeze": ({"w": W[:, :1], "axes": np.array([1], np.int64)}, {}),
    "Gather": ({"w": W, "idx": np.array([2, 0], np.int64)}, {"axis": 1}),
    "Transpose": ({"w": W}, {"perm": [2, 0, 1]}),
    "Mul": ({"a": np.array([2], np.int64), "b": np.array([4, -3], np.int64)}, {}),
    "Sub": ({"a": W, "b": W[:1]}, {}),
    # the TorchScript exporter's reversal of a Pad's amounts: out-of-range bounds clamp, a negative step walks back
    "Slice": ({"w": W, "starts": np.array([-1, 1], np.int64), "ends": np.array([-(2 ** 63) + 1, 99], np.int64),
               "axes": np.array([0, -1], np.int64), "steps": np.array([-1, 2], np.int64)}, {}),
}


def test_every_constant_op_has_a_case():
    assert set(CASES) == CONSTANT_OPS


@pytest.mark.parametrize("op", sorted(CASES))
def test_constant_value_is_what_onnxruntime_computes(op):
    tensors, attributes = CASES[op]
    node = helper.make_node(op, list(tensors), ["y"], **attributes)
    graph = helper.make_graph([node], op, [], [helper.make_tensor_value_info("y", TensorProto.UNDEFINED, None)],
                              [numpy_helper.from_array(value, name) for name, value in tensors.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model = onnx.shape_inference.infer_shapes(model)  # ORT needs the output's type
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    (expected,) = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {})
    got = GraphIndex(model).constant("y")
    assert got is not None and got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
