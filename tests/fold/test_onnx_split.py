"""BN over several layers in ONNX: after a Concat of layers each layer folds its own channels; after an Add
(or Sum) of layers every layer takes the scale and one the shift. Shared, non-layer and misaligned inputs keep it.

The oracle is ONNX Runtime with graph optimisations off, on the original and the folded model, and eager torch.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from bnexport.export.onnx_info import describe_onnx
from bnexport.fold import fold_onnx
from bnexport.fold.onnx_patterns import ABSORBED_PREFIX
from fold.models import EXPORTERS, BottleneckCSP, bn_initializers, bn_node, count_bn_nodes, ort_run, randomize_bn, relative_error

IN_CHANNELS, SIZE, BATCH, FEATURES = 3, 6, 2, 4
CONV_KINDS = ["conv", "conv_nobias", "convT", "conv_add"]
DENSE_KINDS = ["gemm", "gemm_nobias", "matmul", "matmul_add"]
# the dynamo exporter takes 2 to 8 s per small module here
EXPORTER_NAMES = [pytest.param(name, marks=pytest.mark.slow) if name == "dynamo" else name for name in sorted(EXPORTERS)]


def _branch(kind: str, name: str, channels: int, rng, source: str = "x") -> tuple[list, list]:
    """Nodes and initializers of one layer reading ``source`` and writing ``name``, ``channels`` wide."""
    def init(shape, suffix):
        value = (rng.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[1:]))))).astype(np.float32)
        return numpy_helper.from_array(value, f"{name}.{suffix}")

    if kind in ("conv", "conv_nobias", "conv_add"):
        inits = [init((channels, IN_CHANNELS, 3, 3), "weight")]
        inputs = [source, f"{name}.weight"]
        if kind == "conv":
            inits.append(init((channels,), "bias"))
            inputs.append(f"{name}.bias")
        nodes = [helper.make_node("Conv", inputs, [name if kind != "conv_add" else f"{name}_c"], name=name, pads=[1] * 4)]
        if kind == "conv_add":
            inits.append(init((1, channels, 1, 1), "shift"))
            nodes.append(helper.make_node("Add", [f"{name}_c", f"{name}.shift"], [name], name=f"{name}_add"))
        return nodes, inits
    if kind == "convT":  # groups=1, kernel 3, pads 1: same spatial size as the convs
        inits = [init((IN_CHANNELS, channels, 3, 3), "weight"), init((channels,), "bias")]
        return [helper.make_node("ConvTranspose", [source, f"{name}.weight", f"{name}.bias"], [name], name=name,
                                 pads=[1] * 4)], inits
    if kind in ("gemm", "gemm_nobias"):
        inits = [init((channels, FEATURES), "weight")]
        inputs = [source, f"{name}.weight"]
        if kind == "gemm":
            inits.append(init((channels,), "bias"))
            inputs.append(f"{name}.bias")
        return [helper.make_node("Gemm", inputs, [name], name=name, transB=1, alpha=0.8, beta=1.2)], inits
    inits = [init((FEATURES, channels), "weight")]  # matmul, matmul_add
    if kind == "matmul":
        return [helper.make_node("MatMul", [source, f"{name}.weight"], [name], name=name)], inits
    inits.append(init((channels,), "bias"))
    return [helper.make_node("MatMul", [source, f"{name}.weight"], [f"{name}_m"], name=name),
            helper.make_node("Add", [f"{name}.bias", f"{name}_m"], [name], name=f"{name}_add")], inits


def split_model(kinds: list[str], channels: list[int], *, joiner: str = "Concat", axis: int = 1, seed: int = 0,
                extra_outputs: tuple[str, ...] = (), bn_channels: int | None = None, check: bool = True) -> onnx.ModelProto:
    """x → layer_i (kinds[i], channels[i] wide) → Concat(axis) / Add / Sum → BN → Identity → y;
    ``extra_outputs`` are also graph outputs."""
    rng = np.random.default_rng(seed)
    dense = kinds[0] in DENSE_KINDS
    names = [f"layer{i}" for i in range(len(kinds))]
    nodes, inits = [], []
    for kind, name, width in zip(kinds, names, channels):
        more_nodes, more_inits = _branch(kind, name, width, rng)
        nodes += more_nodes
        inits += more_inits
    if joiner == "Concat":
        nodes.append(helper.make_node("Concat", names, ["joined"], name="concat", axis=axis))
        width = sum(channels) if axis % (2 if dense else 4) == 1 else channels[0]
    elif joiner == "Sum":
        nodes.append(helper.make_node("Sum", names, ["joined"], name="sum"))
        width = max(channels)
    else:  # a chain of two-input Adds: ((layer0 + layer1) + layer2) + ...
        total = names[0]
        for i, name in enumerate(names[1:]):
            out = "joined" if i == len(names) - 2 else f"partial{i}"
            nodes.append(helper.make_node("Add", [total, name], [out], name=f"add{i}"))
            total = out
        width = max(channels)
    width = bn_channels or width
    inits += bn_initializers("bn", width, rng)
    nodes += [bn_node("bn", "joined", "t"), helper.make_node("Identity", ["t"], ["y"])]
    x_shape = [BATCH, FEATURES] if dense else [BATCH, IN_CHANNELS, SIZE, SIZE]
    y_shape = [BATCH, width] if dense else [BATCH, width, SIZE, SIZE]
    if joiner == "Concat" and axis % len(x_shape) != 1:
        y_shape[axis % len(x_shape)] *= len(kinds)
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)]
    outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"d{i}" for i in range(len(x_shape))])
                for name in extra_outputs]
    graph = helper.make_graph(nodes, "split", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def _input(model: onnx.ModelProto, seed: int = 7) -> np.ndarray:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 3


def assert_folds_exactly(original: onnx.ModelProto, *, through: str, layers: list[str]):
    folded, report = fold_onnx(original, check=False)
    [record] = report.records
    assert (record.status, record.position, record.through, record.split_over) == ("folded", "after", through, layers)
    assert f"split over {', '.join(layers)} ({through})" in report.table()
    assert count_bn_nodes(folded) == 0
    onnx.checker.check_model(folded, full_check=True)
    nodes = {n.name: n for n in folded.graph.node}
    assert all(f"{ABSORBED_PREFIX} 'bn'" in nodes[name].doc_string for name in layers)
    x = _input(original)
    assert relative_error(ort_run(original, x), ort_run(folded, x)) < 1e-5
    return folded


def kept(original: onnx.ModelProto) -> tuple[str, str]:
    folded, report = fold_onnx(original, check=False)
    assert count_bn_nodes(folded) == 1 and len(report.kept) == 1
    assert folded == original  # nothing was half-written
    return report.kept[0].reason_code, report.kept[0].reason


@pytest.mark.parametrize("kinds, channels", [
    (["conv", "conv"], [2, 5]),
    (["conv_nobias", "conv", "convT"], [1, 4, 3]),
    (["convT", "conv_add", "conv_nobias"], [3, 1, 2]),
    (["gemm", "gemm_nobias"], [3, 2]),
    (["matmul", "gemm", "matmul_add"], [2, 3, 1]),
], ids=["conv-conv", "conv-conv-convT", "convT-convadd-conv", "gemm-gemm", "matmul-gemm-matmuladd"])
def test_bn_after_a_concat_splits_over_its_layers(kinds, channels):
    layers = [f"layer{i}" for i in range(len(kinds))]
    original = split_model(kinds, channels)
    folded = assert_folds_exactly(original, through="Concat", layers=layers)
    nodes = {n.name: n for n in folded.graph.node}
    assert nodes["concat"].output[0] == "t"  # the Concat writes the BN's output now
    if "matmul" in kinds:  # a bias-less MatMul takes its shift slice as a Gemm's C
        assert nodes[layers[kinds.index("matmul")]].op_type == "Gemm"


def test_a_negative_concat_axis_on_channels_folds():
    assert_folds_exactly(split_model(["conv", "conv_nobias"], [2, 3], axis=-3), through="Concat", layers=["layer0", "layer1"])


@pytest.mark.parametrize("joiner", ["Add", "Sum"])
@pytest.mark.parametrize("kinds", [["conv", "conv"], ["conv_nobias", "conv_nobias"], ["conv_nobias", "convT", "conv_add"],
                                   ["gemm_nobias", "matmul_add", "matmul"]],
                         ids=["conv-conv", "bias-less", "conv-convT-convadd", "gemm-matmul"])
def test_bn_after_an_add_of_layers_scales_every_layer_and_shifts_one(joiner, kinds):
    original = split_model(kinds, [3] * len(kinds), joiner=joiner)
    layers = [f"layer{i}" for i in range(len(kinds))]
    folded = assert_folds_exactly(original, through=joiner, layers=layers)
    if kinds == ["conv_nobias", "conv_nobias"]:  # one layer takes the shift as a new bias, the other stays bias-less
        assert sorted(len(n.input) for n in folded.graph.node if n.op_type == "Conv") == [2, 3]


def test_an_add_broadcast_over_spatial_axes_folds():
    """A 1×1 map added to a 6×6 one: s and t are the same at every position, so the sum still folds."""
    rng = np.random.default_rng(1)
    model = split_model(["conv", "conv"], [3, 3], joiner="Add")
    wide = next(t for t in model.graph.initializer if t.name == "layer1.weight")
    wide.CopyFrom(numpy_helper.from_array(rng.standard_normal((3, IN_CHANNELS, SIZE, SIZE)).astype(np.float32) / 10,
                                          "layer1.weight"))
    conv = next(n for n in model.graph.node if n.name == "layer1")
    del conv.attribute[:]  # no pads: the 6×6 kernel gives a 1×1 output
    onnx.checker.check_model(model, full_check=True)
    assert_folds_exactly(model, through="Add", layers=["layer0", "layer1"])


def test_an_add_that_broadcasts_along_channels_is_kept():
    code, reason = kept(split_model(["conv", "conv"], [1, 4], joiner="Add"))
    assert code == "shape_mismatch" and "channels" in reason


@pytest.mark.parametrize("joiner", ["Concat", "Add"])
def test_a_layer_read_elsewhere_keeps_the_bn(joiner):
    model = split_model(["conv", "conv"], [2, 2], joiner=joiner)
    model.graph.node.insert(len(model.graph.node) - 1, helper.make_node("Relu", ["layer1"], ["side"]))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    code, reason = kept(model)
    assert code == "multiple_consumers" and "layer1" in reason


@pytest.mark.parametrize("joiner", ["Concat", "Add"])
def test_a_layer_that_is_a_graph_output_keeps_the_bn(joiner):
    assert kept(split_model(["conv", "conv"], [2, 2], joiner=joiner, extra_outputs=("layer0",)))[0] == "graph_output"


def test_a_conv_read_by_its_add_and_something_else_keeps_the_bn():
    model = split_model(["conv_add", "conv"], [2, 3])
    model.graph.output.append(helper.make_tensor_value_info("layer0_c", TensorProto.FLOAT, None))
    assert kept(model)[0] == "graph_output"


@pytest.mark.parametrize("joiner", ["Concat", "Add"])
def test_the_joined_tensor_read_elsewhere_keeps_the_bn(joiner):
    model = split_model(["conv", "conv"], [2, 2], joiner=joiner)
    model.graph.node.insert(len(model.graph.node) - 1, helper.make_node("Relu", ["joined"], ["side"]))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    assert kept(model)[0] == "multiple_consumers"
    assert kept(split_model(["conv", "conv"], [2, 2], joiner=joiner, extra_outputs=("joined",)))[0] == "graph_output"


@pytest.mark.parametrize("joiner", ["Concat", "Add"])
def test_the_same_layer_twice_keeps_the_bn(joiner):
    model = split_model(["conv", "conv"], [2, 2], joiner=joiner)
    node = next(n for n in model.graph.node if n.name in ("concat", "add0"))
    node.input[1] = "layer0"
    code, reason = kept(model)
    assert code == "multiple_consumers" and "'layer0' more than once" in reason


@pytest.mark.parametrize("axis", [2, -1])
def test_a_concat_along_another_axis_is_kept(axis):
    code, reason = kept(split_model(["conv", "conv"], [2, 2], axis=axis))
    assert code == "shape_mismatch" and f"axis {axis}" in reason


def test_channel_counts_that_do_not_add_up_are_kept():
    code, reason = kept(split_model(["conv", "conv"], [2, 3], bn_channels=4, check=False))
    assert code == "shape_mismatch" and "2 + 3" in reason


@pytest.mark.parametrize("joiner, source, words", [
    ("Concat", "x", "'x' is a graph input"), ("Concat", "relu", "'relu' comes from Relu"),
    ("Concat", "const", "'const' is a constant"), ("Add", "x", "'x' is a graph input"),
    ("Add", "relu", "'relu' comes from Relu")])
def test_an_input_that_is_no_layer_keeps_the_bn(joiner, source, words):
    """DenseNet concatenates the block's input with new features; a ResNet adds the identity."""
    model = split_model(["conv", "conv"], [IN_CHANNELS, IN_CHANNELS], joiner=joiner)
    node = next(n for n in model.graph.node if n.name in ("concat", "add0"))
    node.input[0] = source
    kept_nodes = [n for n in model.graph.node if not n.name.startswith("layer0")]
    del model.graph.node[:]
    model.graph.node.extend([helper.make_node("Relu", ["x"], ["relu"]), *kept_nodes])
    const = np.ones((BATCH, IN_CHANNELS, SIZE, SIZE), np.float32)
    model.graph.initializer.append(numpy_helper.from_array(const, "const"))
    code, reason = kept(model)
    assert (code, words in reason) == ("no_linear_neighbour", True), reason


def test_an_add_of_a_layer_and_a_constant_still_folds_into_that_layer():
    model = split_model(["conv_add"], [3], joiner="Sum")  # Conv → Add(constant) → Sum(one input) → BN
    sum_node = next(n for n in model.graph.node if n.op_type == "Sum")
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    bn.input[0] = "layer0"
    model.graph.node.remove(sum_node)
    folded, report = fold_onnx(model, check=False)
    assert (report.records[0].status, report.records[0].folded_into, report.records[0].split_over) == \
        ("folded", "layer0", None)
    x = _input(model)
    assert relative_error(ort_run(model, x), ort_run(folded, x)) < 1e-5


@settings(max_examples=25)
@given(joiner=st.sampled_from(["Concat", "Add", "Sum"]), dense=st.booleans(), data=st.data())
def test_any_split_folds(joiner, dense, data):
    count = data.draw(st.integers(2, 4), label="branches")
    kinds = data.draw(st.lists(st.sampled_from(DENSE_KINDS if dense else CONV_KINDS), min_size=count, max_size=count),
                      label="kinds")
    if joiner == "Concat":
        channels = data.draw(st.lists(st.integers(1, 4), min_size=count, max_size=count), label="channels")
    else:
        channels = [data.draw(st.integers(1, 4), label="channels")] * count
    original = split_model(kinds, channels, joiner=joiner, seed=count)
    folded, report = fold_onnx(original, check=False)
    assert count_bn_nodes(folded) == 0, report.table()
    assert report.records[0].split_over == [f"layer{i}" for i in range(count)]
    x = _input(original, seed=5)
    assert relative_error(ort_run(original, x), ort_run(folded, x)) < 1e-5


class InceptionLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 1)
        self.conv_b = nn.Conv2d(3, 5, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(9)

    def forward(self, x):
        return self.bn(torch.cat([self.conv_a(x), self.conv_b(x)], 1))


class TwoBranchSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.conv_b = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.conv_a(x) + self.conv_b(torch.relu(x)))


class LinearConcat(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc_a, self.fc_b = nn.Linear(4, 3), nn.Linear(4, 2, bias=False)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(torch.cat([self.fc_a(x), self.fc_b(x)], 1))


@pytest.mark.parametrize("module, shape, through", [(InceptionLike, (2, 3, 8, 8), "Concat"),
                                                    (TwoBranchSum, (2, 3, 8, 8), "Add"),
                                                    (LinearConcat, (3, 4), "Concat")],
                         ids=["inception-like", "two-branch-sum", "linear-concat"])
@pytest.mark.parametrize("exporter", EXPORTER_NAMES)
def test_exported_splits_fold(exporter, module, shape, through):
    model = randomize_bn(module())
    original = EXPORTERS[exporter](model, torch.zeros(shape))
    assert count_bn_nodes(original) == 1
    folded, report = fold_onnx(original, check=False)
    [record] = report.records
    assert count_bn_nodes(folded) == 0, report.table()
    layers = [name for name, child in model.named_children() if not isinstance(child, nn.BatchNorm1d | nn.BatchNorm2d)]
    assert (record.through, record.split_over_modules, record.module) == (through, layers, "bn")
    assert f"split over {', '.join(layers)} ({through})" in report.table()
    [listed] = describe_onnx(original).batchnorms  # what `bnexport inspect` shows before any fold
    assert listed.foldable and listed.detail == f"split over {', '.join(layers)} ({through})"
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32) * 3
    assert relative_error(ort_run(original, x), ort_run(folded, x)) < 1e-5
    with torch.no_grad():
        assert relative_error(model(torch.from_numpy(x)).numpy(), ort_run(folded, x)) < 1e-5


class DenseLike(nn.Module):
    """DenseNet's layer: the block input concatenated with new features, then normalised."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(7)

    def forward(self, x):
        return self.bn(torch.cat([torch.relu(x), self.conv(x)], 1)).relu()


@pytest.mark.parametrize("exporter", EXPORTER_NAMES)
def test_an_exported_dense_concat_is_kept(exporter):
    original = EXPORTERS[exporter](randomize_bn(DenseLike()), torch.zeros(1, 3, 6, 6))
    folded, report = fold_onnx(original, check=False)
    assert count_bn_nodes(folded) == 1
    assert report.kept[0].reason_code == "no_linear_neighbour" and "comes from Relu" in report.kept[0].reason


def test_a_concat_of_quantized_layers_is_kept_and_says_so():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (width, IN_CHANNELS, 1, 1)).astype(np.int8), f"q{i}")
             for i, width in enumerate((3, 5))]
    inits += [numpy_helper.from_array(np.float32(0.02), "delta"), *bn_initializers("bn", 8, rng)]
    nodes = [helper.make_node("DequantizeLinear", [f"q{i}", "delta"], [f"w{i}"], name=f"dq{i}") for i in range(2)]
    nodes += [helper.make_node("Conv", ["x", f"w{i}"], [f"c{i}"], name=f"conv{i}") for i in range(2)]
    nodes += [helper.make_node("Concat", ["c0", "c1"], ["joined"], name="concat", axis=1), bn_node("bn", "joined", "y")]
    graph = helper.make_graph(nodes, "quantized_concat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    folded, report = fold_onnx(model, check=False)
    assert count_bn_nodes(folded) == 1 and folded == model
    assert report.kept[0].reason_code == "not_constant"
    assert "'conv0' is dequantized (DequantizeLinear)" in report.kept[0].reason  # not "the weight is not a constant"


@pytest.mark.parametrize("exporter", EXPORTER_NAMES)
def test_an_exported_yolov5_csp_bottleneck_folds_every_bn(exporter):
    model = randomize_bn(BottleneckCSP())
    original = EXPORTERS[exporter](model, torch.zeros(1, 4, 8, 8))
    assert count_bn_nodes(original) == 5
    folded, report = fold_onnx(original, check=False)
    assert count_bn_nodes(folded) == 0, report.table()
    [record] = [r for r in report.records if r.module == "bn"]
    assert (record.split_over_modules, record.through) == (["cv3", "cv2"], "Concat")
    x = np.random.default_rng(4).standard_normal((1, 4, 8, 8)).astype(np.float32)
    assert relative_error(ort_run(original, x), ort_run(folded, x)) < 1e-5
    with torch.no_grad():
        assert relative_error(model(torch.from_numpy(x)).numpy(), ort_run(folded, x)) < 1e-5
