"""DequantizeLinear(q, δ, z) → Conv → BN in ONNX: the BN's scale goes into the dequantize scale per output
channel, q stays (or is mirrored on channels whose scale turns negative), the shift into the bias.

The oracle is ONNX Runtime with graph optimisations off, on the original and the folded model.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from bnexport.fold import fold_onnx
from bnexport.fold.onnx_patterns import ABSORBED_PREFIX
from fold.models import bn_initializers, bn_node, count_bn_nodes, randomize_bn, relative_error
from fold.onnx_oracle import ort_session

C_IN, C_OUT, SIZE = 3, 4, 6
X_SCALE = np.float32(0.05)


def quantized_model(q: np.ndarray, delta, zero=None, *, axis: int | None = None, opset: int = 19, bias: str = "float",
                    qdq_input: bool = False, gamma=None, shift_free: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x [→ Q → DQ] → Conv(DQ(q, δ, z), bias) → BN → y, and y also through QuantizeLinear → DequantizeLinear as y_q.

    ``bias``: "none", "float", or "dq" (int32 through DequantizeLinear with δ_b = δ_x · δ_w, the QDQ format).
    ``shift_free`` sets β = μ · s, so the BN has no shift and a quantized bias stays an integer.
    """
    rng = np.random.default_rng(seed)
    c_out = q.shape[0]
    delta = np.asarray(delta, np.float32)
    inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(delta, "delta")]
    dq_inputs = ["q", "delta"]
    if zero is not None:
        inits.append(numpy_helper.from_array(np.asarray(zero, q.dtype), "zero"))
        dq_inputs.append("zero")
    attrs = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("DequantizeLinear", dq_inputs, ["w"], name="dq_w", **attrs)]
    data = "x"
    if qdq_input:
        inits += [numpy_helper.from_array(X_SCALE, "x_scale"), numpy_helper.from_array(np.uint8(128), "x_zero")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"], name="q_x"),
                  helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"], name="dq_x")]
        data = "x_dq"
    conv_inputs = [data, "w"]
    b = rng.standard_normal(c_out).astype(np.float32)
    if bias == "float":
        inits.append(numpy_helper.from_array(b, "b"))
        conv_inputs.append("b")
    elif bias == "dq":
        bias_scale = (X_SCALE * np.broadcast_to(delta.reshape(-1), (c_out,))).astype(np.float32)
        inits += [numpy_helper.from_array(np.round(b / bias_scale).astype(np.int32), "b_q"),
                  numpy_helper.from_array(bias_scale if delta.size > 1 else bias_scale[:1].reshape(()), "b_scale")]
        nodes.append(helper.make_node("DequantizeLinear", ["b_q", "b_scale"], ["b_dq"], name="dq_b",
                                      **({"axis": 0} if delta.size > 1 else {})))
        conv_inputs.append("b_dq")
    nodes.append(helper.make_node("Conv", conv_inputs, ["c"], name="conv"))
    bn = bn_initializers("bn", c_out, rng)
    if gamma is not None:
        bn[0] = numpy_helper.from_array(np.asarray(gamma, np.float32), "bn_g")
    if shift_free:
        g, _, m, v = (numpy_helper.to_array(t).astype(np.float64) for t in bn)
        bn[1] = numpy_helper.from_array((m * g / np.sqrt(v + 1e-5)).astype(np.float32), "bn_b")
    inits += bn
    inits += [numpy_helper.from_array(np.float32(0.1), "y_scale"), numpy_helper.from_array(np.uint8(128), "y_zero")]
    nodes += [bn_node("bn", "c", "y"),
              helper.make_node("QuantizeLinear", ["y", "y_scale", "y_zero"], ["y_qq"], name="q_y"),
              helper.make_node("DequantizeLinear", ["y_qq", "y_scale", "y_zero"], ["y_q"], name="dq_y")]
    out = [2, c_out, SIZE - 2, SIZE - 2]
    graph = helper.make_graph(nodes, "quantized", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, C_IN, SIZE, SIZE])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out),
                               helper.make_tensor_value_info("y_q", TensorProto.FLOAT, out)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def int8_weight(seed: int = 0, *, low: int = -127, high: int = 127, dtype=np.int8, c_out: int = C_OUT) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high + 1, (c_out, C_IN, 3, 3)).astype(dtype)


def run_all(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return ort_session(model).run(None, {"x": x})


def assert_folds_exactly(original: onnx.ModelProto, *, quantum_steps: float = 1.0) -> onnx.ModelProto:
    """Folded, valid, and the BN's output equal to float32 rounding; y_q (after QuantizeLinear) may move by one step
    where the float output sits on a rounding boundary."""
    folded, report = fold_onnx(original, check=False)
    assert [(r.status, r.folded_into, r.position, r.into_scale) for r in report.records] == \
        [("folded", "conv", "after", True)], report.table()
    assert "conv (BN after it, into its dequantize scale)" in report.table()
    assert count_bn_nodes(folded) == 0
    onnx.checker.check_model(folded, full_check=True)
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert f"{ABSORBED_PREFIX} 'bn'" in conv.doc_string
    assert [n.op_type for n in folded.graph.node].count("QuantizeLinear") == \
        [n.op_type for n in original.graph.node].count("QuantizeLinear")  # the activations' QDQ pairs stay
    x = np.random.default_rng(7).standard_normal((2, C_IN, SIZE, SIZE)).astype(np.float32) * 3
    (y, y_q), (y_f, y_q_f) = run_all(original, x), run_all(folded, x)
    assert relative_error(y, y_f) < 1e-5
    assert np.abs(y_q - y_q_f).max() <= 0.1 * quantum_steps + 1e-6
    return folded


def kept(original: onnx.ModelProto) -> tuple[str, str]:
    folded, report = fold_onnx(original, check=False)
    assert count_bn_nodes(folded) == 1 and len(report.kept) == 1
    assert folded == original  # nothing half-written
    return report.kept[0].reason_code, report.kept[0].reason


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def weight_dequantize(model: onnx.ModelProto) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == "dq_w")


def dequantize_inputs(model: onnx.ModelProto) -> list[np.ndarray]:
    return [initializer(model, name) for name in weight_dequantize(model).input]


@pytest.mark.parametrize("opset", [13, 19, 21])
def test_per_tensor_int8_becomes_per_channel(opset):
    q = int8_weight()
    folded = assert_folds_exactly(quantized_model(q, 0.02, np.int8(0), opset=opset))
    dq = weight_dequantize(folded)
    assert helper.get_attribute_value(next(a for a in dq.attribute if a.name == "axis")) == 0
    q_new, delta_new, zero_new = dequantize_inputs(folded)
    np.testing.assert_array_equal(q_new, q)  # every γ > 0: q untouched
    assert delta_new.shape == (C_OUT,) and zero_new.shape == (C_OUT,) and not zero_new.any()


def test_per_channel_int8_scale_times_s():
    q, delta = int8_weight(1), np.array([0.01, 0.02, 0.03, 0.04], np.float32)
    original = quantized_model(q, delta, np.zeros(C_OUT, np.int8), axis=0)
    folded = assert_folds_exactly(original)
    g, _, _, v = (initializer(original, f"bn_{k}").astype(np.float64) for k in "gbmv")
    np.testing.assert_allclose(dequantize_inputs(folded)[1], delta * g / np.sqrt(v + 1e-5), rtol=1e-6)


def test_negative_gamma_mirrors_the_channel_and_keeps_the_scale_positive():
    q = int8_weight(2)
    gamma = np.array([0.7, -1.3, 1.1, -0.4], np.float32)
    folded = assert_folds_exactly(quantized_model(q, 0.02, np.int8(0), gamma=gamma))
    q_new, delta_new, _ = dequantize_inputs(folded)
    assert (delta_new > 0).all()
    np.testing.assert_array_equal(q_new[[0, 2]], q[[0, 2]])
    np.testing.assert_array_equal(q_new[[1, 3]], -q[[1, 3]])


def test_int8_minus_128_on_a_negative_channel_is_kept():
    q = int8_weight(3)
    q[1, 0, 0, 0] = -128
    code, reason = kept(quantized_model(q, 0.02, np.int8(0), gamma=[0.7, -1.3, 1.1, 0.4]))
    assert code == "dtype" and "channel 1" in reason and "int8" in reason


def test_int8_minus_128_on_a_positive_channel_folds():
    q = int8_weight(3)
    q[1, 0, 0, 0] = -128
    assert_folds_exactly(quantized_model(q, 0.02, np.int8(0), gamma=[0.7, 1.3, 1.1, -0.4]))


def test_uint8_folds_while_every_scale_stays_positive():
    assert_folds_exactly(quantized_model(int8_weight(4, low=0, high=255, dtype=np.uint8), 0.02, np.uint8(0)))


def test_uint8_with_zero_point_0_cannot_mirror():
    q = int8_weight(4, low=1, high=255, dtype=np.uint8)
    assert kept(quantized_model(q, 0.02, np.uint8(0), gamma=[0.7, -1.3, 1.1, 0.4]))[0] == "dtype"


def test_a_nonzero_zero_point_folds_and_mirrors_around_it():
    q = int8_weight(5, low=1, high=255, dtype=np.uint8)  # 2·128 − q stays in [1, 255]
    folded = assert_folds_exactly(quantized_model(q, 0.02, np.uint8(128), gamma=[0.7, -1.3, 1.1, 0.4]))
    q_new, _, zero_new = dequantize_inputs(folded)
    np.testing.assert_array_equal(zero_new, np.full(C_OUT, 128, np.uint8))
    np.testing.assert_array_equal(q_new[1].astype(int), 256 - q[1].astype(int))


def test_a_nonzero_int8_zero_point_out_of_range_is_kept():
    q = int8_weight(5)  # 2·20 − (−127) = 167 > 127
    assert kept(quantized_model(q, 0.02, np.int8(20), gamma=[0.7, -1.3, 1.1, 0.4]))[0] == "dtype"


def test_int16_weights_fold():
    assert_folds_exactly(quantized_model(int8_weight(6, low=-3000, high=3000, dtype=np.int16), 1e-4, np.int16(0),
                                         opset=21, gamma=[0.7, -1.3, 1.1, 0.4]))


def test_int4_weights_are_kept_as_dtype():
    model = quantized_model(int8_weight(), 0.02, np.int8(0), opset=21)
    values = np.random.default_rng(0).integers(-7, 8, C_OUT * C_IN * 9)
    replaced = {"q": helper.make_tensor("q", TensorProto.INT4, [C_OUT, C_IN, 3, 3], values),
                "zero": helper.make_tensor("zero", TensorProto.INT4, [], [0])}
    for position, tensor in enumerate(model.graph.initializer):
        if tensor.name in replaced:
            model.graph.initializer[position].CopyFrom(replaced[tensor.name])
    assert kept(model)[0] == "dtype"


def test_opset_10_has_no_per_channel_scale():
    code, reason = kept(quantized_model(int8_weight(), 0.02, np.int8(0), opset=10))
    assert code == "shape_mismatch" and "opset 10" in reason


def test_per_channel_along_another_axis_is_kept():
    q = int8_weight()
    assert kept(quantized_model(q, np.full(C_IN, 0.02, np.float32), np.zeros(C_IN, np.int8), axis=1))[0] == "shape_mismatch"


def test_no_bias_gets_the_shift():
    folded = assert_folds_exactly(quantized_model(int8_weight(), 0.02, np.int8(0), bias="none"))
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert len(conv.input) == 3 and initializer(folded, conv.input[2]).dtype == np.float32


def test_quantized_bias_becomes_a_float_bias_when_not_an_integer():
    original = quantized_model(int8_weight(), 0.02, np.int8(0), bias="dq", qdq_input=True, gamma=[0.7, -1.3, 1.1, 0.4])
    folded = assert_folds_exactly(original)
    assert "dq_b" not in {n.name for n in folded.graph.node}
    assert not {"b_q", "b_scale"} & {t.name for t in folded.graph.initializer}
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert initializer(folded, conv.input[2]).dtype == np.float32


@pytest.mark.parametrize("per_channel", [False, True])
def test_quantized_bias_is_requantized_when_exact(per_channel):
    delta = np.array([0.01, 0.02, 0.03, 0.04], np.float32) if per_channel else 0.02
    original = quantized_model(int8_weight(), delta, None, axis=0 if per_channel else None, bias="dq", qdq_input=True,
                               gamma=[0.7, -1.3, 1.1, 0.4], shift_free=True)
    folded = assert_folds_exactly(original)
    bias_dq = next(n for n in folded.graph.node if n.name == "dq_b")
    q_b, delta_b = (initializer(folded, name) for name in bias_dq.input[:2])
    assert q_b.dtype == np.int32
    weight_delta = dequantize_inputs(folded)[1]
    np.testing.assert_allclose(delta_b, X_SCALE * weight_delta, rtol=1e-6)  # δ_b' = δ_x · δ_w'
    np.testing.assert_array_equal(np.sign(q_b[1]), -np.sign(initializer(original, "b_q")[1]))


def test_an_int8_quantized_bias_stays_int8_beside_its_zero_point():
    # DequantizeLinear needs q_b and its zero point of one dtype: an int32 q_b beside an int8 zero point is invalid
    original = quantized_model(int8_weight(), 0.02, np.int8(0), bias="dq", qdq_input=True, gamma=[0.7, -1.3, 1.1, 0.4],
                               shift_free=True)
    q_b = next(t for t in original.graph.initializer if t.name == "b_q")
    narrow = np.clip(numpy_helper.to_array(q_b), -100, 100).astype(np.int8)
    q_b.CopyFrom(numpy_helper.from_array(narrow, "b_q"))
    original.graph.initializer.append(numpy_helper.from_array(np.int8(0), "b_zero"))
    next(n for n in original.graph.node if n.name == "dq_b").input.append("b_zero")
    folded = assert_folds_exactly(original)
    bias_dq = next(n for n in folded.graph.node if n.name == "dq_b")
    assert {initializer(folded, name).dtype for name in bias_dq.input if name != bias_dq.input[1]} == {np.dtype(np.int8)}


def test_a_dequantize_read_by_two_convs_is_kept():
    model = quantized_model(int8_weight(), 0.02, np.int8(0))
    model.graph.node.append(helper.make_node("Conv", ["x", "w"], ["c2"], name="conv2"))
    model.graph.output.append(helper.make_tensor_value_info("c2", TensorProto.FLOAT, None))
    assert kept(model)[0] == "multiple_consumers"


def test_quantized_tensors_shared_by_two_dequantizes_are_copied():
    model = quantized_model(int8_weight(), 0.02, np.int8(0), gamma=[0.7, -1.3, 1.1, 0.4])
    model.graph.node.insert(1, helper.make_node("DequantizeLinear", ["q", "delta", "zero"], ["w2"], name="dq_w2"))
    model.graph.node.append(helper.make_node("Conv", ["x", "w2"], ["c2"], name="conv2"))
    model.graph.output.append(helper.make_tensor_value_info("c2", TensorProto.FLOAT, [2, C_OUT, SIZE - 2, SIZE - 2]))
    folded, report = fold_onnx(model, check=False)
    assert count_bn_nodes(folded) == 0
    x = np.random.default_rng(7).standard_normal((2, C_IN, SIZE, SIZE)).astype(np.float32)
    before, after = run_all(model, x), run_all(folded, x)
    assert relative_error(before[0], after[0]) < 1e-5
    np.testing.assert_array_equal(before[2], after[2])  # conv2 reads the original q, δ, z
    assert list(next(n for n in folded.graph.node if n.name == "dq_w2").input) == ["q", "delta", "zero"]


def _layer_model(op: str, *, opset: int = 19, group: int = 1, seed: int = 0) -> tuple[onnx.ModelProto, tuple]:
    """x → {Gemm, MatMul, ConvTranspose}(DQ(q, δ)) → BN → y, per-tensor int8."""
    rng = np.random.default_rng(seed)
    if op == "ConvTranspose":
        q_shape, x_shape, y_shape = (4, 6 // group, 3, 3), (2, 4, 5, 5), (2, 6, 7, 7)
        channels = 6
    elif op == "Gemm":
        q_shape, x_shape, y_shape, channels = (6, 5), (3, 5), (3, 6), 6  # transB=1
    else:
        q_shape, x_shape, y_shape, channels = (5, 6), (3, 5), (3, 6), 6
    q = rng.integers(-127, 128, q_shape).astype(np.int8)
    inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(np.float32(0.03), "delta"),
             *bn_initializers("bn", channels, rng)]
    inits[2] = numpy_helper.from_array(np.array([0.7, -1.3, 1.1, 0.4, -0.9, 1.2], np.float32), "bn_g")
    attrs = {"transB": 1} if op == "Gemm" else {"group": group} if op == "ConvTranspose" else {}
    nodes = [helper.make_node("DequantizeLinear", ["q", "delta"], ["w"], name="dq_w"),
             helper.make_node(op, ["x", "w"], ["c"], name="layer", **attrs), bn_node("bn", "c", "y")]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model, x_shape


@pytest.mark.parametrize("op", ["Gemm", "MatMul", "ConvTranspose"])
def test_gemm_matmul_and_conv_transpose_fold(op):
    original, x_shape = _layer_model(op)
    folded, report = fold_onnx(original, check=False)
    assert count_bn_nodes(folded) == 0, report.table()
    onnx.checker.check_model(folded, full_check=True)
    assert (dequantize_inputs(folded)[1] > 0).all()
    x = np.random.default_rng(7).standard_normal(x_shape).astype(np.float32)
    assert relative_error(run_all(original, x)[0], run_all(folded, x)[0]) < 1e-5


def test_grouped_conv_transpose_is_kept():
    assert kept(_layer_model("ConvTranspose", group=2)[0])[0] == "shape_mismatch"


def test_conv_add_bn_with_quantized_weight_folds():
    original = quantized_model(int8_weight(), 0.02, np.int8(0), gamma=[0.7, -1.3, 1.1, 0.4])
    conv = next(n for n in original.graph.node if n.op_type == "Conv")
    conv.output[0] = "c_raw"
    add_constant = np.random.default_rng(9).standard_normal((C_OUT, 1, 1)).astype(np.float32)
    original.graph.initializer.append(numpy_helper.from_array(add_constant, "add_c"))
    position = [n.name for n in original.graph.node].index("conv") + 1
    original.graph.node.insert(position, helper.make_node("Add", ["c_raw", "add_c"], ["c"], name="add"))
    onnx.checker.check_model(original, full_check=True)
    assert_folds_exactly(original)


@settings(max_examples=30)
@given(channels=st.integers(1, 6), per_channel=st.booleans(), signs=st.lists(st.booleans(), min_size=6, max_size=6),
       log_scales=st.lists(st.floats(-6, -1), min_size=6, max_size=6), opset=st.sampled_from([13, 19, 21]))
def test_any_channels_scales_and_signs_fold(channels, per_channel, signs, log_scales, opset):
    q = int8_weight(channels, c_out=channels)
    scales = (10.0 ** np.array(log_scales[:channels])).astype(np.float32)
    delta = scales if per_channel else scales[:1].reshape(())
    zero = np.zeros(channels if per_channel else (), np.int8)
    gamma = np.where(signs[:channels], 1.0, -1.0) * (np.arange(channels) * 0.3 + 0.5)
    original = quantized_model(q, delta, zero, axis=0 if per_channel else None, opset=opset, gamma=gamma)
    folded, report = fold_onnx(original, check=False)
    assert count_bn_nodes(folded) == 0, report.table()
    x = np.random.default_rng(5).standard_normal((2, C_IN, SIZE, SIZE)).astype(np.float32) * 3
    assert relative_error(run_all(original, x)[0], run_all(folded, x)[0]) < 1e-5
    assert (dequantize_inputs(folded)[1] > 0).all()


# a real QDQ model: a torch net exported with BN kept, then quantized by ONNX Runtime's quantize_static

class ConvBnRelu2(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def _float_model(tmp_path) -> tuple[nn.Module, str]:
    torch.manual_seed(0)
    module = randomize_bn(ConvBnRelu2())
    with torch.no_grad():
        module.bn1.weight[::3] *= -1  # negative γ on some channels: those channels are mirrored
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, 3, 8, 8),), buffer, dynamo=False, do_constant_folding=False,
                          opset_version=17, input_names=["x"], output_names=["y"],
                          training=torch.onnx.TrainingMode.PRESERVE)
    model = onnx.load_from_string(buffer.getvalue())
    assert count_bn_nodes(model) == 2
    path = tmp_path / "float.onnx"
    onnx.save(model, str(path))
    return module, str(path)


def _quantize(source: str, target, *, per_channel: bool, keep_conv_output_float: bool) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": np.random.default_rng(i).standard_normal((1, 3, 8, 8)).astype(np.float32)}
                                 for i in range(4)])

        def get_next(self):
            return next(self.batches, None)

    # by default the quantizer puts QuantizeLinear → DequantizeLinear on the Conv's output, before the BN;
    # excluding it leaves DQ → Conv → BN → Relu → Q → DQ, the BN next to the Conv
    extra = {"OpTypesToExcludeOutputQuantization": ["Conv"]} if keep_conv_output_float else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(source, str(target), Calibration(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        op_types_to_quantize=["Conv", "Relu"], extra_options=extra)
    return onnx.load(str(target))


def _optimized_ops(model: onnx.ModelProto, path) -> list[str]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_quantize_static_model_folds(tmp_path, per_channel):
    module, source = _float_model(tmp_path)
    original = _quantize(source, tmp_path / "qdq.onnx", per_channel=per_channel, keep_conv_output_float=True)
    assert count_bn_nodes(original) == 2  # the quantizer kept the BNs
    folded, report = fold_onnx(original)  # with its own check, which must pass too
    assert [r.status for r in report.records] == ["folded", "folded"], report.table()
    assert report.parity.passed
    onnx.checker.check_model(folded, full_check=True)
    ops = [n.op_type for n in folded.graph.node]
    assert ops.count("QuantizeLinear") == [n.op_type for n in original.graph.node].count("QuantizeLinear")
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
    reference = run_all(original, x)[0]
    assert relative_error(reference, run_all(folded, x)[0]) < 1e-5
    # what ONNX Runtime makes of it: the BN between Conv and QuantizeLinear blocked the QLinearConv fusion; folded, it fuses
    assert "QLinearConv" not in _optimized_ops(original, tmp_path / "original.opt.onnx")
    assert "QLinearConv" in _optimized_ops(folded, tmp_path / "folded.opt.onnx")


def test_quantized_conv_output_before_the_bn_is_kept(tmp_path):
    _, source = _float_model(tmp_path)
    original = _quantize(source, tmp_path / "qdq.onnx", per_channel=True, keep_conv_output_float=False)
    folded, report = fold_onnx(original, check=False)
    assert count_bn_nodes(folded) == count_bn_nodes(original) == 2
    assert {r.reason_code for r in report.kept} == {"no_linear_neighbour"}
    assert "DequantizeLinear" in report.kept[0].reason
