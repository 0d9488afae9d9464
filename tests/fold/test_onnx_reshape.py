"""Token BatchNorm through a Reshape or Flatten in ONNX (LeViT): MatMul / Gemm → (Add) → Reshape → BN.

The BN folds into the layer when the Reshape keeps the layer's features as the last axis of a
2-D tensor; a Reshape or Flatten that mixes them with other axes, a BN on a tensor of another
rank, shared tensors and computed weights keep it. The oracle is ONNX Runtime with graph
optimisations off, on the original and the folded model, and eager torch.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from bnexport.fold import fold_module, fold_onnx
from bnexport.fold.onnx_patterns import ABSORBED_PREFIX
from fold.models import EXPORTERS, bn_initializers, bn_node, count_bn_nodes, ort_run, randomize_bn, relative_error

B, N, CIN, C = 2, 3, 4, 5


def token_model(*, layer: str = "MatMul", bias: str | None = None, reshape: str = "Reshape", target=None,
                axis: int = 2, batch: int = B, tokens: int = N, cin: int = CIN, channels: int = C,
                bn_channels: int | None = None, back: bool = True, extra_reader: str | None = None,
                outputs: tuple[str, ...] = (), seed: int = 0, opset: int = 18) -> onnx.ModelProto:
    """x[B, N, Cin] → MatMul(W[Cin, C]) → (Add(bias)) → Reshape(target) or Flatten(axis) → BN → Reshape to [B, N, C].

    ``layer`` "Gemm" or "MatMul2d" read x as [B·N, Cin]; ``bias`` names the Add's constant shape ("C", "1", "NC"),
    or "gemm" for a Gemm's own C; ``extra_reader`` also sums that tensor into the output.
    """
    rng = np.random.default_rng(seed)
    two_d = layer in ("Gemm", "MatMul2d")
    in_shape = [batch * tokens, cin] if two_d else [batch, tokens, cin]
    weight = (rng.standard_normal((cin, channels)) / np.sqrt(cin)).astype(np.float32)
    inits = bn_initializers("bn", bn_channels or channels, rng)
    nodes = []
    if layer == "Gemm":
        inits.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), "w"))
        gemm_inputs = ["x", "w"]
        if bias == "gemm":
            inits.append(numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "c"))
            gemm_inputs.append("c")
        nodes.append(helper.make_node("Gemm", gemm_inputs, ["m"], name="layer", transB=1, beta=0.5 if bias else 1.0))
    else:
        inits.append(numpy_helper.from_array(weight, "w"))
        nodes.append(helper.make_node("MatMul", ["x", "w"], ["m"], name="layer"))
    source = "m"
    if bias in ("C", "1", "NC"):
        shape = {"C": (channels,), "1": (1,), "NC": (tokens, channels)}[bias]
        inits.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), "b"))
        nodes.append(helper.make_node("Add", ["b", "m"], ["a"], name="bias"))
        source = "a"
    if reshape == "Flatten":
        nodes.append(helper.make_node("Flatten", [source], ["r"], name="flatten", axis=axis))
    else:
        target = [batch * tokens, channels] if target is None else target
        inits.append(numpy_helper.from_array(np.array(target, np.int64), "target"))
        nodes.append(helper.make_node("Reshape", [source, "target"], ["r"], name="flatten"))
    nodes.append(bn_node("bn", "r", "t"))
    last = "t"
    if back:
        inits.append(numpy_helper.from_array(np.array([-1, channels] if two_d else [batch, tokens, channels], np.int64),
                                             "back"))
        nodes.append(helper.make_node("Reshape", ["t", "back"], ["u"], name="back"))
        last = "u"
    if extra_reader is not None:
        nodes += [helper.make_node("ReduceSum", [extra_reader], ["s"], keepdims=0),
                  helper.make_node("Add", [last, "s"], ["y"])]
    else:
        nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(nodes, "tokens", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    inferred_graph = onnx.shape_inference.infer_shapes(model).graph
    inferred = {v.name: v for v in [*inferred_graph.value_info, *inferred_graph.output]}
    for output in model.graph.output:  # declare the output shapes, which onnx.checker's full check asks for
        if output.name in inferred:
            output.CopyFrom(inferred[output.name])
    onnx.checker.check_model(model, full_check=True)
    return model


def model_input(model: onnx.ModelProto, seed: int = 7) -> np.ndarray:
    shape = [d.dim_value or 3 for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 3


def assert_folds_exactly(original: onnx.ModelProto, *, through: str = "Reshape", folded_into: str = "layer"):
    folded, report = fold_onnx(original, check=False)
    assert [(r.status, r.folded_into, r.position, r.through) for r in report.records] == \
        [("folded", folded_into, "after", through)], report.table()
    assert f"{folded_into} (BN after it, through {through})" in report.table()
    assert count_bn_nodes(folded) == 0
    assert len(folded.graph.node) <= len(original.graph.node)
    onnx.checker.check_model(folded, full_check=True)
    layer = next(n for n in folded.graph.node if n.name == folded_into)
    assert f"{ABSORBED_PREFIX} 'bn'" in layer.doc_string
    x = model_input(original)
    assert relative_error(ort_run(original, x), ort_run(folded, x)) < 1e-5
    return folded


def kept_code(original: onnx.ModelProto) -> str:
    folded, report = fold_onnx(original, check=False)
    assert count_bn_nodes(folded) == 1 and len(report.kept) == 1
    assert report.kept[0].reason
    return report.kept[0].reason_code


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


# folds --------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [[B * N, C], [-1, C]], ids=["static", "minus-one"])
def test_biasless_matmul_reshape_bn_folds_with_the_shift_in_the_bn_place(target):
    folded = assert_folds_exactly(token_model(target=target))
    # the BN's own place now holds Add(t): the order stays topological and no node is added
    assert op_types(folded) == ["MatMul", "Reshape", "Add", "Reshape", "Identity"]
    add = folded.graph.node[2]
    assert add.input[0] == "r" and add.output[0] == "t"


def test_zero_in_the_target_copies_the_feature_dim():
    """Reshape [-1, 0] of a 2-D [rows, C] keeps dim 1, the features."""
    model = token_model(layer="MatMul2d", target=[-1, 0])
    folded = assert_folds_exactly(model)
    assert op_types(folded) == ["Gemm", "Reshape", "Reshape", "Identity"]


@pytest.mark.parametrize("bias", ["C", "1"])
@pytest.mark.parametrize("reshape", ["Reshape", "Flatten"])
def test_matmul_add_reshape_bn_folds_into_the_bias(bias, reshape):
    folded = assert_folds_exactly(token_model(bias=bias, reshape=reshape), through=reshape)
    assert op_types(folded) == ["MatMul", "Add", reshape, "Reshape", "Identity"]
    assert folded.graph.node[2].output[0] == "t"  # the Reshape writes the BN's output


@pytest.mark.parametrize("axis", [2, -1])
def test_flatten_keeping_the_last_axis_folds(axis):
    folded = assert_folds_exactly(token_model(reshape="Flatten", axis=axis), through="Flatten")
    assert op_types(folded) == ["MatMul", "Flatten", "Add", "Reshape", "Identity"]


def test_flatten_of_trailing_ones_and_features_folds():
    """[B, N, C] → Flatten(axis=1) is [B, N·C]: with N = 1 that is [B, C], the features alone."""
    assert_folds_exactly(token_model(reshape="Flatten", axis=1, tokens=1), through="Flatten")


@pytest.mark.parametrize("bias", [None, "gemm", "C"])
def test_gemm_reshape_bn_folds(bias):
    folded = assert_folds_exactly(token_model(layer="Gemm", bias=bias, target=[-1, C]))
    assert op_types(folded)[0] == "Gemm" and "Add" not in op_types(folded)[2:]


def test_biasless_matmul_on_2d_input_becomes_a_gemm():
    folded = assert_folds_exactly(token_model(layer="MatMul2d", target=[-1, C]))
    assert op_types(folded) == ["Gemm", "Reshape", "Reshape", "Identity"]


def test_the_bn_output_need_not_be_reshaped_back():
    folded = assert_folds_exactly(token_model(back=False))
    assert folded.graph.node[-1].input[0] == "t"


def test_a_dynamic_batch_folds():
    model = token_model(target=[-1, C], back=False)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    folded = assert_folds_exactly(model)
    x = np.random.default_rng(1).standard_normal((5, N, CIN)).astype(np.float32)
    assert relative_error(ort_run(model, x), ort_run(folded, x)) < 1e-5


def test_a_weight_shared_with_another_layer_is_copied():
    model = token_model(extra_reader=None)
    model.graph.node.insert(1, helper.make_node("MatMul", ["x", "w"], ["m2"], name="other"))
    model.graph.node[-1].CopyFrom(helper.make_node("Add", ["u", "m2"], ["y"]))
    folded = assert_folds_exactly(model)
    other = next(n for n in folded.graph.node if n.name == "other")
    assert other.input[1] == "w" and "w" in {t.name for t in folded.graph.initializer}


# kept ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("target, bn_channels", [([B, N * C], N * C), ([C, -1], B * N), ([B * N, C, 1], C)],
                         ids=["tokens-into-features", "features-first", "three-d"])
def test_a_reshape_that_mixes_axes_is_kept(target, bn_channels):
    assert kept_code(token_model(target=target, bn_channels=bn_channels)) == "shape_mismatch"


def test_a_flatten_that_mixes_axes_is_kept():
    assert kept_code(token_model(reshape="Flatten", axis=1, bn_channels=N * C)) == "shape_mismatch"


def test_a_target_of_unknown_rank_is_kept():
    model = token_model(back=False)
    reshape = next(n for n in model.graph.node if n.op_type == "Reshape")
    reshape.input[1] = "computed"
    model.graph.node.insert(0, helper.make_node("Cast", ["target_in"], ["computed"], to=TensorProto.INT64))
    model.graph.input.append(helper.make_tensor_value_info("target_in", TensorProto.FLOAT, ["n"]))
    assert kept_code(model) == "shape_mismatch"


@pytest.mark.parametrize("reader", ["m", "a", "r"], ids=["matmul", "add", "reshape"])
def test_a_second_reader_keeps_the_bn(reader):
    assert kept_code(token_model(bias="C", extra_reader=reader)) == "multiple_consumers"


def test_a_shape_reader_does_not_count():
    """TorchScript's reshape_as reads Shape(linear output): a reader of the shape only, which the fold keeps."""
    model = token_model(bias="C")
    model.graph.node.insert(2, helper.make_node("Shape", ["a"], ["shape_a"]))
    next(n for n in model.graph.node if n.name == "back").input[1] = "shape_a"
    onnx.checker.check_model(model, full_check=True)
    assert_folds_exactly(model)


@pytest.mark.parametrize("name", ["m", "r"])
def test_an_intermediate_graph_output_keeps_the_bn(name):
    assert kept_code(token_model(outputs=(name,))) == "graph_output"


def test_a_computed_weight_is_kept():
    model = token_model()
    model.graph.node[0].input[1] = "w_in"
    model.graph.input.append(helper.make_tensor_value_info("w_in", TensorProto.FLOAT, [CIN, C]))
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "w"))
    assert kept_code(model) == "not_constant"


def test_a_weight_the_caller_may_override_is_kept():
    model = token_model()
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [CIN, C]))
    assert kept_code(model) == "overridable_input"


def test_a_bias_that_is_not_per_feature_is_kept():
    assert kept_code(token_model(bias="NC")) == "shape_mismatch"


def test_an_add_of_a_computed_tensor_is_kept():
    model = token_model(bias="C")
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "b"))
    model.graph.node.insert(0, helper.make_node("Relu", ["x"], ["b"]))
    assert kept_code(model) == "not_constant"


def test_a_feature_count_other_than_the_bn_is_kept():
    assert kept_code(token_model(target=[-1, 1], bn_channels=1)) == "shape_mismatch"


# hypothesis over shapes ---------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 4), tokens=st.integers(1, 5), cin=st.integers(1, 6), channels=st.integers(1, 6),
       bias=st.sampled_from([None, "C", "1"]), reshape=st.sampled_from(["Reshape", "Flatten"]))
def test_any_token_shape_folds(batch, tokens, cin, channels, bias, reshape):
    model = token_model(batch=batch, tokens=tokens, cin=cin, channels=channels, bias=bias, reshape=reshape,
                        target=[-1, channels])
    folded, report = fold_onnx(model, check=False)
    assert count_bn_nodes(folded) == 0, report.table()
    assert len(folded.graph.node) <= len(model.graph.node)
    x = model_input(model)
    assert relative_error(ort_run(model, x), ort_run(folded, x)) < 1e-5


# exported torch modules ---------------------------------------------------------------------


class LinearNorm(nn.Module):
    """LeViT's token BN: a Linear on [B, N, Cin], BatchNorm1d over the flattened tokens, reshaped back."""

    def __init__(self, cin: int, channels: int, *, bias: bool):
        super().__init__()
        self.linear, self.bn = nn.Linear(cin, channels, bias=bias), nn.BatchNorm1d(channels)

    def forward(self, x):
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


def check_exported(exporter: str, module: nn.Module, x: torch.Tensor) -> None:
    original = EXPORTERS[exporter](module, x)
    assert count_bn_nodes(original) == 1
    folded, report = fold_onnx(original, check=False)
    assert count_bn_nodes(folded) == 0, report.table()
    assert report.records[0].through in ("Reshape", "Flatten") and report.records[0].folded_into_module == "linear"
    assert len(folded.graph.node) <= len(original.graph.node)
    onnx.checker.check_model(folded, full_check=True)
    got = ort_run(folded, x.numpy())
    assert relative_error(ort_run(original, x.numpy()), got) < 1e-5
    with torch.no_grad():
        assert relative_error(module(x).numpy(), got) < 1e-5


@pytest.mark.parametrize("bias", [False, True], ids=["bias-less", "bias"])
@pytest.mark.parametrize("exporter", sorted(EXPORTERS))
def test_exported_linear_norm_folds(exporter, bias):
    torch.manual_seed(0)
    module = randomize_bn(LinearNorm(6, 8, bias=bias))
    check_exported(exporter, module, torch.randn(2, 5, 6) * 3)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 3), tokens=st.integers(2, 5), cin=st.integers(1, 6), channels=st.integers(2, 6),
       bias=st.booleans(), exporter=st.sampled_from(sorted(EXPORTERS)))
def test_exported_linear_norm_of_any_shape_folds(batch, tokens, cin, channels, bias, exporter):
    torch.manual_seed(batch * 100 + tokens * 10 + cin)
    module = randomize_bn(LinearNorm(cin, channels, bias=bias), seed=channels)
    check_exported(exporter, module, torch.randn(batch, tokens, cin) * 3)


def test_the_module_fold_folds_linear_flatten_batchnorm():
    torch.manual_seed(0)
    module, x = randomize_bn(LinearNorm(6, 8, bias=False)), torch.randn(2, 5, 6)
    folded, report = fold_module(module, example_input=x, check=False)
    assert len(report.folded) == 1 and not any(isinstance(m, nn.BatchNorm1d) for m in folded.modules())
    with torch.no_grad():
        assert relative_error(module(x).numpy(), folded(x).numpy()) < 1e-5


# LeViT ----------------------------------------------------------------------------------------

LEVIT_INPUT = (1, 3, 224, 224)
# BNs of levit_128 that no fold can absorb exactly: none (every one follows a conv or a Linear, or precedes the head)
LEVIT_UNFOLDABLE: dict[str, str] = {}


@pytest.mark.slow
def test_levit_128_folds_every_batchnorm():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("levit_128", pretrained=False), seed=1)
    bn_modules = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bn_modules) == 64
    x = torch.from_numpy(np.random.default_rng(5).standard_normal(LEVIT_INPUT).astype(np.float32))
    folded_module, module_report = fold_module(model, example_input=x, check=False)
    assert sorted(r.module for r in module_report.folded) == sorted(bn_modules), module_report.table()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded_module.modules())
    with torch.no_grad():
        assert relative_error(model(x).numpy(), folded_module(x).numpy()) < 2e-5
    for exporter in sorted(EXPORTERS):
        original = EXPORTERS[exporter](model, x)
        assert count_bn_nodes(original) == len(bn_modules)
        folded, report = fold_onnx(original, check=False)
        kept = {r.module: r.reason_code for r in report.kept}
        assert kept == LEVIT_UNFOLDABLE, f"{exporter}: {report.table()}"
        assert count_bn_nodes(folded) == len(LEVIT_UNFOLDABLE)
        assert collections.Counter(r.through for r in report.folded)[
            "Flatten" if exporter == "torchscript" else "Reshape"] == 58, exporter
        assert len(folded.graph.node) < len(original.graph.node)
        assert relative_error(ort_run(original, x.numpy()), ort_run(folded, x.numpy())) < 1e-5, exporter


def test_a_quantized_weight_is_kept_and_says_so():
    original = token_model(target=[-1, C], opset=13)
    weight = next(t for t in original.graph.initializer if t.name == "w")
    q = np.random.default_rng(0).integers(-127, 128, tuple(weight.dims)).astype(np.int8)
    weight.CopyFrom(numpy_helper.from_array(q, "w_q"))
    original.graph.initializer.append(numpy_helper.from_array(np.float32(0.02), "w_scale"))
    original.graph.node.insert(0, helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], name="dq_w"))
    onnx.checker.check_model(original, full_check=True)
    folded, report = fold_onnx(original, check=False)
    assert count_bn_nodes(folded) == 1 and folded == original
    assert report.kept[0].reason_code == "not_constant"
    assert "weight is dequantized (DequantizeLinear)" in report.kept[0].reason  # not "the weight is not a constant"
