"""The ONNX fold on hand-built graphs of the kinds other converters emit.

Subgraphs (If, Loop, Scan) with weights in an outer scope, a model-local function, IR 3,
BatchNormalization opsets 1 to 15, overridable initializers, Conv/ConvTranspose → Add → BN,
and float16, bfloat16 and float64 models. The oracle is ONNX Runtime with graph optimisations
off, on the original and the folded model, fed the same seeded inputs.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnexport.config import tolerance_for
from bnexport.errors import BnexportError
from bnexport.fold import REASON_CODES, fold_onnx, onnx_patterns
from fold.onnx_oracle import assert_valid, bn, bn_count, bn_tensors, relative_errors, run, seeded_feeds

F32 = TensorProto.FLOAT


def vi(name, shape, elem_type=F32):
    return helper.make_tensor_value_info(name, elem_type, shape)


def model_of(nodes, inputs, outputs, tensors, *, opset=18, ir=None, list_initializers=False, functions=(),
             extra_opsets=()):
    initializers = [numpy_helper.from_array(v, k) for k, v in tensors.items()]
    if list_initializers:  # IR <= 3: every initializer is also a graph input
        inputs = [*inputs, *(vi(t.name, list(t.dims), t.data_type) for t in initializers)]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets], functions=list(functions))
    if ir is not None:
        model.ir_version = ir
    onnx.checker.check_model(model, full_check=True)
    return model


def conv_weight(rng, c_out, c_in, k=3, dtype=np.float32):
    return (rng.standard_normal((c_out, c_in, k, k)) / np.sqrt(c_in * k * k)).astype(dtype)


def assert_same(original, folded, feeds, *, tol=1e-5):
    assert_valid(folded)
    errors = relative_errors(run(original, feeds), run(folded, feeds))
    assert max(errors) < tol, errors


def copy_of(model):
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    return copied


def codes_are_known(report):
    for record in report.kept:
        assert record.reason_code in REASON_CODES and record.reason


# subgraphs ------------------------------------------------------------------------------

def nested_if_model():
    """If(cond) → then: Conv→BN; else: If(cond) → then: Conv→BN, else: Conv (no BN).

    Every weight and BN parameter lives in the main graph and is read implicitly, at depth 1
    and 2. ``w`` is read by a conv that folds and by one that must keep its numbers; ``w2`` is
    a Constant node of the middle graph.
    """
    rng = np.random.default_rng(0)
    tensors = {"w": conv_weight(rng, 4, 3), **bn_tensors("bn_then", 4, rng), **bn_tensors("bn_inner", 4, rng)}
    out = [1, 4, 6, 6]
    then = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c_then"], name="conv_then", pads=[1] * 4),
                              bn("bn_then", "c_then", "y_then")], "then", [], [vi("y_then", out)])
    inner_then = helper.make_graph([helper.make_node("Conv", ["x", "w2"], ["c_in"], name="conv_inner", pads=[1] * 4),
                                    bn("bn_inner", "c_in", "y_in")], "inner_then", [], [vi("y_in", out)])
    inner_else = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y_in_else"], name="conv_plain", pads=[1] * 4)],
                                   "inner_else", [], [vi("y_in_else", out)])
    w2 = numpy_helper.from_array(conv_weight(rng, 4, 3), "w2_value")
    middle = helper.make_graph([helper.make_node("Constant", [], ["w2"], name="w2_const", value=w2),
                                helper.make_node("If", ["cond"], ["y_else"], name="inner_if", then_branch=inner_then,
                                                 else_branch=inner_else)], "else", [], [vi("y_else", out)])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="outer_if", then_branch=then, else_branch=middle)]
    return model_of(nodes, [vi("x", [1, 3, 6, 6]), vi("cond", [], TensorProto.BOOL)], [vi("y", out)], tensors)


def test_if_branches_fold_two_deep_with_outer_weights():
    original = nested_if_model()
    before = copy_of(original)
    folded, report = fold_onnx(original, check=False)
    assert original == before
    assert sorted((r.batchnorm, r.status, r.folded_into) for r in report.records) == [
        ("bn_inner", "folded", "conv_inner"), ("bn_then", "folded", "conv_then")]
    assert bn_count(original.graph) == 2 and bn_count(folded.graph) == 0
    for cond in (True, False):  # both branches, and the conv that shares w without a BN
        feeds = seeded_feeds(original, seed=1)
        feeds["cond"] = np.array(cond)
        assert_same(original, folded, feeds)


def loop_model():
    rng = np.random.default_rng(1)
    tensors = {"w": conv_weight(rng, 4, 4), **bn_tensors("bn_loop", 4, rng)}
    shape = [1, 4, 5, 5]
    body = helper.make_graph(
        [helper.make_node("Conv", ["v_in", "w"], ["c"], name="conv_loop", pads=[1] * 4), bn("bn_loop", "c", "b"),
         helper.make_node("Relu", ["b"], ["v_out"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("v_in", shape)],
        [vi("cond_out", [], TensorProto.BOOL), vi("v_out", shape)])
    nodes = [helper.make_node("Loop", ["trips", "cond", "x"], ["y"], name="loop", body=body)]
    return model_of(nodes, [vi("x", shape), vi("trips", [], TensorProto.INT64), vi("cond", [], TensorProto.BOOL)],
                    [vi("y", shape)], tensors)


def scan_model():
    rng = np.random.default_rng(2)
    tensors = {"w": conv_weight(rng, 4, 3), "conv_b": rng.standard_normal(4).astype(np.float32),
               **bn_tensors("bn_scan", 4, rng)}
    body = helper.make_graph([helper.make_node("Conv", ["e", "w", "conv_b"], ["c"], name="conv_scan"),
                              bn("bn_scan", "c", "o")], "body", [vi("e", [1, 3, 5, 5])], [vi("o", [1, 4, 3, 3])])
    nodes = [helper.make_node("Scan", ["xs"], ["ys"], name="scan", body=body, num_scan_inputs=1)]
    return model_of(nodes, [vi("xs", [2, 1, 3, 5, 5])], [vi("ys", [2, 1, 4, 3, 3])], tensors)


@pytest.mark.parametrize("build", [loop_model, scan_model], ids=["loop", "scan"])
def test_loop_and_scan_bodies_fold_with_outer_weights(build):
    original = build()
    folded, report = fold_onnx(original, check=False)
    assert len(report.folded) == 1 and bn_count(folded.graph) == 0
    assert_same(original, folded, seeded_feeds(original, seed=3))


def test_loop_bodies_inside_an_if_fold():
    loop = loop_model()
    body_graph = helper.make_graph(list(loop.graph.node), "then", [], [vi("y", [1, 4, 5, 5])])
    plain = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "else", [], [vi("z", [1, 4, 5, 5])])
    nodes = [helper.make_node("If", ["cond"], ["out"], name="if", then_branch=body_graph, else_branch=plain)]
    tensors = {t.name: numpy_helper.to_array(t) for t in loop.graph.initializer}
    original = model_of(nodes, list(loop.graph.input), [vi("out", [1, 4, 5, 5])], tensors)
    folded, report = fold_onnx(original, check=False)
    assert len(report.folded) == 1 and bn_count(folded.graph) == 0
    assert_same(original, folded, seeded_feeds(original, seed=4))


def _subgraph_reading_outer_constants(*, with_bn: bool):
    """An If whose branches read ``k`` (a Constant node) and ``k2`` (an initializer), which nothing else reads."""
    rng = np.random.default_rng(3)
    tensors = {"k2": rng.standard_normal(4).astype(np.float32)}
    nodes = [helper.make_node("Constant", [], ["k"], name="k_const",
                              value=numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "k_value"))]
    source = "x"
    if with_bn:
        tensors |= {"w": conv_weight(rng, 4, 4, k=1), **bn_tensors("bn", 4, rng)}
        nodes += [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn("bn", "c", "h")]
        source = "h"
    then = helper.make_graph([helper.make_node("Add", [source, "k"], ["t"])], "then", [], [vi("t", [2, 4])])
    other = helper.make_graph([helper.make_node("Mul", [source, "k2"], ["e"])], "else", [], [vi("e", [2, 4])])
    shape = [2, 4, 1, 1] if with_bn else [2, 4]
    if with_bn:
        nodes.append(helper.make_node("Flatten", ["h"], ["h_flat"]))
        then.node[0].input[0] = other.node[0].input[0] = "h_flat"
    nodes.append(helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then, else_branch=other))
    return model_of(nodes, [vi("x", shape), vi("cond", [], TensorProto.BOOL)], [vi("y", [2, 4])], tensors)


def test_bn_free_model_with_subgraph_reading_outer_constants_comes_back_unchanged():
    original = _subgraph_reading_outer_constants(with_bn=False)
    folded, report = fold_onnx(original)
    assert folded.SerializeToString() == original.SerializeToString() and report.records == []
    assert_valid(folded)


def test_constants_only_a_subgraph_reads_survive_a_fold():
    original = _subgraph_reading_outer_constants(with_bn=True)
    folded, report = fold_onnx(original, check=False)
    assert len(report.folded) == 1
    assert "k_const" in {n.name for n in folded.graph.node} and "k2" in {t.name for t in folded.graph.initializer}
    for cond in (True, False):
        feeds = seeded_feeds(original, seed=5)
        feeds["cond"] = np.array(cond)
        assert_same(original, folded, feeds)


def test_bn_inside_a_model_local_function_folds_at_its_call_site():
    rng = np.random.default_rng(4)
    function = helper.make_function(
        "local", "ConvBn", ["x", "w", "g", "b", "m", "v"], ["y"],
        [helper.make_node("Conv", ["x", "w"], ["c"], name="f_conv"),
         helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="f_bn")],
        opset_imports=[helper.make_opsetid("", 18)])
    tensors = {"w": conv_weight(rng, 4, 3, k=1), **bn_tensors("p", 4, rng)}
    nodes = [helper.make_node("ConvBn", ["x", "w", "p_g", "p_b", "p_m", "p_v"], ["y"], name="call", domain="local")]
    original = model_of(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 4, 4, 4])], tensors, functions=[function],
                        extra_opsets=[helper.make_opsetid("local", 1)])
    folded, report = fold_onnx(original)
    assert [(r.batchnorm, r.status, r.folded_into) for r in report.records] == [("call/f_bn", "folded", "call/f_conv")]
    assert bn_count(folded.functions[0]) == 0  # tests/fold/test_onnx_functions.py has the rest
    assert_same(original, folded, seeded_feeds(original, seed=4))


# every ONNX era ---------------------------------------------------------------------------

def conv_bn_model(*, opset=18, ir=None, list_initializers=False, bn_attrs=None, bn_tensor_shape=None, dtype=np.float32,
                  seed=0, bn_inputs_as_graph_inputs=False):
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    tensors = {"w": conv_weight(rng, 4, 3, dtype=dtype), "conv_b": rng.standard_normal(4).astype(dtype),
               **bn_tensors("bn", 4, rng, dtype=dtype)}
    if bn_tensor_shape:  # spatial=0: one statistic per element
        tensors |= {k: np.resize(v, bn_tensor_shape) for k, v in tensors.items() if k.startswith("bn_")}
    nodes = [helper.make_node("Conv", ["x", "w", "conv_b"], ["c"], name="conv", pads=[1] * 4),
             bn("bn", "c", "y", **(bn_attrs or {}))]
    inputs = [vi("x", [1, 3, 5, 5], elem)]
    if bn_inputs_as_graph_inputs:
        inputs += [vi(k, list(v.shape), elem) for k, v in tensors.items() if k.startswith("bn_")]
    return model_of(nodes, inputs, [vi("y", [1, 4, 5, 5], elem)], tensors, opset=opset, ir=ir,
                    list_initializers=list_initializers)


def test_ir3_keeps_graph_inputs_and_initializers_in_step():
    original = conv_bn_model(opset=8, ir=3, list_initializers=True)
    folded, report = fold_onnx(original, check=False)
    assert len(report.folded) == 1 and folded.ir_version == 3
    inputs = {i.name for i in folded.graph.input}
    assert {t.name for t in folded.graph.initializer} <= inputs
    assert not any(name.startswith("bn_") for name in inputs)  # the BN's parameters left with the BN
    assert_same(original, folded, seeded_feeds(original, seed=6))


@pytest.mark.parametrize("opset, attrs, expected", [
    (7, {}, "folded"),
    (7, {"spatial": 1}, "folded"),
    (8, {"spatial": 1, "momentum": 0.5}, "folded"),
    (9, {}, "folded"),
    (14, {"training_mode": 0}, "folded"),
    (15, {}, "folded"),
    (6, {"is_test": 1, "spatial": 1}, "folded"),
    (6, {}, "training_mode"),  # is_test defaults to 0: batch statistics
    (7, {"spatial": 0}, "spatial0"),
])
def test_batchnorm_opsets_and_their_attributes(opset, attrs, expected):
    ir = 3 if opset < 9 else None
    original = conv_bn_model(opset=opset, ir=ir, list_initializers=ir == 3, bn_attrs=attrs)
    folded, report = fold_onnx(original, check=False)
    record = report.records[0]
    if expected == "folded":
        assert record.status == "folded" and bn_count(folded.graph) == 0
        if opset >= 7:  # ONNX Runtime runs BatchNormalization from opset 7
            assert_same(original, folded, seeded_feeds(original, seed=7))
        else:
            onnx.checker.check_model(folded, full_check=True)
    else:
        assert (record.status, record.reason_code) == ("kept", expected)
        assert folded == original


def test_opset1_consumed_inputs_is_read():
    tensors_attrs = {"consumed_inputs": [0, 0, 0, 1, 1]}
    kept = conv_bn_model(opset=1, ir=3, list_initializers=True, bn_attrs=tensors_attrs)
    _, report = fold_onnx(kept, check=False)
    assert report.records[0].reason_code == "training_mode" and "consumed_inputs" in report.records[0].reason
    folds = conv_bn_model(opset=1, ir=3, list_initializers=True, bn_attrs={**tensors_attrs, "is_test": 1})
    folded, report = fold_onnx(folds, check=False)
    assert report.records[0].status == "folded"
    onnx.checker.check_model(folded, full_check=True)


def test_spatial0_with_per_element_statistics_is_kept_without_a_traceback():
    original = conv_bn_model(opset=7, ir=3, list_initializers=True, bn_attrs={"spatial": 0}, bn_tensor_shape=(4, 5, 5))
    folded, report = fold_onnx(original)
    assert (report.records[0].status, report.records[0].reason_code) == ("kept", "spatial0")
    assert folded == original


def test_overridable_parameters_are_kept_unless_asked():
    original = conv_bn_model(bn_inputs_as_graph_inputs=True)
    folded, report = fold_onnx(original)
    assert (report.records[0].status, report.records[0].reason_code) == ("kept", "overridable_input")
    assert folded == original
    folded, report = fold_onnx(original, check=False, fold_overridable=True)
    assert report.records[0].status == "folded" and bn_count(folded.graph) == 0
    assert [i.name for i in folded.graph.input] == [i.name for i in original.graph.input]  # same interface
    assert_same(original, folded, seeded_feeds(original, seed=8))  # the inputs' defaults are the initializers


def test_overridable_conv_weight_is_kept():
    model = conv_bn_model()
    model.graph.input.append(vi("w", [4, 3, 3, 3]))
    _, report = fold_onnx(model, check=False)
    assert (report.records[0].status, report.records[0].reason_code) == ("kept", "overridable_input")
    folded, report = fold_onnx(model, check=False, fold_overridable=True)
    assert report.records[0].status == "folded"
    # the input's default stays the unfolded weight; the conv reads a folded copy
    defaults = {t.name: t for t in folded.graph.initializer}
    assert folded.graph.node[0].input[1] != "w" and defaults["w"] == next(t for t in model.graph.initializer if t.name == "w")


def test_dynamic_and_negative_dims_count_as_dynamic():
    rng = np.random.default_rng(5)
    tensors = {"w": rng.standard_normal((4, 3)).astype(np.float32), **bn_tensors("bn", 4, rng)}
    nodes = [bn("bn", "x", "t"), helper.make_node("MatMul", ["t", "w"], ["y"], name="matmul")]
    for dim in ("batch", -1, None):
        x = helper.make_tensor_value_info("x", F32, [dim, 4])
        graph = helper.make_graph(nodes, "g", [x], [vi("y", [dim, 3])],
                                  [numpy_helper.from_array(v, k) for k, v in tensors.items()])
        original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        folded, report = fold_onnx(original, check=False)
        assert report.records[0].status == "folded", dim
        assert_same(original, folded, seeded_feeds(original, seed=9, dynamic=3))


# Conv / ConvTranspose → Add(per-channel constant) → BN ------------------------------------

@pytest.mark.parametrize("layer, add_shape, groups", [
    ("ConvTranspose", (1, 6, 1, 1), 1), ("ConvTranspose", (6, 1, 1), 2), ("Conv", (6, 1, 1), 1), ("Conv", (), 1),
    ("Conv", (1, 1, 1, 1), 3)])
def test_layer_add_bn_folds(layer, add_shape, groups):
    rng = np.random.default_rng(6)
    if layer == "ConvTranspose":
        weight = rng.standard_normal((6, 6 // groups, 2, 2)).astype(np.float32) * 0.3
        node = helper.make_node("ConvTranspose", ["x", "w"], ["c"], name="up", strides=[2, 2], group=groups)
        out = [1, 6, 8, 8]
    else:
        weight = conv_weight(rng, 6, 6 // groups)
        node = helper.make_node("Conv", ["x", "w", "conv_b"], ["c"], name="conv", pads=[1] * 4, group=groups)
        out = [1, 6, 4, 4]
    tensors = {"w": weight, "conv_b": rng.standard_normal(6).astype(np.float32),
               "a": rng.standard_normal(add_shape).astype(np.float32), **bn_tensors("bn", 6, rng)}
    nodes = [node, helper.make_node("Add", ["c", "a"], ["s"], name="add"), bn("bn", "s", "y")]
    original = model_of(nodes, [vi("x", [1, 6, 4, 4])], [vi("y", out)], tensors)
    folded, report = fold_onnx(original, check=False)
    assert (report.records[0].status, report.records[0].folded_into) == ("folded", node.name)
    assert [n.op_type for n in folded.graph.node] == [layer, "Add"]
    assert_same(original, folded, seeded_feeds(original, seed=10))


def test_add_of_a_per_element_constant_is_kept_with_its_reason():
    rng = np.random.default_rng(7)
    tensors = {"w": conv_weight(rng, 4, 3), "a": rng.standard_normal((1, 4, 5, 5)).astype(np.float32),
               **bn_tensors("bn", 4, rng)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4),
             helper.make_node("Add", ["c", "a"], ["s"], name="add"), bn("bn", "s", "y")]
    original = model_of(nodes, [vi("x", [1, 3, 5, 5])], [vi("y", [1, 4, 5, 5])], tensors)
    folded, report = fold_onnx(original)
    assert (report.records[0].status, report.records[0].reason_code) == ("kept", "shape_mismatch")
    assert "not one value per output channel" in report.records[0].reason and folded == original


def test_bn_feeding_an_add_says_so_not_weight():
    rng = np.random.default_rng(8)
    tensors = bn_tensors("bn", 4, rng)
    nodes = [bn("bn", "x", "t"), helper.make_node("Add", ["x", "t"], ["y"], name="add")]
    original = model_of(nodes, [vi("x", [1, 4, 3, 3])], [vi("y", [1, 4, 3, 3])], tensors)
    _, report = fold_onnx(original)
    record = report.records[0]
    assert record.reason_code == "no_linear_neighbour" and "weight" not in record.reason
    assert "goes to Add" in record.reason


def test_bn_with_mismatched_parameter_shapes_is_kept():
    model = conv_bn_model()
    model.graph.initializer.append(numpy_helper.from_array(np.ones(5, dtype=np.float32), "bn_m5"))
    next(n for n in model.graph.node if n.op_type == "BatchNormalization").input[3] = "bn_m5"
    _, report = fold_onnx(model, check=False)
    assert (report.records[0].status, report.records[0].reason_code) == ("kept", "shape_mismatch")


# dtypes -------------------------------------------------------------------------------------

def _within(original, folded, feeds, dtype_name):
    tolerance = tolerance_for(dtype_name)
    assert_valid(folded)
    for a, b in zip(run(original, feeds), run(folded, feeds), strict=True):
        a, b = a.astype(np.float64), b.astype(np.float64)
        assert np.abs(a - b).max() <= tolerance.atol + tolerance.rtol * np.abs(a).max()


def test_hand_built_float16_graph_folds_within_float16_tolerance():
    original = conv_bn_model(dtype=np.float16)
    folded, report = fold_onnx(original, check=False)
    assert len(report.folded) == 1
    assert {t.data_type for t in folded.graph.initializer} == {TensorProto.FLOAT16}
    _within(original, folded, seeded_feeds(original, seed=11), "float16")


def test_converted_float16_model_folds_within_float16_tolerance():
    float16 = pytest.importorskip("onnxconverter_common.float16")
    rng = np.random.default_rng(9)
    tensors = {"w": conv_weight(rng, 4, 3), "w2": conv_weight(rng, 4, 4),
               "up": rng.standard_normal((4, 4, 2, 2)).astype(np.float32),
               "a": rng.standard_normal((4, 1, 1)).astype(np.float32),
               **bn_tensors("bn1", 4, rng), **bn_tensors("bn2", 4, rng), **bn_tensors("bn3", 4, rng)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"], name="conv1", pads=[1] * 4), bn("bn1", "c1", "b1"),
             helper.make_node("Relu", ["b1"], ["r1"]), bn("bn2", "r1", "b2"),
             helper.make_node("Conv", ["b2", "w2"], ["c2"], name="conv2"),
             helper.make_node("ConvTranspose", ["c2", "up"], ["u"], name="up", strides=[2, 2]),
             helper.make_node("Add", ["u", "a"], ["s"], name="add"), bn("bn3", "s", "y")]
    float32 = model_of(nodes, [vi("x", [1, 3, 6, 6])], [vi("y", [1, 4, 8, 8])], tensors)
    original = float16.convert_float_to_float16(float32, keep_io_types=False)
    folded, report = fold_onnx(original, check=False)
    assert bn_count(original.graph) == 3 and len(report.folded) == 3 and bn_count(folded.graph) == 0
    _within(original, folded, seeded_feeds(original, seed=12), "float16")


def test_float64_gemm_folds_in_float64():
    rng = np.random.default_rng(10)
    tensors = {"w": rng.standard_normal((5, 4)), "c": rng.standard_normal(5), **bn_tensors("bn", 5, rng, dtype=np.float64)}
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["t"], name="gemm", transB=1), bn("bn", "t", "y")]
    d = TensorProto.DOUBLE
    original = model_of(nodes, [vi("x", [3, 4], d)], [vi("y", [3, 5], d)], tensors)
    folded, report = fold_onnx(original, check=False)
    assert len(report.folded) == 1
    assert {t.data_type for t in folded.graph.initializer} == {d}
    assert_same(original, folded, seeded_feeds(original, seed=13), tol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, ml_dtypes.bfloat16], ids=["float64", "bfloat16"])
def test_conv_without_an_ort_kernel_is_checked_by_the_checker_and_noted(dtype):
    original = conv_bn_model(dtype=dtype, opset=22)  # Conv takes bfloat16 from opset 22
    folded, report = fold_onnx(original, check=False)
    assert len(report.folded) == 1
    onnx.checker.check_model(folded, full_check=True)
    assert len(report.notes) == 1 and "ONNX Runtime cannot load the input model" in report.notes[0]
    # the fold's own numbers: float64 maths, one rounding to the layer's dtype
    weights = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    s = weights["bn_g"].astype(np.float64) / np.sqrt(weights["bn_v"].astype(np.float64) + 1e-5)
    expected = (weights["w"].astype(np.float64) * s[:, None, None, None]).astype(dtype)
    written = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    conv = folded.graph.node[0]
    assert written[conv.input[1]].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(written[conv.input[1]], expected)


# never a broken model --------------------------------------------------------------------------

def test_a_rewrite_that_would_break_the_model_is_refused(monkeypatch):
    real_finish = onnx_patterns.GraphFolder.finish

    def broken_finish(self, source_initializers=()):
        real_finish(self, source_initializers)
        del self.graph.initializer[:]  # a fold that loses its weights

    monkeypatch.setattr(onnx_patterns.GraphFolder, "finish", broken_finish)
    with pytest.raises(BnexportError, match="the folded model would be invalid") as caught:
        fold_onnx(conv_bn_model(), check=False)
    assert "\n" not in str(caught.value)


def test_kept_records_carry_a_known_code():
    for build in (nested_if_model, loop_model, scan_model):
        codes_are_known(fold_onnx(build(), check=False)[1])
    codes_are_known(fold_onnx(conv_bn_model(bn_inputs_as_graph_inputs=True))[1])


def test_bn_in_a_branch_after_an_outer_conv_is_kept_with_its_reason():
    rng = np.random.default_rng(11)
    tensors = {"w": conv_weight(rng, 4, 3), **bn_tensors("bn", 4, rng)}
    branch = helper.make_graph([bn("bn", "c", "t")], "then", [], [vi("t", [1, 4, 5, 5])])
    plain = helper.make_graph([helper.make_node("Identity", ["c"], ["e"])], "else", [], [vi("e", [1, 4, 5, 5])])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch, else_branch=plain)]
    original = model_of(nodes, [vi("x", [1, 3, 5, 5]), vi("cond", [], TensorProto.BOOL)], [vi("y", [1, 4, 5, 5])], tensors)
    folded, report = fold_onnx(original)
    # its input comes from the enclosing graph, and its output is the branch's output
    assert (report.records[0].status, report.records[0].reason_code) == ("kept", "graph_output")
    assert "input comes from an enclosing graph" in report.records[0].reason and folded == original


@pytest.mark.parametrize("ir", [3, 8])
def test_folded_branch_weights_live_where_the_ir_version_allows(ir):
    """IR >= 4: in the branch's own initializers. IR 3: in the main graph, listed as an input."""
    rng = np.random.default_rng(12)
    tensors = {"w": conv_weight(rng, 4, 3), **bn_tensors("bn", 4, rng)}
    branch = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4),
                                bn("bn", "c", "t")], "then", [], [vi("t", [1, 4, 5, 5])])
    plain = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["e"], name="conv_plain", pads=[1] * 4)],
                              "else", [], [vi("e", [1, 4, 5, 5])])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch, else_branch=plain)]
    original = model_of(nodes, [vi("x", [1, 3, 5, 5]), vi("cond", [], TensorProto.BOOL)], [vi("y", [1, 4, 5, 5])],
                        tensors, opset=8 if ir == 3 else 18, ir=ir, list_initializers=ir == 3)
    folded, report = fold_onnx(original, check=False)
    assert len(report.folded) == 1
    then = next(a.g for a in folded.graph.node[0].attribute if a.name == "then_branch")
    main_names = {t.name for t in folded.graph.initializer}
    if ir == 3:
        assert not then.initializer and {"w", "w_bnfolded", "c_bnfolded"} <= main_names
        assert main_names <= {i.name for i in folded.graph.input}
    else:
        assert {t.name for t in then.initializer} == {"w_bnfolded", "c_bnfolded"} and "w" in main_names
    for cond in (True, False):
        feeds = seeded_feeds(original, seed=14)
        feeds["cond"] = np.array(cond)
        assert_same(original, folded, feeds)


# through the real command ------------------------------------------------------------------

@pytest.mark.parametrize("build", [nested_if_model, lambda: _subgraph_reading_outer_constants(with_bn=False)],
                         ids=["bn-in-branches", "bn-free"])
def test_fold_command_writes_a_model_that_loads(build, tmp_path):
    from conftest import run_bnexport

    original = build()
    source, output = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(original, str(source))
    result = run_bnexport("fold", source, "-o", output, "--no-check", "--report", tmp_path / "fold.json")
    assert result.returncode == 0, result.stderr
    written = onnx.load(str(output))
    assert bn_count(written.graph) == 0
    for cond in (True, False):
        feeds = seeded_feeds(original, seed=15)
        feeds["cond"] = np.array(cond)
        assert_same(original, written, feeds)


def test_inspect_lists_batchnorms_in_subgraphs():
    from bnexport.export.onnx_info import describe_onnx

    info = describe_onnx(nested_if_model())
    assert sorted((b.name, b.foldable) for b in info.batchnorms) == [("bn_inner", True), ("bn_then", True)]
    assert info.op_counts == {"If": 1}  # the main graph's own ops
