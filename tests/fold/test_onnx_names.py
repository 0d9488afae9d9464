"""Module paths of ONNX nodes (``fold.onnx_names``) and the fold report that names BNs by them.

The oracle is torch's own module list: ``named_modules()`` and the parameter names that both
exporters copy from the state dict (``layer1.0.bn1.running_mean``), never bnexport's report.
"""


import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
import torchvision
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from bnexport.export.writers import to_onnx
from bnexport.fold import FoldRecord, fold_module, fold_onnx
from bnexport.fold.onnx_names import NAME_SCOPES, module_paths
from fold.models import bn_initializers, bn_node, export_torchscript_onnx, onnx_model, randomize_bn

RESNET_INPUT = (1, 3, 32, 32)


def export_dynamo(module: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """bnexport's own ONNX writer: the dynamo exporter, BN kept, stack traces dropped."""
    return to_onnx(module, example)


EXPORTERS = {"dynamo": export_dynamo, "torchscript": export_torchscript_onnx}


def batchnorm_paths(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def resnet_layer_of(bn_path: str) -> str:
    """torchvision's ResNet naming: ``layerX.Y.bnN`` follows ``layerX.Y.convN``, ``downsample.1`` follows ``downsample.0``."""
    parent, _, name = bn_path.rpartition(".")
    layer = "0" if name == "1" else name.replace("bn", "conv")
    return f"{parent}.{layer}" if parent else layer


def bn_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "BatchNormalization"]


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10))


@pytest.fixture(scope="module", params=list(EXPORTERS))
def resnet18_onnx(request, resnet18) -> onnx.ModelProto:
    return EXPORTERS[request.param](resnet18, torch.zeros(RESNET_INPUT))


def test_resnet18_batchnorm_nodes_map_to_torch_modules(resnet18, resnet18_onnx):
    paths = module_paths(resnet18_onnx)
    nodes = bn_nodes(resnet18_onnx)
    expected = batchnorm_paths(resnet18)
    assert len(nodes) == len(expected) == 20
    assert sorted(paths[n.name] for n in nodes) == sorted(expected)
    for node in nodes:  # each node reads its own module's statistics
        assert node.input[3] == f"{paths[node.name]}.running_mean"
    convs = [n for n in resnet18_onnx.graph.node if n.op_type == "Conv"]
    assert sorted(paths[n.name] for n in convs) == sorted(name for name, m in resnet18.named_modules()
                                                          if isinstance(m, nn.Conv2d))
    assert paths[next(n.name for n in resnet18_onnx.graph.node if n.op_type == "Gemm")] == "fc"


def test_resnet18_fold_report_names_modules_and_layers(resnet18, resnet18_onnx):
    original = {n.name: n for n in resnet18_onnx.graph.node}
    _, report = fold_onnx(resnet18_onnx, check=False)
    assert len(report.folded) == 20
    assert sorted((r.module, r.folded_into_module) for r in report.records) == \
        sorted((path, resnet_layer_of(path)) for path in batchnorm_paths(resnet18))
    for record in report.records:  # the node names stay what they were, and agree with the paths
        assert original[record.batchnorm].op_type == "BatchNormalization"
        assert original[record.batchnorm].input[1] == f"{record.module}.weight"
        assert original[record.folded_into].input[1] == f"{record.folded_into_module}.weight"
    record = report.to_json()["records"][0]
    assert set(record) == {"batchnorm", "status", "folded_into", "reason", "position", "reason_code", "module",
                           "folded_into_module", "split_over", "split_over_modules", "through", "into_scale"}
    assert (record["module"], record["folded_into_module"]) == ("bn1", "conv1")


def test_resnet18_table_shows_module_and_node(resnet18_onnx):
    _, report = fold_onnx(resnet18_onnx, check=False)
    lines = report.table().splitlines()
    assert lines[0].split() == ["batchnorm", "ONNX", "node", "status", "folded", "into", "/", "reason"]
    rows = [line.split() for line in lines[2:-1]]
    first = next(r for r in report.records if r.module == "layer1.0.bn1")
    assert ["layer1.0.bn1", first.batchnorm, "folded", "layer1.0.conv1", "(BN", "after", "it)"] in rows
    assert lines[-1] == "20 of 20 BatchNorm folded"


def test_torch_fold_records_carry_module_paths(resnet18):
    _, report = fold_module(resnet18, example_input=torch.zeros(RESNET_INPUT), check=False)
    assert all(r.module == r.batchnorm and r.folded_into_module == r.folded_into for r in report.records)
    assert sorted((r.module, r.folded_into_module) for r in report.records) == \
        sorted((path, resnet_layer_of(path)) for path in batchnorm_paths(resnet18))
    assert "ONNX node" not in report.table()


class FunctionalBlock(nn.Module):
    """A conv and an F.batch_norm on the block's own buffers: no BatchNorm module."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.register_buffer("running_mean", torch.rand(3))
        self.register_buffer("running_var", torch.rand(3) + 0.5)

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.running_mean, self.running_var, training=False)


class Scopes(nn.Module):
    """A BN called twice; a module named like the TorchScript exporter's name for that second call
    (``/bn_1/…``); nested Sequentials; F.batch_norm in the top-level forward and in a block's."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.conv_b, self.conv_c = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.bn_1 = nn.BatchNorm2d(3)
        self.seq = nn.Sequential(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))
        self.register_buffer("mean", torch.rand(3))
        self.register_buffer("var", torch.rand(3) + 0.5)
        self.block = FunctionalBlock()

    def forward(self, x):
        x = self.bn(self.conv_a(x))
        x = self.bn(self.conv_b(x))
        x = self.bn_1(self.conv_c(x))
        x = F.batch_norm(self.seq(x), self.mean, self.var, training=False)
        return self.block(x)


@pytest.mark.parametrize("exporter", list(EXPORTERS))
def test_repeated_nested_and_functional_batchnorms(exporter):
    torch.manual_seed(0)
    model = randomize_bn(Scopes())
    exported = EXPORTERS[exporter](model, torch.zeros(1, 3, 4, 4))
    paths = module_paths(exported)
    # an F.batch_norm in the top-level forward has no module; one in a block's forward is the block's
    assert [paths.get(n.name) for n in bn_nodes(exported)] == ["bn", "bn", "bn_1", "seq.0.1", None, "block"]
    assert [paths[n.name] for n in exported.graph.node if n.op_type == "Conv"] == \
        ["conv_a", "conv_b", "conv_c", "seq.0.0", "block.conv"]
    _, report = fold_onnx(exported, check=False)
    assert [(r.module, r.folded_into_module) for r in report.records] == [
        ("bn", "conv_a"), ("bn", "conv_b"), ("bn_1", "conv_c"), ("seq.0.1", "seq.0.0"), (None, "seq.0.0"),
        ("block", "block.conv")]
    functional = report.records[4]
    assert functional.name == functional.batchnorm  # the table falls back to the node name


@pytest.mark.parametrize("exporter", list(EXPORTERS))
def test_timm_batchnorm_act(exporter):
    from timm.layers import BatchNormAct2d

    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4)))
    exported = EXPORTERS[exporter](model, torch.zeros(1, 3, 4, 4))
    paths = module_paths(exported)
    assert {n.op_type: paths[n.name] for n in exported.graph.node if n.op_type in ("Conv", "BatchNormalization", "Relu")} \
        == {"Conv": "0", "BatchNormalization": "1", "Relu": "1.act"}
    _, report = fold_onnx(exported, check=False)
    assert [(r.module, r.folded_into_module) for r in report.records] == [("1", "0")]


def test_torch_side_functional_batch_norm_has_no_module():
    model = Scopes().eval()
    _, report = fold_module(model, example_input=torch.zeros(1, 3, 4, 4), check=False)
    functional = {r.batchnorm: r.module for r in report.records if r.batchnorm.startswith("F.batch_norm")}
    assert functional == {"F.batch_norm(mean)": None, "F.batch_norm(block.running_mean)": None}


# hand-built graphs ---------------------------------------------------------------------------

def conv_bn_graph() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("bn", "c", "y")]
    return onnx_model(nodes, [1, 3, 4, 4], [1, 4, 4, 4], [weight, *bn_initializers("bn", 4, rng)])


def test_hand_built_graph_has_no_module_and_prints_as_before():
    model = conv_bn_graph()
    assert module_paths(model) == {}
    _, report = fold_onnx(model)
    assert (report.records[0].module, report.records[0].folded_into_module) == (None, None)
    assert report.table() == ("batchnorm  status  folded into / reason\n"
                              "---------  ------  --------------------\n"
                              "bn         folded  conv (BN after it)\n"
                              "1 of 1 BatchNorm folded")


def with_scopes(node: onnx.NodeProto, value: str) -> onnx.NodeProto:
    node.metadata_props.add(key=NAME_SCOPES, value=value)
    return node


@pytest.mark.parametrize("value, expected", [
    ("['', 'layer1', 'layer1.0', 'layer1.0.bn1', 'batch_norm']", "layer1.0.bn1"),
    ("['', 'bn@1', 'batch_norm_1']", "bn"),  # torch.export's mark of a module's second call
    ("['', 'batch_norm']", None),  # the top-level forward
    ("['batch_norm']", None),  # no module stack recorded
    ("['', 'layer1'", None),
    ("[1, 2]", None),
    ("'layer1.bn'", None),
    ("__import__('os')", None),
    ("", None),
])
def test_name_scopes_parsed_robustly(value, expected):
    model = conv_bn_graph()
    with_scopes(model.graph.node[1], value)
    assert module_paths(model).get("bn") == expected


@pytest.mark.parametrize("name, expected", [
    ("/layer2/layer2.0/downsample/downsample.1/BatchNormalization", "layer2.0.downsample.1"),
    ("/0/BatchNormalization_2", "0"),  # a Sequential at the top: its children are numbers
    ("/BatchNormalization", None),  # the top-level forward
    ("/downsample.0/BatchNormalization", None),  # not a child of the scope before it: its path is unknown
    ("/bn/batchnorm", None),  # not an op type
    ("bn/BatchNormalization", None),
    ("//BatchNormalization", None),
])
def test_torchscript_scope_names(name, expected):
    model = conv_bn_graph()
    model.graph.node[1].name = name
    assert module_paths(model).get(name) == expected


def test_reentered_scope_without_parameters_is_the_module_seen_before():
    relu = [helper.make_node("Relu", ["x"], ["r0"], name="/block/act/Relu"),
            helper.make_node("Relu", ["r0"], ["r1"], name="/block/act_1/Relu"),
            helper.make_node("Relu", ["r1"], ["y"], name="/block/conv_2/Relu")]
    graph = helper.make_graph(relu, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    assert module_paths(helper.make_model(graph)) == {"/block/act/Relu": "block.act", "/block/act_1/Relu": "block.act",
                                                      "/block/conv_2/Relu": "block.conv_2"}


def test_nodes_in_subgraphs_are_named():
    inner = with_scopes(helper.make_node("Relu", ["x"], ["t"], name="inner"), "['', 'head', 'head.act', 'relu']")
    branch = helper.make_graph([inner], "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="other")], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1])])
    if_node = helper.make_node("If", ["c"], ["y"], name="if", then_branch=branch, else_branch=other)
    graph = helper.make_graph([if_node], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                               helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    assert module_paths(helper.make_model(graph)) == {"inner": "head.act"}


def test_records_built_positionally_keep_their_meaning():
    record = FoldRecord("bn", "folded", "conv", None, "after", None)
    assert (record.folded_into, record.position, record.module, record.folded_into_module) == ("conv", "after", None, None)


def test_names_on_a_large_graph():
    """200 conv → BN pairs with exporter metadata: every node named, every fold target named."""
    rng = np.random.default_rng(0)
    nodes, initializers, source = [], [], "x"
    for i in range(200):
        initializers += [numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), f"w{i}"),
                         *bn_initializers(f"bn{i}", 4, rng)]
        conv = helper.make_node("Conv", [source, f"w{i}"], [f"c{i}"], name=f"node_conv2d_{i}")
        bn = bn_node(f"bn{i}", f"c{i}", f"b{i}" if i < 199 else "y")
        nodes += [with_scopes(conv, f"['', 'blocks', 'blocks.{i}', 'blocks.{i}.conv', 'conv2d_{i}']"),
                  with_scopes(bn, f"['', 'blocks', 'blocks.{i}', 'blocks.{i}.bn', 'batch_norm_{i}']")]
        source = f"b{i}"
    model = onnx_model(nodes, [1, 4, 2, 2], [1, 4, 2, 2], initializers)
    paths = module_paths(model)
    _, report = fold_onnx(model, check=False)
    assert len(paths) == 400 and report.records[-1].folded_into_module == "blocks.199.conv"
    assert [r.module for r in report.records] == [f"blocks.{i}.bn" for i in range(200)]
