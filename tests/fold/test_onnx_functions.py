"""BatchNormalization inside model-local ONNX functions: folded at every call site, or kept with a reason.

Hand-built functions hold their weights as Constant nodes or take them as inputs bound at each
call site; the TorchScript exporter writes the second kind with ``export_modules_as_functions``.
The oracle is ONNX Runtime with graph optimisations off on the original model, and eager torch.
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

from bnexport.fold import REASON_CODES, fold_onnx, onnx_patterns
from bnexport.fold.onnx_patterns import ABSORBED_PREFIX
from fold.models import randomize_bn, relative_error
from fold.onnx_oracle import assert_valid, bn_count, bn_tensors, run, seeded_feeds

F32 = TensorProto.FLOAT
DOMAIN = "local"
OPSETS = [helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)]


def vi(name, shape):
    return helper.make_tensor_value_info(name, F32, shape)


def conv_bn_function(name="ConvBn", *, bias=True):
    """y = Relu(BN(Conv(x, w[, b]))), every weight a function input."""
    weights = ["w", "b"] if bias else ["w"]
    return helper.make_function(
        DOMAIN, name, ["x", *weights, "g", "beta", "m", "v"], ["y"],
        [helper.make_node("Conv", ["x", *weights], ["c"], name="f_conv", pads=[1] * 4),
         helper.make_node("BatchNormalization", ["c", "g", "beta", "m", "v"], ["n"], name="f_bn"),
         helper.make_node("Relu", ["n"], ["y"], name="f_relu")],
        opset_imports=[helper.make_opsetid("", 18)])


def site_tensors(prefix, channels, rng, *, bias=True):
    tensors = {f"{prefix}_w": (rng.standard_normal((channels, channels, 3, 3)) / (3 * np.sqrt(channels))).astype(np.float32),
               **bn_tensors(prefix, channels, rng)}
    if bias:
        tensors[f"{prefix}_cb"] = rng.standard_normal(channels).astype(np.float32)
    return tensors


def call(prefix, source, output, *, bias=True, op="ConvBn", weight=None):
    weights = [weight or f"{prefix}_w", *([f"{prefix}_cb"] if bias else [])]
    return helper.make_node(op, [source, *weights, *(f"{prefix}_{k}" for k in "gbmv")], [output], name=f"call_{prefix}",
                            domain=DOMAIN)


def model_of(nodes, tensors, functions, *, channels=4, inputs=(), size=5, ir=None):
    graph = helper.make_graph(nodes, "g", [vi("x", [1, channels, size, size]), *inputs], [vi("y", [1, channels, size, size])],
                              [numpy_helper.from_array(v, k) for k, v in tensors.items()])
    model = helper.make_model(graph, opset_imports=OPSETS, functions=functions)
    if ir is not None:
        model.ir_version = ir
    onnx.checker.check_model(model, full_check=True)
    return model


def chain(count, channels=4, *, bias=True, seed=0):
    """``count`` calls of ConvBn in a row, each binding weights of its own."""
    rng = np.random.default_rng(seed)
    tensors, nodes = {}, []
    for k in range(count):
        tensors |= site_tensors(f"s{k}", channels, rng, bias=bias)
        nodes.append(call(f"s{k}", "x" if k == 0 else f"h{k}", "y" if k == count - 1 else f"h{k + 1}", bias=bias))
    return model_of(nodes, tensors, [conv_bn_function(bias=bias)], channels=channels)


def function_bns(model):
    return {f.name: bn_count(f) for f in model.functions}


def assert_exact(original, folded, *, tol=1e-5, feeds=None):
    assert_valid(folded)
    feeds = feeds or seeded_feeds(original, seed=3)
    for reference, candidate in zip(run(original, feeds), run(folded, feeds), strict=True):
        assert relative_error(reference, candidate) < tol


def codes_are_known(report):
    for record in report.kept:
        assert record.reason_code in REASON_CODES and record.reason


# weights bound at the call sites -------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_weights_bound_at_each_call_site_fold_at_each(count, bias):
    original = chain(count, bias=bias)
    folded, report = fold_onnx(original)
    assert function_bns(folded) == {"ConvBn": 0}
    assert [(r.batchnorm, r.status) for r in report.records] == [(f"call_s{k}/f_bn", "folded") for k in range(count)]
    assert [r.folded_into for r in report.records] == [f"call_s{k}/f_conv" for k in range(count)]
    # the BN's four parameters are no longer function inputs, nor read at any call site
    inputs = list(folded.functions[0].input)
    assert inputs[:2] == ["x", "w"] and len(inputs) == 3 and (inputs[2] == "b") == bias
    for node in folded.graph.node:
        assert len(node.input) == 3
    names = {t.name for t in folded.graph.initializer}
    assert not any(name.endswith(("_g", "_b", "_m", "_v")) for name in names)
    conv = next(n for n in folded.functions[0].node if n.op_type == "Conv")
    assert conv.doc_string.startswith(ABSORBED_PREFIX)
    assert_exact(original, folded)


def test_each_call_site_gets_its_own_numbers():
    original = chain(2)
    folded, _ = fold_onnx(original)
    tensors = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    # independent oracle: the fold of each site's weight from its own BN statistics
    source = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in original.graph.initializer}
    for k in range(2):
        g, b, m, v = (source[f"s{k}_{p}"] for p in "gbmv")
        s = g / np.sqrt(v + 1e-5)
        np.testing.assert_allclose(tensors[f"s{k}_w"], source[f"s{k}_w"] * s[:, None, None, None], rtol=1e-6)
        np.testing.assert_allclose(tensors[f"s{k}_cb"], (source[f"s{k}_cb"] - m) * s + b, rtol=1e-5, atol=1e-6)


def test_a_weight_two_call_sites_share_is_copied_for_each():
    rng = np.random.default_rng(1)
    tensors = {**site_tensors("s0", 4, rng), **site_tensors("s1", 4, rng)}
    del tensors["s1_w"]
    nodes = [call("s0", "x", "h"), call("s1", "h", "h2", weight="s0_w"),
             helper.make_node("Conv", ["h2", "s0_w"], ["y"], name="plain", pads=[1] * 4)]  # a third reader
    original = model_of(nodes, tensors, [conv_bn_function()])
    folded, report = fold_onnx(original)
    assert len(report.folded) == 2
    tensors_after = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    np.testing.assert_array_equal(tensors_after["s0_w"], tensors["s0_w"])  # the plain Conv still reads it
    calls = [n for n in folded.graph.node if n.domain == DOMAIN]
    assert calls[0].input[1] != calls[1].input[1] and "s0_w" not in (calls[0].input[1], calls[1].input[1])
    assert_exact(original, folded)


def test_a_call_site_binding_one_tensor_twice_keeps_the_other_binding():
    """The same initializer is the conv bias and a value the body adds after the BN: the bias is rewritten as a copy."""
    rng = np.random.default_rng(2)
    function = conv_bn_function()
    function.input.append("k")
    function.node[2].output[0] = "r"
    function.node.append(helper.make_node("Add", ["r", "k"], ["y"], name="f_add"))
    tensors = site_tensors("s0", 5, rng)
    node = call("s0", "x", "y")
    node.input.append("s0_cb")  # k ← the conv bias, broadcast over the last axis
    original = model_of([node], tensors, [function], channels=5)
    folded, report = fold_onnx(original)
    assert len(report.folded) == 1
    after = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    np.testing.assert_array_equal(after["s0_cb"], tensors["s0_cb"])
    assert_exact(original, folded)


# call sites that cannot fold -------------------------------------------------------------------

def test_a_call_site_whose_weight_is_a_graph_input_keeps_the_original_function():
    rng = np.random.default_rng(3)
    tensors = {**site_tensors("s0", 4, rng), **site_tensors("s1", 4, rng)}
    del tensors["s1_w"]
    nodes = [call("s0", "x", "h"), call("s1", "h", "y", weight="w_in")]
    original = model_of(nodes, tensors, [conv_bn_function()], inputs=[vi("w_in", [4, 4, 3, 3])])
    folded, report = fold_onnx(original)
    assert [(r.batchnorm, r.status, r.reason_code) for r in report.records] == [
        ("call_s0/f_bn", "folded", None), ("call_s1/f_bn", "kept", "not_constant")]
    assert "local.ConvBn" in report.records[1].reason and "call_s1" in report.records[1].reason
    # the foldable call site runs a folded copy; the other still runs the original, BN and all
    assert function_bns(folded) == {"ConvBn": 1, "ConvBn_bnfolded": 0}
    assert [n.op_type for n in folded.graph.node] == ["ConvBn_bnfolded", "ConvBn"]
    feeds = seeded_feeds(original, seed=3)
    assert_exact(original, folded, feeds=feeds)


def test_no_foldable_call_site_leaves_the_model_untouched():
    rng = np.random.default_rng(4)
    tensors = site_tensors("s0", 4, rng)
    del tensors["s0_w"]
    original = model_of([call("s0", "x", "y", weight="w_in")], tensors, [conv_bn_function()],
                        inputs=[vi("w_in", [4, 4, 3, 3])])
    folded, report = fold_onnx(original)
    assert folded == original
    assert [(r.status, r.reason_code) for r in report.records] == [("kept", "not_constant")]


def test_a_bound_initializer_that_is_also_a_graph_input_is_overridable():
    original = chain(1)
    original.graph.input.append(vi("s0_m", [4]))
    folded, report = fold_onnx(original)
    assert folded == original and [r.reason_code for r in report.records] == ["overridable_input"]
    folded, report = fold_onnx(original, fold_overridable=True)
    assert len(report.folded) == 1 and function_bns(folded) == {"ConvBn": 0}
    assert "s0_m" in {t.name for t in folded.graph.initializer}  # a caller may still feed it
    assert_exact(original, folded)


def test_a_function_nobody_calls_is_reported_and_kept():
    original = model_of([helper.make_node("Relu", ["x"], ["y"])], {}, [conv_bn_function()])
    folded, report = fold_onnx(original)
    assert folded == original
    assert [(r.batchnorm, r.status, r.reason_code) for r in report.records] == [("f_bn", "kept", "in_function")]
    assert "no node calls" in report.records[0].reason


def test_a_body_reading_the_calls_attributes_is_kept():
    function = conv_bn_function()
    epsilon = helper.make_attribute_ref("epsilon", onnx.AttributeProto.FLOAT)
    function.node[1].attribute.append(epsilon)
    function.attribute_proto.append(helper.make_attribute("epsilon", 1e-3))
    rng = np.random.default_rng(6)
    original = model_of([call("s0", "x", "y")], site_tensors("s0", 4, rng), [function])
    folded, report = fold_onnx(original)
    assert folded == original
    assert [r.reason_code for r in report.records] == ["in_function"] and "ref_attr_name" in report.records[0].reason


def test_a_function_called_from_another_function_keeps_that_call_site():
    rng = np.random.default_rng(7)
    outer = helper.make_function(
        DOMAIN, "Outer", ["x", "w", "b", "g", "beta", "m", "v"], ["y"],
        [helper.make_node("ConvBn", ["x", "w", "b", "g", "beta", "m", "v"], ["y"], name="inner_call", domain=DOMAIN)],
        opset_imports=OPSETS)
    tensors = {**site_tensors("s0", 4, rng), **site_tensors("s1", 4, rng)}
    outer_call = helper.make_node("Outer", ["h", *(f"s1_{k}" for k in ("w", "cb", "g", "b", "m", "v"))], ["y"],
                                  name="outer_call", domain=DOMAIN)
    original = model_of([call("s0", "x", "h"), outer_call], tensors, [conv_bn_function(), outer])
    folded, report = fold_onnx(original)
    assert [(r.batchnorm, r.status, r.reason_code) for r in report.records] == [
        ("call_s0/f_bn", "folded", None), ("inner_call/f_bn", "kept", "in_function")]
    assert "local.Outer" in report.records[1].reason
    assert function_bns(folded) == {"ConvBn": 1, "Outer": 0, "ConvBn_bnfolded": 0}
    assert_exact(original, folded)


# weights inside the body --------------------------------------------------------------------

def constant_body_function(rng, channels=4):
    """Conv → BN with every weight a Constant node of the body."""
    w = (rng.standard_normal((channels, channels, 1, 1)) / np.sqrt(channels)).astype(np.float32)
    params = bn_tensors("p", channels, rng)
    constants = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))
                 for name, value in {"w": w, **params}.items()]
    return helper.make_function(
        DOMAIN, "Inner", ["x"], ["y"],
        [*constants, helper.make_node("Conv", ["x", "w"], ["c"], name="f_conv"),
         helper.make_node("BatchNormalization", ["c", *params], ["y"], name="f_bn")],
        opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("count", [1, 2])
def test_weights_inside_the_body_fold_into_constants_of_the_body(count):
    rng = np.random.default_rng(8)
    nodes = [helper.make_node("Inner", ["x" if k == 0 else f"h{k}"], ["y" if k == count - 1 else f"h{k + 1}"],
                              name=f"site{k}", domain=DOMAIN) for k in range(count)]
    original = model_of(nodes, {}, [constant_body_function(rng)])
    folded, report = fold_onnx(original)
    assert [(r.batchnorm, r.status) for r in report.records] == [(f"site{k}/f_bn", "folded") for k in range(count)]
    body = folded.functions[0]
    assert bn_count(body) == 0 and list(body.input) == ["x"] and len(folded.functions) == 1
    assert {n.op_type for n in body.node} == {"Constant", "Conv"}
    assert len(folded.graph.initializer) == 0  # nothing moved out of the body
    assert_exact(original, folded)


def test_a_function_called_inside_an_if_branch_folds_with_outer_weights():
    rng = np.random.default_rng(9)
    tensors = site_tensors("s0", 4, rng)
    then_branch = helper.make_graph([call("s0", "x", "t")], "then", [], [vi("t", [1, 4, 5, 5])])
    else_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [vi("e", [1, 4, 5, 5])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch)]
    original = model_of(nodes, tensors, [conv_bn_function()], inputs=[helper.make_tensor_value_info("cond", TensorProto.BOOL, [])])
    folded, report = fold_onnx(original)
    assert [(r.batchnorm, r.status) for r in report.records] == [("call_s0/f_bn", "folded")]
    assert function_bns(folded) == {"ConvBn": 0}
    for cond in (True, False):
        feeds = seeded_feeds(original, seed=5)
        feeds["cond"] = np.array(cond)
        assert_exact(original, folded, feeds=feeds)


def test_bn_before_a_conv_inside_a_function_folds_at_each_call_site():
    """Another pattern than Conv → BN: BN → Conv without padding, weights bound at two call sites."""
    rng = np.random.default_rng(10)
    function = helper.make_function(
        DOMAIN, "BnConv", ["x", "g", "beta", "m", "v", "w"], ["y"],
        [helper.make_node("BatchNormalization", ["x", "g", "beta", "m", "v"], ["n"], name="f_bn"),
         helper.make_node("Conv", ["n", "w"], ["y"], name="f_conv", kernel_shape=[1, 1])],
        opset_imports=[helper.make_opsetid("", 18)])
    tensors, nodes = {}, []
    for k in range(2):
        tensors |= {**bn_tensors(f"s{k}", 4, rng), f"s{k}_w": rng.standard_normal((4, 4, 1, 1)).astype(np.float32)}
        nodes.append(helper.make_node("BnConv", ["x" if k == 0 else "h", *(f"s{k}_{p}" for p in "gbmvw")],
                                      ["h" if k == 0 else "y"], name=f"call{k}", domain=DOMAIN))
    original = model_of(nodes, tensors, [function])
    folded, report = fold_onnx(original)
    assert [(r.status, r.position) for r in report.records] == [("folded", "before")] * 2
    assert function_bns(folded) == {"BnConv": 0} and list(folded.functions[0].input)[:2] == ["x", "w"]
    assert_exact(original, folded)


def test_a_model_without_functions_never_looks_at_them(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("looked for functions")

    monkeypatch.setattr(onnx_patterns, "functions_hold_batchnorm", fail)
    monkeypatch.setattr(onnx_patterns, "fold_functions", fail)
    rng = np.random.default_rng(11)
    tensors = site_tensors("s0", 4, rng)
    nodes = [helper.make_node("Conv", ["x", "s0_w", "s0_cb"], ["c"], pads=[1] * 4),
             helper.make_node("BatchNormalization", ["c", *(f"s0_{k}" for k in "gbmv")], ["y"])]
    _, report = fold_onnx(model_of(nodes, tensors, []))
    assert len(report.folded) == 1


@settings(max_examples=15)
@given(count=st.integers(1, 4), channels=st.integers(1, 6), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_any_number_of_call_sites_folds_exactly(count, channels, bias, seed):
    original = chain(count, channels, bias=bias, seed=seed)
    folded, report = fold_onnx(original, check=False)
    assert len(report.folded) == count and function_bns(folded) == {"ConvBn": 0}
    codes_are_known(report)
    assert_exact(original, folded)


# the TorchScript exporter's functions -------------------------------------------------------------

class ConvBnBlock(nn.Module):
    def __init__(self, channels: int, bias: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Blocks(nn.Module):
    def __init__(self, bias: bool, count: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.blocks = nn.Sequential(*(ConvBnBlock(4, bias) for _ in range(count)))
        self.bn_stem = nn.BatchNorm2d(4)  # in the main graph: folds as before, beside the functions

    def forward(self, x):
        return self.blocks(self.bn_stem(self.stem(x)))


def export_with_functions(model: nn.Module, example: torch.Tensor, block: type) -> onnx.ModelProto:
    """The TorchScript exporter's file with every ``block`` written as a model-local function."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buffer, dynamo=False, export_modules_as_functions={block},
                          opset_version=17, do_constant_folding=False, input_names=["x"], output_names=["y"])
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("bias", [True, False])
def test_torchscript_export_modules_as_functions_folds_every_block(bias):
    model = randomize_bn(Blocks(bias), seed=1)
    example = torch.randn(2, 3, 8, 8)
    original = export_with_functions(model, example, ConvBnBlock)
    assert [f.name for f in original.functions] == ["ConvBnBlock"] and bn_count(original.functions[0]) == 1
    folded, report = fold_onnx(original)
    assert sum(bn_count(f) for f in folded.functions) + bn_count(folded.graph) == 0
    assert sorted((r.module, r.folded_into_module) for r in report.records if r.module != "bn_stem") == [
        (f"blocks.{k}.bn", f"blocks.{k}.conv") for k in range(3)]
    assert len(report.folded) == 4
    assert_exact(original, folded)
    with torch.no_grad():
        eager = model(example).numpy()
    assert relative_error(eager, run(folded, {"x": example.numpy()})[0]) < 1e-5


class ConvBnReluModuleBlock(nn.Module):
    """Ends with a ReLU module: the TorchScript exporter names each call ``/blocks/blocks.0/relu/…Block``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


def test_module_paths_come_from_the_bound_tensors_when_the_call_is_named_after_a_child():
    model = randomize_bn(nn.Sequential(*(ConvBnReluModuleBlock(4) for _ in range(2))), seed=2)
    example = torch.randn(1, 4, 6, 6)
    original = export_with_functions(model, example, ConvBnReluModuleBlock)
    assert all(node.name.endswith("/relu/ConvBnReluModuleBlock") for node in original.graph.node)
    folded, report = fold_onnx(original)
    assert [(r.module, r.folded_into_module) for r in report.records] == [(f"{k}.bn", f"{k}.conv") for k in range(2)]
    assert_exact(original, folded)
