"""Small ONNX graphs with the input signatures real models have: several inputs of several dtypes,
float16, bfloat16 and float64 weights, dynamic image sides. Each holds Conv → BatchNormalization pairs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fold.models import bn_initializers, bn_node


def _cast_all(initializers: list[onnx.TensorProto], dtype) -> list[onnx.TensorProto]:
    return [numpy_helper.from_array(numpy_helper.to_array(t).astype(dtype), t.name) for t in initializers]


def _model(nodes, inputs, outputs, initializers, opset=18) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "signature", inputs, outputs, initializers),
                              opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def multi_input_model() -> onnx.ModelProto:
    """Four inputs: image ``a`` and feature map ``b`` (float, sharing the dynamic dims h and w),
    channel indices ``idx`` (int64) and ``mask`` (bool); two outputs. Two Conv → BN pairs fold."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((10, 8, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.zeros((), np.float32), "zero"),
             *bn_initializers("bn1", 8, rng), *bn_initializers("bn2", 10, rng)]
    nodes = [
        helper.make_node("Conv", ["a", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        bn_node("bn1", "c1", "n1"),
        helper.make_node("Add", ["n1", "b"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["c2"], name="conv2"),
        bn_node("bn2", "c2", "n2"),
        helper.make_node("Gather", ["n2", "idx"], ["g"], name="pick", axis=1),  # idx must stay below 10 channels
        helper.make_node("Where", ["mask", "g", "zero"], ["y"], name="where"),
    ]
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 3, "h", "w"]),
              helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 8, "h", "w"]),
              helper.make_tensor_value_info("idx", TensorProto.INT64, ["k"]),
              helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", 1, "h", "w"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "k", "h", "w"]),
               helper.make_tensor_value_info("r", TensorProto.FLOAT, ["batch", 8, "h", "w"])]
    return _model(nodes, inputs, outputs, inits)


def conv_bn_model(dtype=np.float32, *, channels: int = 16, depth: int = 2, shape=("batch", 4, "h", "w")) -> onnx.ModelProto:
    """``depth`` × (Conv 3×3, padded → BN → Relu), weights and input of ``dtype``; H and W dynamic by default."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rng = np.random.default_rng(2)
    nodes, inits, source, width = [], [], "x", shape[1]
    for i in range(depth):
        inits.append(numpy_helper.from_array(rng.standard_normal((channels, width, 3, 3)) / np.sqrt(9 * width), f"w{i}"))
        inits += bn_initializers(f"bn{i}", channels, rng)
        nodes += [helper.make_node("Conv", [source, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  bn_node(f"bn{i}", f"c{i}", f"n{i}"),
                  helper.make_node("Relu", [f"n{i}"], [f"y{i}" if i < depth - 1 else "y"], name=f"relu{i}")]
        source, width = f"y{i}", channels
    inits = _cast_all(inits, dtype)
    out_shape = [shape[0], channels, *shape[2:]]
    return _model(nodes, [helper.make_tensor_value_info("x", elem, list(shape))],
                  [helper.make_tensor_value_info("y", elem, out_shape)], inits)


def bfloat16_io_model() -> onnx.ModelProto:
    """bfloat16 in and out, float32 inside (ONNX Runtime's CPU has next to no bfloat16 kernels)."""
    body = conv_bn_model(np.float32, shape=(1, 4, 8, 8))
    graph = body.graph
    nodes = [helper.make_node("Cast", ["x_bf16"], ["x"], name="to_float", to=TensorProto.FLOAT), *graph.node]
    nodes[-1].output[0] = "y32"
    nodes.append(helper.make_node("Cast", ["y32"], ["y"], name="to_bf16", to=TensorProto.BFLOAT16))
    return _model(nodes, [helper.make_tensor_value_info("x_bf16", TensorProto.BFLOAT16, [1, 4, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [1, 16, 8, 8])], list(graph.initializer))


def relu_model(elem_type: int, shape=(2, 3)) -> onnx.ModelProto:
    """y = Cast(Relu(Cast(x, float)), back): exact in any dtype, so numpy is the oracle."""
    nodes = [helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT), helper.make_node("Relu", ["f"], ["r"]),
             helper.make_node("Cast", ["r"], ["y"], to=elem_type)]
    return _model(nodes, [helper.make_tensor_value_info("x", elem_type, list(shape))],
                  [helper.make_tensor_value_info("y", elem_type, list(shape))], [])


def _bfloat16(tensor: onnx.TensorProto) -> onnx.TensorProto:
    import ml_dtypes

    values = numpy_helper.to_array(tensor).astype(ml_dtypes.bfloat16)
    return helper.make_tensor(tensor.name, TensorProto.BFLOAT16, values.shape, values.view(np.uint16).tobytes(), raw=True)


def bfloat16_gemm_model() -> onnx.ModelProto:
    """Gemm → BatchNormalization in bfloat16 throughout: valid ONNX, but ONNX Runtime's CPU has no bfloat16 Gemm."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w"), *bn_initializers("bn", 4, rng)]
    nodes = [helper.make_node("Gemm", ["x", "w"], ["g"], name="fc"), bn_node("bn", "g", "y")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["n", 8])],
                  [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["n", 4])], [_bfloat16(t) for t in inits])
