"""The folding graph figure on bnexport's own exports (SimpleCNN and ResNet-18), and on a 120-BatchNorm chain."""

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from PIL import Image

from bnexport.export import writers as export
from bnexport.fold import fold_onnx
from bnexport.model import ModelSpec, build_model
from bnexport.viz.common import PNG_DPI
from bnexport.viz.graph import (ABSORBED, BN, IO, MAX_FIGURE_PX, absorbed_batchnorms, bn_neighbourhoods, fits_whole,
                                graph_drawing, plot_folding_figure, plot_folding_graphs)


@pytest.fixture(scope="module")
def simplecnn_graphs():
    model = build_model(ModelSpec(), seed=0).eval()
    before = export.to_onnx(model, torch.rand(2, 1, 28, 28))
    after, report = fold_onnx(before, check=False)
    return before, after, report


def test_simplecnn_drawing(simplecnn_graphs):
    before, after, _ = simplecnn_graphs
    drawn_before, drawn_after = graph_drawing(before), graph_drawing(after)
    assert drawn_before.count(BN) == 1 and drawn_before.count(ABSORBED) == 0
    assert drawn_after.count(BN) == 0 and drawn_after.count(ABSORBED) == 1
    assert drawn_before.count(IO) == 2
    # input, Conv, BN, Relu, MaxPool, Reshape, Gemm, output: one chain; flatten's shape nodes hidden
    assert [n.label.split()[0] for n in sorted(drawn_before.nodes.values(), key=lambda n: n.layer)] == \
        ["input", "Conv", "BatchNormalization", "Relu", "MaxPool", "Reshape", "Gemm", "output"]
    assert drawn_before.width == 1 and drawn_before.hidden_shape_nodes > 0
    [absorber] = [n for n in drawn_after.nodes.values() if n.role == ABSORBED]
    assert absorber.label == "Conv 16×1×3×3 ⊕ BN"
    bn_name = next(n.name for n in before.graph.node if n.op_type == "BatchNormalization")
    assert absorber.absorbed == [bn_name]
    conv = next(n for n in after.graph.node if n.op_type == "Conv")
    assert absorbed_batchnorms(conv) == [bn_name]


def test_simplecnn_figure(simplecnn_graphs, tmp_path):
    before, after, _ = simplecnn_graphs
    path, drawings = plot_folding_graphs(before, after, tmp_path / "graph.png")
    with Image.open(path) as image:
        assert image.size[0] >= 11 * PNG_DPI and image.size[1] >= 3 * PNG_DPI
    assert [d.count(BN) for d in drawings] == [1, 0]


def test_resnet18_stays_readable(tmp_path):
    torchvision = pytest.importorskip("torchvision")

    class Images(torch.nn.Module):  # the exporter names the input after forward's argument
        def __init__(self):
            super().__init__()
            self.net = torchvision.models.resnet18(num_classes=10)

        def forward(self, images):
            return self.net(images)

    torch.manual_seed(0)
    before = export.to_onnx(Images().eval(), torch.rand(1, 3, 32, 32))
    after, report = fold_onnx(before, check=False)
    path, (drawn_before, drawn_after) = plot_folding_graphs(before, after, tmp_path / "resnet.png")
    assert drawn_before.count(BN) == 20
    assert drawn_after.count(ABSORBED) == len(report.folded)
    assert drawn_after.count(BN) == 20 - len(report.folded)
    assert drawn_before.width == 2  # the downsampling shortcut runs beside the main branch, nothing wider
    assert 60 <= drawn_before.layers <= 70
    with Image.open(path) as image:
        width, height = image.size
    # one row per layer at ≥ 0.3 inch: every 7-point label has room
    assert height >= drawn_before.layers * 0.3 * PNG_DPI and width >= 11 * PNG_DPI


def conv_bn_chain(depth: int, *, shared: int | None = None, channels: int = 4) -> onnx.ModelProto:
    """images → (Conv → BatchNormalization → Relu) × depth, built node by node; block ``shared``'s conv
    output also leaves the graph, so its BatchNorm cannot fold."""
    rng = np.random.default_rng(0)
    nodes, weights, outputs = [], [], []
    x = "images"
    for i in range(depth):
        weights += [numpy_helper.from_array(rng.standard_normal((channels, channels, 3, 3)).astype(np.float32), f"w{i}")]
        weights += [numpy_helper.from_array(value.astype(np.float32), f"{key}{i}") for key, value in
                    (("s", rng.uniform(0.5, 2, channels)), ("b", rng.standard_normal(channels)),
                     ("m", rng.standard_normal(channels)), ("v", rng.uniform(0.5, 2, channels)))]
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("BatchNormalization", [f"c{i}", f"s{i}", f"b{i}", f"m{i}", f"v{i}"], [f"n{i}"],
                                   name=f"bn{i}"),
                  helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}")]
        if i == shared:
            outputs.append(helper.make_tensor_value_info(f"c{i}", onnx.TensorProto.FLOAT, [1, channels, 8, 8]))
        x = f"r{i}"
    outputs.append(helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [1, channels, 8, 8]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT,
                                                                             [1, channels, 8, 8])], outputs, weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_big_graph_is_drawn_as_bn_neighbourhoods(tmp_path):
    before = conv_bn_chain(120, shared=7)
    after, report = fold_onnx(before, check=False)
    assert len(report.folded) == 119 and [r.batchnorm for r in report.kept] == ["bn7"]
    drawings = [graph_drawing(before), graph_drawing(after)]
    assert not fits_whole(drawings)
    path, whole = plot_folding_figure(before, after, tmp_path / "graph.png", drawings=drawings)
    assert not whole
    with Image.open(path) as image:
        assert max(image.size) <= MAX_FIGURE_PX
    folded, kept = bn_neighbourhoods(before, after)
    assert (folded.count, folded.status, kept.count, kept.status) == (119, "folded", 1, "kept")
    assert folded.names == [f"bn{i}" for i in range(120) if i != 7] and kept.names == ["bn7"]
    label = [[name for name, _ in step] for step in folded.before]
    assert label == [["Conv"], ["BatchNormalization"], ["Relu"]]
    assert [[name for name, _ in step] for step in folded.after] == [["Conv ⊕ BN"], ["Relu"]]
    # the kept one: its conv output also leaves the graph, and the chain around it is unchanged
    assert [[name for name, _ in step] for step in kept.after] == [["Conv"], ["BatchNormalization"], ["Relu"]]


def test_small_graph_is_drawn_whole(simplecnn_graphs, tmp_path):
    before, after, _ = simplecnn_graphs
    assert fits_whole([graph_drawing(before), graph_drawing(after)])
    assert plot_folding_figure(before, after, tmp_path / "graph.png")[1] is True
    assert fits_whole([graph_drawing(conv_bn_chain(10))] * 2)
